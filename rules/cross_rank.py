"""Cross-rank rules: one rule state per job that sees every rank's records and compares ranks.

Most rules run once per rank (the stream layer keeps one state per rule and rank). A rule that
compares ranks with each other declares `kind = RuleKind.CROSS_RANK`: the stream layer then keeps one
job-level state for it and feeds it the records of all ranks of the job, in arrival order.

Records of one step arrive one rank at a time, interleaved with other steps. `CrossRankRule`
assembles them in its own bounded state and hands a step to `compare` once it is complete:
- complete: `world` ranks (the records' `world`) have reported the step;
- timed out: a record of a later step of the same mode is newer (record ts) than the step's
  earliest record by more than `rank_timeout` seconds: the step is compared with the ranks present;
- overtaken: a later step completed (every rank reports its steps in order, so the missing
  ranks will not report this one), or more than `max_pending_steps` steps are waiting: the
  oldest are compared with the ranks present.
A step is compared at most once; records of a step at or before the newest compared step of
their mode are ignored (they arrived too late).

Size: a step is kept as every rank's values while the job has at most `max_exact_ranks` ranks.
Larger jobs (hundreds or thousands of ranks) keep, per compared name, only the extremes: how many
ranks reported it, the smallest and largest value with their ranks, and the sum, plus a bitmap of
the ranks that reported the step; `compare_extremes` then gets a `SummarisedStep`. State then does
not grow with the job's size (the stream stores at most 100 KiB per entry). Findings say where they are: `RankedFinding`
carries the compared step, its mode, the rank the alert names and the step's earliest record ts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field
from typing_extensions import NotRequired, TypedDict

from tensorpulse.wire import StepRecord

from .base import Finding, Rule, RuleKind, RuleParams, State


@dataclass(frozen=True, slots=True)
class RankedFinding(Finding):
    """A finding about an assembled step: the stream layer names this step, mode and rank in the alert."""

    step: int = 0
    mode: str = "train"
    rank: int = 0
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class AssembledStep:
    """One step's values from the ranks that reported it (rank -> {name: value})."""

    step: int
    mode: str
    world: int
    ts: float
    ranks: dict[int, dict[str, float]]

    @property
    def missing(self) -> list[int]:
        """Ranks in 0..world-1 that did not report this step."""
        return [r for r in range(self.world) if r not in self.ranks]


@dataclass(frozen=True, slots=True)
class Extremes:
    """One name's values over the ranks that reported it at a step: count, smallest and largest
    (with the rank of each; the lower rank on ties), their sum, and whether any was not finite."""

    n: int
    lo: float
    lo_rank: int
    hi: float
    hi_rank: int
    total: float
    finite: bool


@dataclass(frozen=True, slots=True)
class SummarisedStep:
    """One step of a large job: per name extremes instead of every rank's values."""

    step: int
    mode: str
    world: int
    ts: float
    reported: int
    missing: list[int]
    names: dict[str, Extremes]


def _absorb(summary: dict[str, list[Any]], rank: int, values: dict[str, float]) -> None:
    """Fold one rank's values into the per-name [n, lo, lo_rank, hi, hi_rank, total, finite] lists."""
    for name, v in values.items():
        cur = summary.get(name)
        ok = math.isfinite(v)
        if cur is None:
            summary[name] = [1, v, rank, v, rank, v if ok else 0.0, ok]
            continue
        n, lo, lo_rank, hi, hi_rank, total, finite = cur
        if v < lo or (v == lo and rank < lo_rank):
            lo, lo_rank = v, rank
        if v > hi or (v == hi and rank < hi_rank):
            hi, hi_rank = v, rank
        summary[name] = [n + 1, lo, lo_rank, hi, hi_rank, total + (v if ok else 0.0), finite and ok]


def _bit(bitmap: str, rank: int) -> str:
    """`bitmap` (hex, rank 0 = lowest bit) with `rank` set."""
    return format(int(bitmap or "0", 16) | (1 << rank), "x")


def _count(entry: list[Any]) -> int:
    """Ranks that reported a pending step (exact: its rank map; summarised: its bitmap)."""
    return len(entry[2]) if isinstance(entry[2], dict) else int(entry[2] or "0", 16).bit_count()


class CrossRankParams(RuleParams):
    rank_timeout: float = Field(
        60.0, gt=0.0, description="seconds (record ts) to wait for a missing rank before comparing without it"
    )
    max_pending_steps: int = Field(
        16, ge=1, le=256, description="incomplete steps kept per job (ranks' records arrive in bursts)"
    )
    max_exact_ranks: int = Field(
        64,
        ge=2,
        le=1024,
        description="jobs with more ranks keep per-name extremes of a step, not every rank's values",
    )


class CrossRankState(TypedDict):
    """A cross-rank rule's job-level state (see CrossRankRule)."""

    #: "<mode>|<step>" -> [first publish time, world, {rank: values} or a hex bitmap of the ranks
    #: (+ each name's extremes)] of the steps waiting for ranks
    p: dict[str, list[Any]]
    d: dict[str, int]  # mode -> newest compared step
    c: dict[str, Any]  # the subclass's own state (a subclass's State narrows it)
    on: NotRequired[bool]  # whether the last finding returned was firing


class CrossRankRule(Rule):
    """Base of rules that compare the ranks of a job at the same step.

    Subclasses implement `values(record)` (the numbers of one rank's record the rule compares)
    and `compare(state, step)` (a finding about one assembled step). Their Params must extend
    `CrossRankParams`. State: {"p": {"<mode>|<step>": [first ts, world, {rank: values}]} (a job of
    more than `max_exact_ranks` ranks: [first ts, world, hex bitmap of the ranks, {name: extremes}]),
    "d": {mode: newest compared step}, "c": the subclass's own state, "on": whether the last finding
    returned was firing}; "p" holds at most
    `max_pending_steps` entries (+1 while a record is being added). Jobs with world 1 keep nothing.
    """

    kind: ClassVar[RuleKind] = RuleKind.CROSS_RANK
    Params: ClassVar[type[RuleParams]] = CrossRankParams
    State = CrossRankState

    def initialize(self) -> State:
        return {"p": {}, "d": {}, "c": self.initialize_compare()}

    def initialize_compare(self) -> State:
        """The subclass's own state (kept under "c")."""
        return {}

    def values(self, record: StepRecord) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__}.values")

    def compare(self, state: State, step: AssembledStep) -> tuple[State, Finding | None]:
        raise NotImplementedError(f"{type(self).__name__}.compare")

    def compare_extremes(self, state: State, step: SummarisedStep) -> tuple[State, Finding | None]:
        """`compare` for a job of more than `max_exact_ranks` ranks (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__}.compare_extremes")

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        if record.world <= 1:
            return state, None
        params: Any = self.params
        pending: dict[str, Any] = dict(state.get("p", {}))
        done: dict[str, int] = dict(state.get("d", {}))
        mode, step = record.mode, record.step
        last = done.get(mode)
        if last is not None and step <= last:
            return state, None  # that step was compared already
        key = f"{mode}|{step}"
        entry = pending.get(key)
        large = record.world > params.max_exact_ranks
        if entry is None:
            entry = [record.ts, record.world, "0" if large else {}] + ([{}] if large else [])
        else:
            entry = [min(entry[0], record.ts), max(entry[1], record.world), *entry[2:]]
        if isinstance(entry[2], dict):
            entry[2] = {**entry[2], str(record.rank): self.values(record)}
        elif not int(entry[2], 16) >> record.rank & 1:  # a rank's second record of a step counts once
            entry[2] = _bit(entry[2], record.rank)
            entry[3] = {k: list(v) for k, v in entry[3].items()}
            _absorb(entry[3], record.rank, self.values(record))
        pending[key] = entry

        ready = _ready(pending, mode, step, record.ts, params.rank_timeout, params.max_pending_steps)
        cstate: State = state.get("c", {})
        on = bool(state.get("on", False))
        chosen: Finding | None = None
        for k in ready:
            entry = pending.pop(k)
            ts, world, ranks = entry[:3]
            m, _, s = k.partition("|")
            done[m] = max(int(s), done.get(m, -1))
            if isinstance(ranks, dict):
                assembled = AssembledStep(int(s), m, int(world), float(ts), {int(r): v for r, v in ranks.items()})
                cstate, finding = self.compare(cstate, assembled)
            else:
                bits = int(ranks, 16)
                summarised = SummarisedStep(
                    int(s),
                    m,
                    int(world),
                    float(ts),
                    bits.bit_count(),
                    [r for r in range(int(world)) if not bits >> r & 1],
                    {name: Extremes(*v) for name, v in entry[3].items()},
                )
                cstate, finding = self.compare_extremes(cstate, summarised)
            if finding is None:
                continue
            # Report the first change of firing state among the compared steps, else the last finding.
            if chosen is None or chosen.firing == on:
                chosen = finding
        # Steps of this mode at or before a compared step can no longer complete: drop them.
        for k in [k for k in pending if _mode_step(k)[1] <= done.get(_mode_step(k)[0], -1)]:
            del pending[k]
        if chosen is not None:
            on = chosen.firing
        return {"p": pending, "d": done, "c": cstate, "on": on}, chosen


def _mode_step(key: str) -> tuple[str, int]:
    mode, _, step = key.partition("|")
    return mode, int(step)


def _ready(
    pending: dict[str, Any], mode: str, step: int, now_ts: float, timeout: float, max_pending: int
) -> list[str]:
    """Keys of the pending steps to compare now, oldest first (see the module docstring)."""
    out: set[str] = set()
    complete = [k for k, entry in pending.items() if _count(entry) >= entry[1]]
    for k in complete:
        m, s = _mode_step(k)
        out.add(k)
        out.update(o for o in pending if _mode_step(o)[0] == m and _mode_step(o)[1] < s)
    for k, entry in pending.items():
        ts = entry[0]
        m, s = _mode_step(k)
        if m == mode and s < step and now_ts - ts > timeout:
            out.add(k)
    rest = sorted((k for k in pending if k not in out), key=lambda k: (pending[k][0], _mode_step(k)[1]))
    overflow = len(rest) - max_pending
    if overflow > 0:
        out.update(rest[:overflow])
    return sorted(out, key=lambda k: (_mode_step(k)[1], pending[k][0], k))
