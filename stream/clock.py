"""Clock rules in the stream: ticks between records, although Quix state is only reachable per message.

A clock rule (StalledTrainingRule) must fire when *no* record arrives, but Quix Streams hands a
job's state only to the processing of one of its messages. The design:

- **Mirror.** While processing a record of a job that has clock rules, the worker copies the
  clock rules' slots of the job state (per rank: rule state, firing flag, newest step/mode/ts,
  finished flag) into this in-memory `ClockMirror`, tagged with the (topic, partition) the record
  came from. Before evaluating the next record, it lays the mirror's slots over the state read
  from Quix: the mirror is authoritative for clock slots while this worker owns the job, because
  the timer may have changed them since. Both steps run under the mirror's lock.
- **Timer.** A worker thread calls `tick(now)` every `clock_interval(specs)` seconds (a tenth of
  the smallest threshold, between 0.05 and 1 s). For each mirrored job it runs
  `JobEvaluator.check_idle` on the mirrored slots and returns the transitions, which the worker
  publishes with its own (idempotent, non-transactional) producer to the alerts topic (and the
  control topic for actions), counts in its metrics, and logs, like any other alert. The firing
  flag reaches the changelog with the job's next record (through the overlay), so the resolve
  that record causes is produced by the normal, exactly-once path.
- **Finished jobs.** A rank's `kind: end` record marks its clock slots finished: they are not
  ticked, and a firing stall resolves. A job whose ranks have all finished leaves the mirror.
- **Ownership.** After each rebalance the worker keeps only the jobs whose partitions it was
  assigned (`retain`); between a revoke and the next assignment the timer does not run. The
  mirror survives the worker's own application rebuilds (new job topics), which reassign the
  same partitions, so a silent job stays watched across them.

What is and is not exactly-once for clock alerts:
- The *identity* of a stall alert is deterministic: (job, rule, rank, mode, status, step of the
  rank's newest record). Any duplicate (a producer retry, two workers briefly ticking the same
  job around a rebalance, a re-fire after the overlay was lost) has the same id, so consumers
  de-duplicate by id as for every other alert.
- Firing events from the timer are *at-least-once* while the worker lives (the producer retries)
  and are not part of a Kafka transaction: a worker that crashes right after the timer fired but
  before the job's next record leaves no trace of the firing in its state. The resolve then
  comes from the next record only if the new owner also saw the stall (see below).
- The mirror is memory only. A worker that starts (or takes over a partition) while a job is
  already silent does not know that job until the job sends a record: a stall that spans a
  worker restart or a handover is reported by the new owner only after one more record. If a
  processing transaction aborts after the overlay, a clock transition can be lost or repeated
  (with the same id).
- Resolves caused by records (the next record, or the end record) are exactly-once, like any
  record-driven alert.
The comparison is the hook's clock (record ts) against the worker's: keep them synchronised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorpulse.rules.config import RuleSpec

from .evaluator import JobEvaluator, JobState, RuleErrorHandler, Transition, is_clock

#: Bounds of the timer period, in seconds.
MIN_INTERVAL, MAX_INTERVAL = 0.05, 1.0


def clock_interval(specs: Iterable[RuleSpec]) -> float | None:
    """How often to tick: a tenth of the smallest clock-rule `threshold`, in [0.05, 1] s; None: no clock rule."""
    clocks = [s for s in specs if is_clock(s)]
    if not clocks:
        return None
    thresholds = [
        float(t)
        for s in clocks
        if isinstance(t := getattr(s.rule.params, "threshold", None), (int, float)) and t > 0
    ]
    tenth = min(thresholds) / 10 if thresholds else MAX_INTERVAL
    return max(MIN_INTERVAL, min(MAX_INTERVAL, tenth))


@dataclass
class _Entry:
    source: tuple[str, int]  # (topic, partition) of the job's records
    slots: dict[str, Any] = field(default_factory=dict)


class ClockMirror:
    """Thread-safe in-memory copy of the clock slots of the jobs this worker owns (see the module doc)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._jobs: dict[str, _Entry] = {}

    def __len__(self) -> int:
        with self.lock:
            return len(self._jobs)

    def __contains__(self, job: object) -> bool:
        with self.lock:
            return job in self._jobs

    def overlay(self, job: str, state: JobState | None) -> JobState | None:
        """`state` with the mirrored clock slots of `job` laid over it (unchanged if none are mirrored)."""
        with self.lock:
            entry = self._jobs.get(job)
            if entry is None or not entry.slots:
                return state
            return JobEvaluator.with_slots(state, entry.slots)

    def remember(self, job: str, source: tuple[str, int], slots: dict[str, Any]) -> None:
        """Store a job's clock slots after a record; a job with no ticking slot left is forgotten."""
        with self.lock:
            if slots and JobEvaluator.active_clock_slots(slots):
                self._jobs[job] = _Entry(source, slots)
            else:
                self._jobs.pop(job, None)

    def retain(self, sources: Iterable[tuple[str, int]]) -> list[str]:
        """Forget jobs whose (topic, partition) is not in `sources`; returns the jobs dropped."""
        keep = set(sources)
        with self.lock:
            gone = [j for j, e in self._jobs.items() if e.source not in keep]
            for j in gone:
                del self._jobs[j]
        return gone

    def jobs(self) -> list[str]:
        with self.lock:
            return sorted(self._jobs)

    def tick(
        self,
        evaluator: Callable[[str], JobEvaluator],
        now: float,
        *,
        on_rule_error: RuleErrorHandler | None = None,
    ) -> list[Transition]:
        """Run `check_idle` for every mirrored job at `now`; returns the transitions to publish."""
        out: list[Transition] = []
        with self.lock:
            for job in sorted(self._jobs):
                entry = self._jobs[job]
                state, transitions = evaluator(job).check_idle(
                    {"r": entry.slots}, job, now, on_rule_error=on_rule_error
                )
                entry.slots = state["r"]
                out += transitions
        return out


def data_partitions(partitions: Sequence[Any], topics: Iterable[str]) -> list[tuple[str, int]]:
    """(topic, partition) of the assigned partitions that belong to `topics` (not changelogs)."""
    wanted = set(topics)
    return [(tp.topic, tp.partition) for tp in partitions if tp.topic in wanted]
