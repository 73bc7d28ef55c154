"""JobEvaluator: rules per rank, alerts only on transitions, JSON-serialisable state."""

from __future__ import annotations

import json

from tensorpulse.rules.base import Finding, Rule, RuleParams
from tensorpulse.rules.config import RuleSpec
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.wire import StepRecord


class LossAbove(Rule):
    """Test rule: fires while the loss is above a threshold; skips odd steps (returns None)."""

    name = "LossAbove"

    class Params(RuleParams):
        threshold: float = 1.0

    def initialize(self):
        return {"checks": 0}

    def update(self, state, record):
        if record.step % 2:
            return state, None
        state["checks"] += 1
        loss = record.scalars["loss"]
        return state, Finding(loss > self.params.threshold, value=loss, threshold=self.params.threshold)


def _rec(step: int, loss: float, rank: int = 0, mode: str = "train", kind: str = "step") -> StepRecord:
    return StepRecord("job", rank, 2, step, mode, 1.0, kind=kind, scalars={"loss": loss})


def _evaluator(action: str = "none") -> JobEvaluator:
    return JobEvaluator([RuleSpec("loss-high", LossAbove(threshold=1.0), None, "critical", action)])


def test_alerts_only_on_transitions() -> None:
    """Firing is reported once, resolved once; steady states and None findings say nothing."""
    ev = _evaluator()
    state, events = None, []
    for step, loss in enumerate([0.5, 2.0, 3.0, 3.0, 3.0, 5.0, 0.1, 0.1, 0.1, 9.0, 9.0]):
        state, out = ev.process(state, _rec(step, loss), now=10.0)
        events += [(t.event.status, t.event.step) for t in out]
    # step 1 (2.0) and 9 (9.0) are odd: skipped by the rule, so firing starts at 2 and again at 10.
    assert events == [("firing", 2), ("resolved", 6), ("firing", 10)]


def test_ranks_are_evaluated_separately() -> None:
    """A sick rank fires on its own; the healthy rank neither masks nor resolves it."""
    ev = _evaluator()
    state = None
    state, a = ev.process(state, _rec(0, 5.0, rank=1))
    state, b = ev.process(state, _rec(0, 0.1, rank=0))
    assert [(t.event.rank, t.event.status) for t in a] == [(1, "firing")] and b == []
    assert JobEvaluator.firing(state) == [("loss-high", 1)]


def test_state_is_json_and_resumes() -> None:
    """State round-trips through JSON (the changelog) and evaluation continues identically."""
    ev = _evaluator()
    state, _ = ev.process(None, _rec(0, 5.0))
    state = json.loads(json.dumps(state))
    state, out = ev.process(state, _rec(2, 5.0))
    assert out == [], "re-fired after a state round trip"
    state, out = ev.process(state, _rec(4, 0.0))
    assert [t.event.status for t in out] == ["resolved"]


def test_firing_event_carries_action_and_latency_fields() -> None:
    """The event names the rule's action and the record's publish time."""
    ev = _evaluator(action="stop")
    _, out = ev.process(None, _rec(0, 5.0), now=3.0)
    e = out[0].event
    assert out[0].action == "stop" and e.action == "stop" and e.publish_ts == 1.0 and e.ts == 3.0
    assert e.severity == "critical" and e.value == 5.0 and e.threshold == 1.0


def test_end_records_and_other_modes_are_ignored() -> None:
    """End records and modes a rule does not watch reach no rule."""
    ev = _evaluator()
    state, out = ev.process(None, _rec(0, 5.0, kind="end"))
    state, out2 = ev.process(state, _rec(0, 5.0, mode="eval"))
    assert out == [] and out2 == [] and state == {"r": {}}


class Broken(Rule):
    """Test rule: raises on odd steps."""

    name = "Broken"

    def update(self, state, record):
        if record.step % 2:
            raise ZeroDivisionError("boom")
        return state, None


def test_a_failing_rule_is_reset_and_reported_while_others_go_on() -> None:
    """One rule raising does not stop the other rules; the error is handed to the callback."""
    ev = JobEvaluator(
        [
            RuleSpec("broken", Broken(), None, "warning", "none"),
            RuleSpec("loss-high", LossAbove(threshold=1.0), None, "critical", "none"),
        ]
    )
    errors = []
    state, out = ev.process(None, _rec(0, 5.0), on_rule_error=lambda *a: errors.append(a[0]))
    state, out2 = ev.process(state, _rec(1, 5.0), on_rule_error=lambda *a: errors.append(a[0]))
    assert [t.event.rule for t in out] == ["loss-high"] and errors == ["broken"]
