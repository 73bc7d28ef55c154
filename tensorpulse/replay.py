"""Back-testing: run rules over a job's retained records, as the stream worker would have.

Two parts that never meet Kafka together: `JobReader` reads the raw payloads of a job's
reductions topic (all partitions, from the beginning to the end at the time it gets there;
it only ever consumes: no commits, no group join, nothing is written), and `Replay` decodes
them with the shared codec and drives the worker's own `JobEvaluator`, so a replay fires
exactly where the worker would have. Tests and `tensorpulse report` feed `Replay` payloads
directly.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import click
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from . import wire
from .errors import ConfigError, DecodeError, TensorpulseError
from .events import AlertEvent
from .kafka import client_config, resolve_bootstrap
from .rules.config import RuleSpec, rules_for_job
from .stream.evaluator import JobEvaluator
from .topics import DEFAULT_PREFIX, job_of_topic, reductions_topic, validate_job

log = logging.getLogger("tensorpulse.replay")

#: (records read so far, records the topic held at start; 0 when unknown) -> None
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Payload:
    """One raw message of a reductions topic, with where it came from (for error reports)."""

    value: bytes | None
    key: bytes | None = None
    partition: int = 0
    offset: int = -1


class JobReader:
    """Iterates over the retained messages of `<prefix>reductions.<job>`, then stops.

    A partition is finished when the consumer reports partition EOF at or past the high
    watermark seen at start. The watermark alone is not trusted (some Kafka-protocol brokers
    under-report it), and EOF alone could end early on a broker that reports it spuriously.
    If neither arrives for `idle_timeout` seconds, reading stops and `complete` is False.
    Messages that arrive after a partition's EOF are not read: a replay is a snapshot.
    """

    def __init__(
        self,
        bootstrap: str | None,
        job: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        kafka_config: dict[str, Any] | None = None,
        idle_timeout: float = 15.0,
        progress: ProgressFn | None = None,
    ) -> None:
        self.job = validate_job(job)
        self.topic = reductions_topic(job, prefix)
        self.prefix = prefix
        self.bootstrap = resolve_bootstrap(bootstrap)
        self.kafka_config = dict(kafka_config or {})
        self.idle_timeout = idle_timeout
        self.progress = progress
        #: Partitions of the topic and messages it held at start (from the watermarks).
        self.partitions: list[int] = []
        self.expected = 0
        #: Messages read so far; False if reading stopped on the idle timeout.
        self.read = 0
        self.complete = True

    def _consumer(self) -> Consumer:
        conf = client_config(
            self.bootstrap,
            {
                # A throw-away group id: required by the client, never joined or committed.
                "group.id": f"tensorpulse-replay-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 10,
                "queued.min.messages": 100_000,
                **self.kafka_config,
            },
        )
        try:
            return Consumer(conf)
        except KafkaException as exc:
            raise ConfigError(f"invalid Kafka client settings for {self.bootstrap}: {exc}") from exc

    def _partitions(self, consumer: Consumer) -> list[int]:
        try:
            meta = consumer.list_topics(timeout=10)
        except KafkaException as exc:
            raise TensorpulseError(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc
        t = meta.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            jobs = sorted(j for j in (job_of_topic(n, self.prefix) for n in meta.topics) if j)
            known = f"jobs with retained records: {', '.join(jobs[:20])}" if jobs else "no job has records"
            more = f" (+{len(jobs) - 20} more)" if len(jobs) > 20 else ""
            raise ConfigError(f"no topic {self.topic!r} at {self.bootstrap}: {known}{more}")
        return sorted(t.partitions)

    def __iter__(self) -> Iterator[Payload]:
        consumer = self._consumer()
        try:
            self.partitions = self._partitions(consumer)
            ends: dict[int, int] = {}
            for p in self.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
                ends[p] = max(high, 0)
                self.expected += max(high - max(low, 0), 0)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self.partitions])
            pending = set(self.partitions)
            last = time.monotonic()
            while pending:
                msgs = consumer.consume(1000, 0.2)
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if m.offset() >= ends.get(m.partition(), 0):
                                pending.discard(m.partition())
                        elif err.fatal():
                            raise TensorpulseError(f"reading {self.topic} failed: {err.str()}")
                        else:
                            log.warning("reading %s: %s", self.topic, err.str())
                        continue
                    if m.partition() not in pending:
                        continue
                    self.read += 1
                    yield Payload(m.value(), m.key(), m.partition(), m.offset())
                now = time.monotonic()
                if msgs:
                    last = now
                    if self.progress is not None:
                        self.progress(self.read, self.expected)
                elif now - last > self.idle_timeout:
                    self.complete = False
                    log.warning(
                        "%s: no end of partition(s) %s reached after %.0f s idle; stopping with %d records",
                        self.topic,
                        sorted(pending),
                        self.idle_timeout,
                        self.read,
                    )
                    break
        finally:
            consumer.close()


class Progress:
    """Reading progress on stderr: a click progress bar on a terminal, else a line every `every` records."""

    def __init__(self, label: str, *, every: int = 10_000, stream: IO[str] | None = None) -> None:
        self.label = label
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._shown = 0
        self._t0 = time.monotonic()

    def __call__(self, read: int, expected: int) -> None:
        if self.tty:
            if self._bar is None:
                self._bar = click.progressbar(length=max(expected, 1), label=self.label, file=self.stream)
                self._bar.__enter__()
            if read > self._bar.length:  # the watermark under-reported the topic's size
                self._bar.length = read
            self._bar.update(read - self._bar.pos)
            return
        if read - self._shown >= self.every:
            self._shown = read
            rate = read / max(time.monotonic() - self._t0, 1e-6)
            of = f" of ~{expected}" if expected >= read else ""
            print(f"{self.label}: {read} records{of} read ({rate:.0f}/s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@dataclass
class ReplaySummary:
    """What a replay saw: counts for the user, and the alerts per rule for back-testing."""

    job: str
    records_read: int = 0
    records_evaluated: int = 0
    end_records: int = 0
    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    ranks: list[int] = field(default_factory=list)
    decode_errors: dict[str, int] = field(default_factory=dict)
    rule_errors: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, dict[str, int]] = field(default_factory=dict)
    still_firing: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "records_read": self.records_read,
            "records_evaluated": self.records_evaluated,
            "end_records": self.end_records,
            "steps": self.steps,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "ranks": self.ranks,
            "decode_errors": self.decode_errors,
            "rule_errors": self.rule_errors,
            "alerts": self.alerts,
            "still_firing": [list(x) for x in self.still_firing],
        }


class Replay:
    """Decodes one job's payloads and evaluates the rules on them, keeping the alert transitions.

    Decoding follows the worker: a payload must decode, carry the topic's job id and (when keyed)
    the job id as key; anything else is counted by reason and skipped. Records before `from_step`
    are decoded (they may announce tensor schemas) but not evaluated. Alert times are the records'
    own creation times, so a replay is deterministic and its alert ids equal the worker's.
    """

    #: Undecodable payloads kept for the report (the count is always exact).
    MAX_ERROR_SAMPLES = 5

    def __init__(self, job: str, specs: Sequence[RuleSpec], *, from_step: int = 0) -> None:
        self.job = validate_job(job)
        self.specs = rules_for_job(specs, job)
        self.evaluator = JobEvaluator(self.specs)
        self.from_step = from_step
        self.state: dict[str, Any] | None = None
        self.events: list[AlertEvent] = []
        self.schemas = wire.SchemaCache()
        self.decode_errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.rule_errors: Counter[str] = Counter()
        self._read = 0
        self._evaluated = 0
        self._ends = 0
        self._steps: set[tuple[int, str, int]] = set()
        self._train_steps: list[int] = []  # [first, last] of train steps
        self._ranks: set[int] = set()

    def feed(self, payload: bytes | Payload) -> tuple[wire.StepRecord | None, list[AlertEvent]]:
        """Decode and evaluate one payload: (the record or None if rejected, the new alert events)."""
        p = payload if isinstance(payload, Payload) else Payload(payload)
        self._read += 1
        try:
            if p.key is not None and p.key != self.job.encode():
                raise DecodeError("wrong_key", f"record key {p.key!r} is not the job id {self.job!r}")
            record = wire.decode(p.value, self.schemas)  # type: ignore[arg-type]
            if record.job != self.job:
                raise DecodeError("job_mismatch", f"record claims job {record.job!r}")
        except DecodeError as exc:
            self.decode_errors[exc.reason] += 1
            if len(self.error_samples) < self.MAX_ERROR_SAMPLES:
                self.error_samples.append(f"partition {p.partition} offset {p.offset}: {exc}")
            return None, []
        return record, self.feed_record(record)

    def feed_record(self, record: wire.StepRecord) -> list[AlertEvent]:
        """Evaluate one decoded record. An `end` record is counted, not evaluated: the worker resolves
        what still fires there, a replay keeps it firing, to show what was firing when the job ended."""
        if record.kind == "end":
            self._ends += 1
            return []
        self._ranks.add(record.rank)
        self._steps.add((record.rank, record.mode, record.step))
        if record.mode == "train":
            if not self._train_steps:
                self._train_steps = [record.step, record.step]
            self._train_steps = [
                min(self._train_steps[0], record.step),
                max(self._train_steps[1], record.step),
            ]
        if record.step < self.from_step:
            return []
        self._evaluated += 1
        self.state, transitions = self.evaluator.process(
            self.state, record, now=record.ts, on_rule_error=self._on_rule_error
        )
        events = [t.event for t in transitions]
        self.events.extend(events)
        return events

    def _on_rule_error(self, rule: str, record: wire.StepRecord, exc: Exception) -> None:
        self.rule_errors[rule] += 1
        if self.rule_errors[rule] == 1:
            log.error(
                "rule %s failed at rank %d step %d and was reset: %s: %s",
                rule,
                record.rank,
                record.step,
                type(exc).__name__,
                exc,
            )

    def summary(self) -> ReplaySummary:
        alerts: dict[str, dict[str, int]] = {}
        for ev in self.events:
            counts = alerts.setdefault(ev.rule, {"firing": 0, "resolved": 0})
            counts[ev.status] += 1
        return ReplaySummary(
            job=self.job,
            records_read=self._read,
            records_evaluated=self._evaluated,
            end_records=self._ends,
            steps=len(self._steps),
            first_step=self._train_steps[0] if self._train_steps else None,
            last_step=self._train_steps[1] if self._train_steps else None,
            ranks=sorted(self._ranks),
            decode_errors=dict(self.decode_errors),
            rule_errors=dict(self.rule_errors),
            alerts=alerts,
            still_firing=JobEvaluator.firing(self.state or {}),
        )


def replay(
    payloads: Iterable[bytes | Payload],
    job: str,
    specs: Sequence[RuleSpec],
    *,
    from_step: int = 0,
    on_record: Callable[[wire.StepRecord], None] | None = None,
) -> Replay:
    """Feed every payload to a fresh `Replay` and return it (events in `.events`, `.summary()`)."""
    r = Replay(job, specs, from_step=from_step)
    for p in payloads:
        record, _ = r.feed(p)
        if record is not None and on_record is not None:
            on_record(record)
    return r


def format_event(ev: AlertEvent) -> str:
    """One line per transition, step first: what back-testing compares."""
    status = "FIRING  " if ev.status == "firing" else "resolved"
    parts = [f"  step {ev.step:>6}  rank {ev.rank}  {ev.mode:<5}  {status} {ev.severity:<8} {ev.rule:<24}"]
    if ev.value is not None:
        parts.append(f" value={ev.value:.4g}")
        if ev.threshold is not None:
            parts.append(f" threshold={ev.threshold:.4g}")
    if ev.tensors:
        more = f" (+{len(ev.tensors) - 3} more)" if len(ev.tensors) > 3 else ""
        parts.append(f" [{', '.join(ev.tensors[:3])}{more}]")
    if ev.message:
        parts.append(f" {ev.message}")
    return "".join(parts).rstrip()


def format_summary(s: ReplaySummary, *, complete: bool = True) -> list[str]:
    """The summary block printed after the transitions."""
    steps = (
        f"{s.steps} (train steps {s.first_step}..{s.last_step}, ranks {', '.join(map(str, s.ranks))})"
        if s.first_step is not None
        else str(s.steps)
    )
    errors = ", ".join(f"{r} x{n}" for r, n in sorted(s.decode_errors.items()))
    lines = [
        "summary",
        f"  records read      {s.records_read} ({s.end_records} end, {s.records_evaluated} evaluated)"
        + ("" if complete else "  INCOMPLETE: the end of the topic was not reached"),
        f"  steps             {steps}",
        f"  decode errors     {sum(s.decode_errors.values())}" + (f" ({errors})" if errors else ""),
    ]
    if s.rule_errors:
        lines.append(
            "  rule errors       " + ", ".join(f"{r} x{n}" for r, n in sorted(s.rule_errors.items()))
        )
    firing = sum(c["firing"] for c in s.alerts.values())
    per_rule = ", ".join(
        f"{rule} x{c['firing']}" + (f" ({c['resolved']} resolved)" if c["resolved"] else "")
        for rule, c in sorted(s.alerts.items())
    )
    lines.append(f"  alerts fired      {firing}" + (f": {per_rule}" if per_rule else ""))
    if s.still_firing:
        lines.append(
            "  still firing      " + ", ".join(f"{rule} (rank {rank})" for rule, rank in s.still_firing)
        )
    return lines
