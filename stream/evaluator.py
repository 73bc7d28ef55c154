"""The engine-agnostic core of a worker: rules over one job's records, transitions into alerts.

Nothing here knows about Kafka or Quix: a runner hands in each decoded record with the job's
state (a plain, JSON-serialisable dict) and gets back the new state and the alert events to
publish. The stream worker, `tensorpulse replay` and the tests all drive this same class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tensorpulse.events import AlertEvent
from tensorpulse.rules.base import Finding
from tensorpulse.rules.config import RuleSpec
from tensorpulse.wire import StepRecord

JobState = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Transition:
    """An alert event plus the action its rule asks for (published on the control topic)."""

    event: AlertEvent
    action: str


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None else float(x)


class JobEvaluator:
    """Evaluates a fixed list of rule specs per rank; emits an event only when a rule's state flips.

    State layout: {"r": {"<rule name>|<rank>": {"s": rule state, "f": firing, "n": steps seen}}}.
    Per-rank evaluation keeps a healthy rank from masking a sick one (and vice versa).
    """

    def __init__(self, specs: Sequence[RuleSpec]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate rule names in {names}")
        self.specs = tuple(specs)

    def initialize(self) -> JobState:
        return {"r": {}}

    def process(
        self,
        state: JobState | None,
        record: StepRecord,
        *,
        now: float | None = None,
        on_rule_error: Callable[[str, StepRecord, Exception], None] | None = None,
    ) -> tuple[JobState, list[Transition]]:
        """Feed one record to every rule; a rule that raises is reset (and reported), the others go on."""
        state = self.initialize() if state is None else state
        if record.kind != "step":
            return state, []
        now = time.time() if now is None else now
        rule_states: dict[str, Any] = state.setdefault("r", {})
        out: list[Transition] = []
        for spec in self.specs:
            rule = spec.rule
            if record.mode not in rule.modes:
                continue
            key = f"{spec.name}|{record.rank}"
            slot = rule_states.get(key)
            if slot is None:
                slot = rule_states[key] = {"s": rule.initialize(), "f": False}
            try:
                new_state, finding = rule.update(slot["s"], record)
            except Exception as exc:
                slot["s"] = rule.initialize()
                if on_rule_error is None:
                    raise
                on_rule_error(spec.name, record, exc)
                continue
            slot["s"] = new_state
            if finding is None or finding.firing == slot["f"]:
                continue
            slot["f"] = finding.firing
            out.append(
                Transition(self._event(spec, record, finding, now), spec.action if finding.firing else "none")
            )
        return state, out

    @staticmethod
    def firing(state: JobState) -> list[tuple[str, int]]:
        """(rule name, rank) pairs that are firing in `state`."""
        out = []
        for key, slot in state.get("r", {}).items():
            if slot.get("f"):
                name, _, rank = key.rpartition("|")
                out.append((name, int(rank)))
        return sorted(out)

    @staticmethod
    def _event(spec: RuleSpec, record: StepRecord, finding: Finding, now: float) -> AlertEvent:
        value = _finite_or_none(finding.value)
        threshold = _finite_or_none(finding.threshold)
        message = finding.message or (f"{spec.name} resolved" if not finding.firing else f"{spec.name} fired")
        if value is not None and math.isnan(value) and not finding.firing:
            value = None
        return AlertEvent(
            job=record.job,
            rule=spec.name,
            status="firing" if finding.firing else "resolved",
            step=record.step,
            mode=record.mode,
            severity=spec.severity,
            rank=record.rank,
            tensors=tuple(finding.tensors),
            value=value,
            threshold=threshold,
            message=message,
            action=spec.action if finding.firing else "none",
            ts=now,
            publish_ts=record.ts,
        )
