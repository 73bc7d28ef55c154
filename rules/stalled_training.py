"""StalledTrainingRule: no record has arrived from a job for too long."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.wire import MODES, StepRecord

from .base import Finding, Rule, RuleKind, RuleParams, State


class StalledTrainingRuleParams(RuleParams):
    threshold: float = Field(1800.0, gt=0.0, description="seconds without a record")


class StalledTrainingRule(Rule):
    """Fires when no record has been published for more than `threshold` seconds.

    Our definition: every step record of any mode is a sign of life. `update` remembers the
    newest publish time seen (record.ts, the hook's clock; an older record arriving late does not
    move it back) and the step and mode of that record, and returns a non-firing Finding whose
    value is the gap in seconds since the previously newest record (None for the first record),
    threshold = `threshold`: a record arriving resolves a firing alert. The stream layer calls
    `check_idle(state, now)` periodically (this is a `clock` rule); it fires when
    now − newest ts > threshold, with value = that idle time, and otherwise returns a non-firing
    Finding; before any record it returns None. Because the stream layer keeps rule state per
    rank, a stalled rank is reported even when other ranks still publish. The comparison uses
    the hook's clock against the worker's, so both must be synchronised (NTP) to well within
    `threshold`. The rule never sees a rank's "end" record: after a job ends, whoever calls
    check_idle must stop calling it (or drop the state), or a finished job would look stalled.
    The state is three numbers and a mode.
    The hook only needs to keep publishing records (their publish time, ts).
    """

    name: ClassVar[str] = "StalledTrainingRule"
    Params: ClassVar[type[RuleParams]] = StalledTrainingRuleParams
    modes: ClassVar[frozenset[str]] = frozenset(MODES)
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "nothing but the records' publish times (ts)"
    kind: ClassVar[RuleKind] = RuleKind.CLOCK

    class State(TypedDict):
        ts: float | None  # the newest publish time seen
        step: int | None  # and its step and mode
        mode: str | None

    def initialize(self) -> State:
        return {"ts": None, "step": None, "mode": None}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        last = state["ts"]
        gap = None if last is None else max(record.ts - last, 0.0)
        if last is None or record.ts > last:
            state = {"ts": record.ts, "step": record.step, "mode": record.mode}
        return state, Finding(False, value=gap, threshold=self.params.threshold)

    def batch_reference(self, records: Sequence[StepRecord]) -> list[Finding | None]:
        """`update`'s findings over the run at once: each gap to the running maximum of the ts before it."""
        ts = np.array([r.ts for r in records], dtype=np.float64)
        if not ts.size:
            return []
        newest = np.maximum.accumulate(ts)
        gaps = np.maximum(ts[1:] - newest[:-1], 0.0)
        threshold = self.params.threshold
        return [Finding(False, None, threshold)] + [Finding(False, float(g), threshold) for g in gaps]

    def check_idle(self, state: State, now: float) -> tuple[State, Finding | None]:
        last = state["ts"]
        if last is None:
            return state, None
        idle = now - last
        threshold = self.params.threshold
        if idle <= threshold:
            return state, Finding(False, value=idle, threshold=threshold)
        return state, Finding(
            True,
            value=idle,
            threshold=threshold,
            message=(
                f"no record for {idle:.0f} s (threshold {threshold:g} s); the last was {state['mode']} "
                f"step {state['step']}"
            ),
        )
