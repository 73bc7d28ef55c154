"""Dead-letter envelopes: a rejected record is kept, with why and where it came from."""

from __future__ import annotations

import base64
import hashlib
import json
import time

#: Payload bytes kept inline; larger payloads are truncated (the digest identifies the original).
MAX_INLINE_PAYLOAD = 256 * 1024


def envelope(
    *,
    reason: str,
    error: str,
    topic: str,
    partition: int,
    offset: int,
    job: str | None,
    key: bytes | str | None,
    payload: bytes | None,
) -> bytes:
    """JSON envelope for the dead-letter topic (see docs/wire-format.md)."""
    payload = payload or b""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    doc = {
        "reason": reason,
        "error": error,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "job": job,
        "key": key,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "truncated": len(payload) > MAX_INLINE_PAYLOAD,
        "payload_b64": base64.b64encode(payload[:MAX_INLINE_PAYLOAD]).decode(),
        "ts": time.time(),
    }
    return json.dumps(doc, separators=(",", ":")).encode()
