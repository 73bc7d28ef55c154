"""Actions: what the stream side asks a training job to do, on the job's control topic.

A JSON object per message, keyed by job id: {"v": 1, "action": "stop"|"checkpoint", "job",
"rule", "alert_id", "step", "reason", "ts"}. The hook exposes them as data (`should_stop`,
callbacks); the training loop decides what to do (see docs/wire-format.md).
"""

from __future__ import annotations

import json
import time
from typing import Any

from .errors import DecodeError
from .topics import validate_job

ACTIONS = ("stop", "checkpoint")
ACTION_VERSION = 1


def encode_action(
    action: str,
    job: str,
    *,
    rule: str = "",
    alert_id: str = "",
    step: int | None = None,
    reason: str = "",
    ts: float | None = None,
) -> bytes:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
    msg = {
        "v": ACTION_VERSION,
        "action": action,
        "job": validate_job(job),
        "rule": rule,
        "alert_id": alert_id,
        "step": step,
        "reason": reason,
        "ts": time.time() if ts is None else ts,
    }
    return json.dumps(msg, separators=(",", ":")).encode()


def decode_action(payload: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(payload)
    except (ValueError, TypeError) as exc:
        raise DecodeError("bad_action", f"control message is not JSON: {exc}") from exc
    if not isinstance(msg, dict) or msg.get("action") not in ACTIONS or not isinstance(msg.get("job"), str):
        raise DecodeError("bad_action", f"control message lacks a known action and a job: {msg!r:.200}")
    if not isinstance(msg.get("ts"), (int, float)):
        raise DecodeError("bad_action", "control message has no numeric 'ts'")
    return msg
