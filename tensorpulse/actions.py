"""Actions: what the stream side asks a training job to do, on the job's control topic.

Message format (JSON, UTF-8, one object per Kafka message, keyed by job id):

    {"v": 1, "action": "stop" | "checkpoint", "job": str, "rule": str, "alert_id": str,
     "step": int | null, "reason": str, "ts": float (unix seconds)}

This is the one codec: workers encode with it, the hook's control listener decodes with it.
The hook exposes actions as data (`should_stop`, callbacks); the training loop decides.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from .errors import ConfigError, DecodeError
from .topics import validate_job

ACTIONS = ("stop", "checkpoint")
ACTION_VERSION = 1
MAX_ACTION_BYTES = 64 * 1024
#: A control message is one flat object: more opening brackets than this (in strings too) and it
#: is refused before JSON parsing. The parser refuses deep nesting only by RecursionError, after
#: recursing into it: about 470 us for 5,000 nested '[' against about 5 us for an ordinary
#: message, which is what a flood of them made the listener spend (bench/control_flood.py).
MAX_OPEN_BRACKETS = 256


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
    """The control message for `action` on `job` (ConfigError on invalid arguments)."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown action {action!r}; expected one of {ACTIONS}")
    validate_job(job)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ConfigError(f"step must be a non-negative integer or None, got {step!r}")
    ts = time.time() if ts is None else float(ts)
    if not math.isfinite(ts):
        raise ConfigError(f"ts must be finite, got {ts!r}")
    msg = {
        "v": ACTION_VERSION,
        "action": action,
        "job": job,
        "rule": str(rule),
        "alert_id": str(alert_id),
        "step": step,
        "reason": str(reason),
        "ts": ts,
    }
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


def decode_action(payload: bytes) -> dict[str, Any]:
    """Decode and validate a control message; DecodeError (with a stable reason) on bad input.

    Unknown extra fields (and "v") are dropped so newer senders can add fields without breaking
    hooks; messages without "v" are accepted too. DecodeError is the only error bad input raises
    (deep nesting, an unhashable action, a 400-digit timestamp: reason `malformed`), so that the
    hook's control listener skips the message and keeps honouring genuine stops.
    """
    try:
        return _decode_action(payload)
    except DecodeError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise DecodeError("malformed", f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _decode_action(payload: bytes) -> dict[str, Any]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError("wrong_type", f"payload is {type(payload).__name__}, expected bytes")
    if len(payload) > MAX_ACTION_BYTES:
        raise DecodeError("too_large", f"control message of {len(payload)} bytes, limit {MAX_ACTION_BYTES}")
    data = bytes(payload)
    brackets = data.count(b"[") + data.count(b"{")
    if brackets > MAX_OPEN_BRACKETS:
        raise DecodeError(
            "malformed", f"control message opens {brackets} brackets, limit {MAX_OPEN_BRACKETS}: nested too deep"
        )
    try:
        msg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError("not_json", f"control message is not UTF-8 JSON: {exc}") from exc
    if not isinstance(msg, dict):
        raise DecodeError("not_a_record", f"control message is a {type(msg).__name__}, expected an object")
    action = msg.get("action")
    if action not in ACTIONS:
        raise DecodeError("bad_value", f"action {action!r} is not one of {ACTIONS}")
    job = msg.get("job")
    try:
        validate_job(job)  # type: ignore[arg-type]
    except ValueError as exc:
        raise DecodeError("bad_job", str(exc)) from exc
    ts = msg.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise DecodeError("wrong_type", f"'ts' is {ts!r}, expected a finite number")
    step = msg.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63):
        raise DecodeError("wrong_type", f"'step' is {str(step)[:40]}, expected an integer in [0, 2**63) or null")
    out: dict[str, Any] = {"action": action, "job": job, "step": step, "ts": float(ts)}
    for key in ("rule", "alert_id", "reason"):
        value = msg.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DecodeError("wrong_type", f"'{key}' is {type(value).__name__}, expected a string")
        out[key] = value
    return out
