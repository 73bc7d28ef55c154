"""What the processor hands back besides state: alert events and actions to publish, dead letters,
and the counters and log lines that go with each (rate-limited: a counter has every case, the
log one line per kind per interval). Every path that alerts or rejects goes through here, the
job's own records, its clock ticks and the cross-run stream alike."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from tensorpulse import wire
from tensorpulse.actions import encode_action
from tensorpulse.errors import DecodeError
from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.topics import DEADLETTER_TOPIC

from .deadletter import envelope
from .evaluator import Transition
from .published import PublishedAlerts
from .state import JobStore

log = logging.getLogger("tensorpulse.stream")

#: Dead-letter reasons that are a documented limit: the limit's label on tensorpulse_limit_exceeded_total.
LIMIT_OF_REASON = {
    "too_large": "record_bytes",
    "too_many_tensors": "tensors_per_record",
    "too_many_ranks": "ranks_per_job",
}


class Source(NamedTuple):
    """Where a record came from: its job topic, partition and offset (what a dead letter names)."""

    topic: str
    partition: int
    offset: int


class Outcomes:
    """Turns transitions into alert and action payloads and errors into dead letters, counting both."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        published: PublishedAlerts,
        on_alert: Callable[[Any], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.published = published
        self._on_alert = on_alert
        self._warned: dict[str, float] = {}

    def due(self, key: str, every: float) -> bool:
        """True at most once per `every` seconds per `key`: when a log line about it is due."""
        now = time.monotonic()
        if now - self._warned.get(key, -float("inf")) > every:
            self._warned[key] = now
            return True
        return False

    def forget(self, key: str) -> None:
        self._warned.pop(key, None)

    def emit(self, transitions: list[Transition]) -> tuple[list[bytes], list[bytes]]:
        """Encode alert events and actions, and count and log them."""
        alerts, actions = [], []
        for tr in transitions:
            ev = tr.event
            if ev.id in self.published:  # already published by a crashed predecessor (see published.py)
                self.published.suppressed += 1
                self.metrics.redeliveries.inc()
                continue
            alerts.append(ev.to_json())
            self.metrics.alert(ev.job, ev.rule, ev.severity, ev.status, ev.rank)
            log.warning("alert %s", ev.format())
            if tr.action in ("stop", "checkpoint"):
                actions.append(
                    encode_action(
                        tr.action, ev.job, rule=ev.rule, alert_id=ev.id, step=ev.step, reason=ev.message
                    )
                )
                self.metrics.actions.labels(ev.job, tr.action).inc()
            if self._on_alert is not None:
                self._on_alert(ev)
        return alerts, actions

    def count_reject(self, reason: str) -> None:
        self.metrics.decode_errors.labels(reason).inc()
        self.metrics.deadletters.labels(reason).inc()
        limit = LIMIT_OF_REASON.get(reason)
        if limit is not None:
            self.metrics.limits.labels(limit).inc()

    def reject(self, exc: DecodeError, job: str, key: Any, value: Any, src: Source) -> bytes:
        """The dead letter of a record (counted; one log line per reason per 10 s)."""
        self.count_reject(exc.reason)
        if self.due(exc.reason, 10):
            where = f"job {job!r} topic {src.topic} partition {src.partition} offset {src.offset}"
            log.warning(
                "rejected record (%s) at %s: %s; sent to %s", exc.reason, where, exc.detail, DEADLETTER_TOPIC
            )
        payload = value if isinstance(value, (bytes, bytearray)) else repr(value).encode()
        return envelope(
            reason=exc.reason,
            error=exc.detail,
            topic=src.topic,
            partition=src.partition,
            offset=src.offset,
            job=job,
            key=key,
            payload=bytes(payload),
        )

    def rule_error(self, rule: str, record: wire.StepRecord | None, exc: Exception) -> None:
        self.metrics.rule_errors.labels(rule, "raised").inc()
        if self.due(f"rule:{rule}", 10):
            where = (
                "a clock tick"
                if record is None
                else f"job {record.job} rank {record.rank} step {record.step}"
            )
            log.error("rule %s failed on %s and was reset: %s: %s", rule, where, type(exc).__name__, exc)

    def stale_state(self, job: str, rule: str, key: str, problem: str) -> None:
        """Count (and say at most once a minute per rule) a stored state that did not match its
        rule's declared State and was replaced by a fresh one (stream/state.py)."""
        self.metrics.rule_errors.labels(rule, "stored_state").inc()
        if self.due(f"stale:{rule}", 60):
            log.warning(
                "job %s: the stored state of rule %s (%s) does not match the rule's declared State "
                "(%s); the rule starts afresh (a state written by another version of the rule?)",
                job,
                rule,
                key,
                problem,
            )

    def too_large(self, job: str, store: JobStore) -> None:
        """Count (and say once per rule a minute) the state entries that were over the limit and reset."""
        for exc in store.rejected:
            for rule in exc.rules:
                self.metrics.state_too_large.labels(rule).inc()
                if self.due(f"too_large:{rule}", 60):
                    log.error(
                        "job %s: the state of rule %s (%s) is %d bytes, over the limit of %d; the rule "
                        "starts over at every record of this job (fewer ranks or tensors per record, or "
                        "a narrower collection/tensor selection for this rule, keep it under the limit)",
                        job,
                        rule,
                        exc.key,
                        exc.size,
                        store.max_entry_bytes,
                    )

    def processing_error(self, exc: Exception, row: Any, logger: logging.Logger) -> bool:
        """Last-resort boundary: a bug in a rule must not stop every other job. Count and go on."""
        self.metrics.decode_errors.labels("processing_error").inc()
        log.exception("processing failed for a record (%s); skipped", type(exc).__name__)
        return True
