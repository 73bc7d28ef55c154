"""Alert events: the JSON contract of the `tensorpulse.alerts` topic (docs/alerts.md).

One event when a rule starts firing for a (job, rank, rule) and one when it resolves, never
one per step. Ids are deterministic, so a consumer (or a replay) can de-duplicate by id.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import DecodeError

STATUSES = ("firing", "resolved")


def _json_number(x: float | None) -> float | str | None:
    """JSON has no NaN/inf: they travel as the strings "NaN", "Infinity", "-Infinity"."""
    if x is None or math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _from_json_number(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):
        return float(x.replace("Infinity", "inf"))
    return float(x)


#: The JSON types of an event's fields (value and threshold: numbers or "NaN"/"Infinity" strings).
_STR_FIELDS = ("job", "rule", "status", "mode", "severity", "message", "action", "id")
_INT_FIELDS = ("step", "rank")


def _no_constant(name: str) -> Any:
    """Bare NaN/Infinity are not JSON (the event's numbers travel as strings): an event carrying
    one could not be written out again (`to_json`, the webhook sink), so it is refused here."""
    raise ValueError(f"{name} is not JSON")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_types(d: dict[str, Any]) -> None:
    """TypeError naming the first field of `d` whose JSON type is not the event's."""
    for name in _STR_FIELDS:
        if name in d and not isinstance(d[name], str):
            raise TypeError(f"{name!r} is {type(d[name]).__name__}, expected a string")
    for name in _INT_FIELDS:
        if name in d and (not isinstance(d[name], int) or isinstance(d[name], bool)):
            raise TypeError(f"{name!r} is {type(d[name]).__name__}, expected an integer")
    if "ts" in d and not (_is_number(d["ts"]) and math.isfinite(d["ts"])):
        raise TypeError(f"'ts' is {str(d['ts'])[:40]}, expected a finite number")
    pts = d.get("publish_ts")
    if pts is not None and not (_is_number(pts) and math.isfinite(pts)):
        raise TypeError(f"'publish_ts' is {str(pts)[:40]}, expected a finite number or null")
    for name in ("value", "threshold"):
        if d.get(name) is not None and not isinstance(d[name], str) and not _is_number(d[name]):
            raise TypeError(f"{name!r} is {type(d[name]).__name__}, expected a number or null")
    tensors = d.get("tensors", [])
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise TypeError("'tensors' is not a list of strings")
    if d.get("details") is not None and not isinstance(d["details"], dict):
        raise TypeError(f"'details' is {type(d['details']).__name__}, expected an object or null")


def alert_id(job: str, rule: str, rank: int, mode: str, status: str, step: int) -> str:
    """Deterministic id: the same transition always gets the same id (replays, restarts)."""
    raw = f"{job}\x1f{rule}\x1f{rank}\x1f{mode}\x1f{status}\x1f{step}".encode()
    return hashlib.sha256(raw).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """A rule's transition to firing or resolved for one job and rank."""

    job: str
    rule: str
    status: str
    step: int
    mode: str
    severity: str
    rank: int = 0
    tensors: tuple[str, ...] = ()
    value: float | None = None
    threshold: float | None = None
    message: str = ""
    action: str = "none"
    ts: float = field(default_factory=time.time)
    publish_ts: float | None = None
    id: str = ""
    #: Optional rule-specific facts (a JSON object), e.g. ExplodingTensor's
    #: {"first_nonfinite": {...}}. Not part of `id`: it may grow while the alert's identity does not.
    details: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"alert status must be one of {STATUSES}, got {self.status!r}")
        if not self.id:
            object.__setattr__(
                self, "id", alert_id(self.job, self.rule, self.rank, self.mode, self.status, self.step)
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = list(self.tensors)
        d["value"] = _json_number(self.value)
        d["threshold"] = _json_number(self.threshold)
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> AlertEvent:
        """Decode an event of the alerts topic; DecodeError("bad_alert") is the only error bad input
        raises, and every field of what it returns has its declared type (readers format, sort
        and convert events without checking again)."""
        try:
            d = json.loads(payload, parse_constant=_no_constant)
            if not isinstance(d, dict):
                raise TypeError(f"expected a JSON object, got {type(d).__name__}")
            _check_types(d)
            d["tensors"] = tuple(d.get("tensors", ()))
            d["value"] = _from_json_number(d.get("value"))
            d["threshold"] = _from_json_number(d.get("threshold"))
            return cls(**d)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise DecodeError("bad_alert", f"not an alert event: {str(exc)[:200]}") from exc

    def format(self) -> str:
        """One human-readable line (used by `tensorpulse alerts` and the demo)."""
        when = time.strftime("%H:%M:%S", time.localtime(self.ts))
        mark = "FIRING  " if self.status == "firing" else "resolved"
        where = f"{self.job} rank {self.rank} {self.mode} step {self.step}"
        extra = ""
        if self.value is not None:
            extra = f" value={self.value:.4g}" + (
                f" threshold={self.threshold:.4g}" if self.threshold is not None else ""
            )
        tensors = ""
        if self.tensors:
            shown = ", ".join(self.tensors[:3]) + (
                f" (+{len(self.tensors) - 3} more)" if len(self.tensors) > 3 else ""
            )
            tensors = f" [{shown}]"
        return f"{when} {mark} {self.severity:<8} {self.rule:<26} {where}{extra}{tensors} {self.message}".rstrip()
