"""The engine-agnostic core of a worker: rules over one job's records, transitions into alerts.

Nothing here knows about Kafka or Quix: a runner hands in each decoded record with the job's
state (a plain, JSON-serialisable dict) and gets back the new state and the alert events to
publish. The stream worker, `tensorpulse replay` and the tests all drive this same class.

Three entry points, one state:
- `process(state, record)`: a record of the job itself (step or end).
- `check_idle(state, job, now)`: a clock tick, for CLOCK rules (StalledTrainingRule), which can
  fire without a record; the stream layer calls it between records (see stream/clock.py).
- `process_other(state, job, record)`: a record of *another* job, for CROSS_RUN rules
  (SimilarAcrossRuns); the stream layer routes it here (see stream/crossrun.py).

And the end of a job: a rank's `end` record (through `process`) resolves every alert firing for
that rank; `end_job(state, job, now, reason=...)` resolves whatever still fires once the job is
over (every rank ended, or no record for the worker's `job_idle_timeout_s`).

Rules run once per rank, except CROSS_RANK rules (RankDivergence): they get
one job-level slot that sees every rank's records (see tensorpulse.rules.cross_rank).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tensorpulse.events import AlertEvent
from tensorpulse.rules.base import Finding, RuleKind
from tensorpulse.rules.config import RuleSpec
from tensorpulse.rules.cross_rank import RankedFinding
from tensorpulse.wire import StepRecord

JobState = dict[str, Any]
#: Slot key suffix of a cross-rank rule's one job-level slot ("<rule name>|*").
JOB_SLOT = "*"
#: Called with (rule name, the record or None for a clock tick, the exception) when a rule raises.
RuleErrorHandler = Callable[[str, "StepRecord | None", Exception], None]
#: Called with a rule name; returns rank -> that rule's state for every rank of the job.
RankStates = Callable[[str], dict[int, Any]]


@dataclass(frozen=True, slots=True)
class Transition:
    """An alert event plus the action its rule asks for (published on the control topic)."""

    event: AlertEvent
    action: str


@dataclass(frozen=True, slots=True)
class _Where:
    """What an event says about where it happened: the record (or, for a tick, the last record)."""

    job: str
    rank: int
    step: int
    mode: str
    publish_ts: float | None


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None else float(x)


def is_clock(spec: RuleSpec) -> bool:
    """True for rules that can fire without a record (`kind = RuleKind.CLOCK`)."""
    return spec.rule.kind is RuleKind.CLOCK


def is_per_rank(spec: RuleSpec) -> bool:
    """False for rules that compare ranks (`kind = RuleKind.CROSS_RANK`): one slot per job."""
    return spec.rule.kind is not RuleKind.CROSS_RANK


def is_cross_run(spec: RuleSpec) -> bool:
    """True for rules that compare jobs (`kind = RuleKind.CROSS_RUN`, with `update_other`)."""
    return spec.rule.kind is RuleKind.CROSS_RUN


def _apply(
    spec: RuleSpec,
    slot: dict[str, Any],
    method: Callable[[Any, Any], tuple[Any, Finding | None]],
    arg: Any,
    record: StepRecord | None,
    on_rule_error: Callable[[str, StepRecord | None, Exception], None] | None,
) -> tuple[bool, Finding | None]:
    """Run one rule method on a slot's state; a rule that raises is reset and reported, so that
    one broken rule never stops the others (False: skip this rule now)."""
    try:
        new_state, finding = method(slot["s"], arg)
    except Exception as exc:
        slot["s"] = spec.rule.initialize()
        if on_rule_error is None:
            raise
        on_rule_error(spec.name, record, exc)
        return False, None
    slot["s"] = new_state
    return True, finding


class JobEvaluator:
    """Evaluates a fixed list of rule specs per rank; emits an event only when a rule's state flips.

    State layout: {"r": {"<rule name>|<rank>": slot}}, slot = {"s": rule state, "f": firing}; slots
    of clock rules also hold "k": [step, mode, ts] of the newest record (what a tick's event names)
    and "e": true once the rank's end record arrived (a finished rank is not stalled). A firing
    slot keeps "a": [step, mode] of its firing event (what `end_job`'s resolved event names).
    A cross-rank rule (`kind = RuleKind.CROSS_RANK`) has one slot "<rule name>|*" fed by every rank; its
    events name the step, mode and rank its `RankedFinding` gives, and the slot's "w" keeps the
    rank its firing event named (the resolved event names the same rank).
    Per-rank evaluation keeps a healthy rank from masking a sick one (and vice versa); rules
    with a `job_summary(rank_states, mode)` method (ExplodingTensor) add a job-wide fact, over
    all ranks' states, to their firing events.
    """

    def __init__(self, specs: Sequence[RuleSpec]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate rule names in {names}")
        self.specs = tuple(specs)
        self.clock_specs = tuple(s for s in self.specs if is_clock(s))
        self._job_level = frozenset(s.name for s in self.specs if not is_per_rank(s))
        self._clock_names = frozenset(s.name for s in self.clock_specs)
        #: Per mode, the specs that evaluate it and what `process` asks of each for every record,
        #: asked once: (spec, rule, its job-level slot key or None, clock rule, slot key prefix).
        self._plans: dict[str, tuple[tuple[RuleSpec, Any, str | None, bool, str], ...]] = {}

    @property
    def has_clock(self) -> bool:
        """True if any rule needs `check_idle` ticks."""
        return bool(self.clock_specs)

    def initialize(self) -> JobState:
        return {"r": {}}

    # ------------------------------------------------------------------ records of this job
    def process(
        self,
        state: JobState | None,
        record: StepRecord,
        *,
        now: float | None = None,
        on_rule_error: RuleErrorHandler | None = None,
        rank_states: RankStates | None = None,
    ) -> tuple[JobState, list[Transition]]:
        """Feed one record to every rule; a rule that raises is reset (and reported), the others go on.

        `rank_states(rule)` gives every rank's state of a rule, for job summaries, when `state`
        holds only the record's rank (the stream's store keeps ranks apart, stream/state.py).
        """
        state = self.initialize() if state is None else state
        now = time.time() if now is None else now
        if record.kind == "end":
            return state, self._end(state, record, now)
        if record.kind != "step":
            return state, []
        rule_states: dict[str, Any] = state.setdefault("r", {})
        where = _Where(record.job, record.rank, record.step, record.mode, record.ts)
        out: list[Transition] = []
        mode, rank_key = record.mode, str(record.rank)
        plan = self._plans.get(mode)
        if plan is None:
            plan = self._plans[mode] = self._plan(mode)
        for spec, rule, job_key, clock, prefix in plan:
            key = job_key or prefix + rank_key  # as _slot names it
            slot = rule_states.get(key)
            if slot is None:
                slot = rule_states[key] = {"s": rule.initialize(), "f": False}
            ok, finding = _apply(spec, slot, rule.update, record, record, on_rule_error)
            if not ok:
                continue
            if job_key:
                tr = self._transition(
                    state, spec, slot, finding, self._job_where(slot, finding, where), now, rank_states
                )
                if tr is not None:
                    out.append(tr)
                continue
            if clock:
                last = slot.get("k")
                if last is None or record.ts >= last[2]:
                    slot["k"] = [record.step, record.mode, record.ts]
                slot.pop("e", None)
            if finding is None or finding.firing == slot["f"]:
                continue  # no transition (what _transition would say)
            tr = self._transition(state, spec, slot, finding, where, now, rank_states)
            if tr is not None:
                out.append(tr)
        return state, out

    def _plan(self, mode: str) -> tuple[tuple[RuleSpec, Any, str | None, bool, str], ...]:
        """What `process` runs for a record of `mode`, in the order of the specs."""
        return tuple(
            (
                s,
                s.rule,
                f"{s.name}|{JOB_SLOT}" if s.name in self._job_level else None,
                s.name in self._clock_names,
                f"{s.name}|",
            )
            for s in self.specs
            if mode in s.rule.modes
        )

    def _end(self, state: JobState, record: StepRecord, now: float) -> list[Transition]:
        """A rank finished: every alert firing for that rank resolves (nothing more will come from
        it to resolve it), and its clock slots stop ticking (a finished rank is not stalled).

        Cross-rank slots are the job's, not the rank's: `end_job` resolves them once the job is over.
        """
        rule_states: dict[str, Any] = state.get("r", {})
        where = _Where(record.job, record.rank, record.step, record.mode, record.ts)
        message = f"rank {record.rank} finished at {record.mode} step {record.step}"
        out: list[Transition] = []
        for spec in self.specs:
            slot = rule_states.get(f"{spec.name}|{record.rank}")
            if slot is None:
                continue
            if spec.name in self._clock_names:
                slot["e"] = True
            if slot["f"]:
                finding = Finding(False, message=f"{spec.name} resolved: {message}")
                out.append(self._transition(state, spec, slot, finding, where, now))
        return [t for t in out if t is not None]

    def end_job(
        self, state: JobState | None, job: str, now: float, *, reason: str
    ) -> tuple[JobState, list[Transition]]:
        """The job is over (every rank ended, or no record came for the idle timeout): every alert
        still firing in `state` resolves with `reason` in its message, and clock slots stop ticking.

        Without this a finished job's alerts would fire forever: nothing else resolves them.
        A resolved event names the step and mode its alert fired at (kept in the slot while it
        fires), so its id differs from any other resolution of the same rule and rank.
        """
        state = self.initialize() if state is None else state
        rule_states: dict[str, Any] = state.setdefault("r", {})
        by_name = {s.name: s for s in self.specs}
        out: list[Transition] = []
        for key in sorted(rule_states):
            name, _, rank = key.rpartition("|")
            spec = by_name.get(name)
            if spec is None:
                continue
            slot = rule_states[key]
            if name in self._clock_names:
                slot["e"] = True
            if not slot.get("f"):
                continue
            step, mode = slot.get("a") or (slot.get("k") or [0, "global"])[:2]
            r = int(slot.get("w", -1)) if rank == JOB_SLOT else int(rank)
            where = _Where(job, r, int(step), str(mode), None)
            tr = self._transition(
                state, spec, slot, Finding(False, message=f"{name} resolved: {reason}"), where, now
            )
            if tr is not None:
                out.append(tr)
        return state, out

    @staticmethod
    def _job_where(slot: dict[str, Any], finding: Finding | None, where: _Where) -> _Where:
        """Where a cross-rank finding is: its step and mode; the rank it names while firing, else
        the rank the firing event named (so the same rank's alert resolves)."""
        if finding is None:
            return where
        rank = where.rank
        if isinstance(finding, RankedFinding):
            where = _Where(where.job, finding.rank, finding.step, finding.mode, finding.ts)
            rank = finding.rank
        if finding.firing and not slot["f"]:
            slot["w"] = rank
        elif not finding.firing and slot["f"]:
            rank = int(slot.get("w", rank))
        return _Where(where.job, rank, where.step, where.mode, where.publish_ts)

    # ------------------------------------------------------------------ clock ticks
    def check_idle(
        self,
        state: JobState | None,
        job: str,
        now: float,
        *,
        on_rule_error: RuleErrorHandler | None = None,
    ) -> tuple[JobState, list[Transition]]:
        """Ask every clock rule about every rank it has seen (except finished ranks) at time `now`.

        An event names the rank's newest record (its step, mode and ts as publish_ts), so the
        same stall always gets the same alert id, however many ticks or workers report it.
        """
        state = self.initialize() if state is None else state
        rule_states: dict[str, Any] = state.setdefault("r", {})
        out: list[Transition] = []
        for spec in self.clock_specs:
            rule = spec.rule
            prefix = f"{spec.name}|"
            for key in sorted(k for k in rule_states if k.startswith(prefix)):
                slot = rule_states[key]
                last = slot.get("k")
                if slot.get("e") or last is None:
                    continue
                ok, finding = _apply(spec, slot, rule.check_idle, now, None, on_rule_error)
                if not ok:
                    continue
                where = _Where(job, int(key[len(prefix) :]), int(last[0]), str(last[1]), float(last[2]))
                tr = self._transition(state, spec, slot, finding, where, now)
                if tr is not None:
                    out.append(tr)
        return state, out

    # ------------------------------------------------------------------ records of other jobs
    def process_other(
        self,
        state: JobState | None,
        job: str,
        record: StepRecord,
        *,
        now: float | None = None,
        on_rule_error: RuleErrorHandler | None = None,
    ) -> tuple[JobState, list[Transition]]:
        """Feed a record of another job to the cross-run rules of `job` that compare with it.

        Slots are per rank: rank r of this job is compared with rank r of the other. Events are
        about `job` (this one) at the record's rank, mode and step.
        """
        state = self.initialize() if state is None else state
        if record.kind != "step" or record.job == job:
            return state, []
        now = time.time() if now is None else now
        rule_states: dict[str, Any] = state.setdefault("r", {})
        where = _Where(job, record.rank, record.step, record.mode, record.ts)
        out: list[Transition] = []
        for spec in self.specs:
            rule: Any = spec.rule
            if not is_cross_run(spec) or record.mode not in rule.modes or not rule.watches(record.job):
                continue
            slot = self._slot(rule_states, spec, record.rank)
            ok, finding = _apply(spec, slot, rule.update_other, record, record, on_rule_error)
            if not ok:
                continue
            tr = self._transition(state, spec, slot, finding, where, now)
            if tr is not None:
                out.append(tr)
        return state, out

    def watches(self, other: str) -> list[RuleSpec]:
        """The cross-run specs of this job that compare it with job `other`."""
        return [s for s in self.specs if is_cross_run(s) and s.rule.watches(other)]  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ shared
    @staticmethod
    def firing(state: JobState) -> list[tuple[str, int]]:
        """(rule name, rank) pairs that are firing in `state` (cross-rank rules: the rank their alert named)."""
        out = []
        for key, slot in state.get("r", {}).items():
            if slot.get("f"):
                name, _, rank = key.rpartition("|")
                out.append((name, int(slot.get("w", -1)) if rank == JOB_SLOT else int(rank)))
        return sorted(out)

    @staticmethod
    def _slot(rule_states: dict[str, Any], spec: RuleSpec, rank: int | str) -> dict[str, Any]:
        key = f"{spec.name}|{rank}"
        slot = rule_states.get(key)
        if slot is None:
            slot = rule_states[key] = {"s": spec.rule.initialize(), "f": False}
        return slot

    def _transition(
        self,
        state: JobState,
        spec: RuleSpec,
        slot: dict[str, Any],
        finding: Finding | None,
        where: _Where,
        now: float,
        rank_states: RankStates | None = None,
    ) -> Transition | None:
        if finding is None or finding.firing == slot["f"]:
            return None
        slot["f"] = finding.firing
        if finding.firing:
            slot["a"] = [where.step, where.mode]  # what end_job's resolved event names
        else:
            slot.pop("a", None)
        details, extra = None, ""
        summary = getattr(spec.rule, "job_summary", None)
        if finding.firing and summary is not None:
            if rank_states is not None:
                ranks = rank_states(spec.name)
            else:
                ranks = {
                    int(k.rpartition("|")[2]): v["s"]
                    for k, v in state.get("r", {}).items()
                    if k.rpartition("|")[0] == spec.name and k.rpartition("|")[2] != JOB_SLOT
                }
            found = summary(ranks, where.mode)
            if found is not None:
                details, extra = found
        event = self._event(spec, where, finding, now, details, extra)
        return Transition(event, spec.action if finding.firing else "none")

    @staticmethod
    def _event(
        spec: RuleSpec,
        where: _Where,
        finding: Finding,
        now: float,
        details: dict[str, Any] | None = None,
        extra: str = "",
    ) -> AlertEvent:
        value = _finite_or_none(finding.value)
        threshold = _finite_or_none(finding.threshold)
        message = finding.message or (f"{spec.name} resolved" if not finding.firing else f"{spec.name} fired")
        if extra:
            message = f"{message}; {extra}"
        if value is not None and math.isnan(value) and not finding.firing:
            value = None
        return AlertEvent(
            job=where.job,
            rule=spec.name,
            status="firing" if finding.firing else "resolved",
            step=where.step,
            mode=where.mode,
            severity=spec.severity,
            rank=where.rank,
            tensors=tuple(finding.tensors),
            value=value,
            threshold=threshold,
            message=message,
            action=spec.action if finding.firing else "none",
            ts=now,
            publish_ts=where.publish_ts,
            details=details,
        )
