"""Clock rules in the evaluator and through the stream's job store: ticks between records, with fake times."""

from __future__ import annotations

import json

import pytest

from tensorpulse.rules import StalledTrainingRule
from tensorpulse.rules.base import Finding, Rule, RuleParams
from tensorpulse.rules.config import RuleSpec
from tensorpulse.stream.clock import clock_interval, housekeeping_interval, tick_horizon
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.stream.state import JobStore, MemoryStore
from tensorpulse.wire import MODES, StepRecord


class Quiet(Rule):
    """Test clock rule: fires when `now` is more than `threshold` after the newest record's ts."""

    name = "Quiet"
    clock = True
    modes = frozenset(MODES)

    class Params(RuleParams):
        threshold: float = 10.0

    def initialize(self):
        return {"ts": None}

    def update(self, state, record):
        ts = record.ts if state["ts"] is None else max(state["ts"], record.ts)
        return {"ts": ts}, Finding(False, value=0.0, threshold=self.params.threshold)

    def check_idle(self, state, now):
        if state["ts"] is None:
            return state, None
        idle = now - state["ts"]
        return state, Finding(idle > self.params.threshold, value=idle, threshold=self.params.threshold)


def _rec(step: int, ts: float, rank: int = 0, kind: str = "step", mode: str = "train") -> StepRecord:
    return StepRecord("job", rank, 2, step, mode, ts, kind=kind, scalars={"loss": 1.0})


def _ev(rule: Rule | None = None, action: str = "none") -> JobEvaluator:
    rule = rule or Quiet(threshold=10.0)
    return JobEvaluator([RuleSpec("quiet", rule, None, "warning", action)])


def _ticks(ev: JobEvaluator, state, times) -> list[tuple[float, str, int, int]]:
    out = []
    for now in times:
        state, trs = ev.check_idle(state, "job", now)
        out += [(now, t.event.status, t.event.rank, t.event.step) for t in trs]
    return out


def test_tick_fires_once_after_threshold_and_the_next_record_resolves() -> None:
    """A stall fires on the first tick past the threshold, once; the next record resolves it."""
    ev = _ev()
    state, _ = ev.process(None, _rec(7, 100.0), now=100.0)
    assert _ticks(ev, state, [105.0, 110.0, 110.5, 111.0, 130.0]) == [(110.5, "firing", 0, 7)]
    state, out = ev.process(state, _rec(8, 131.0), now=131.0)
    assert [(t.event.status, t.event.step) for t in out] == [("resolved", 8)]
    assert _ticks(ev, state, [135.0]) == []


def test_tick_event_names_the_last_record_and_keeps_a_stable_id() -> None:
    """The stall event carries the newest record's step, mode and ts; ticks of one stall share the id."""
    ev = _ev(action="stop")
    state, _ = ev.process(None, _rec(3, 50.0, mode="eval"), now=50.0)
    state, _ = ev.process(state, _rec(2, 40.0, mode="train"), now=51.0)  # older record, late
    s1, first = ev.check_idle(json.loads(json.dumps(state)), "job", 70.0)
    s2, again = ev.check_idle(json.loads(json.dumps(state)), "job", 99.0)
    e1, e2 = first[0].event, again[0].event
    assert (e1.step, e1.mode, e1.publish_ts, e1.ts, e1.value) == (3, "eval", 50.0, 70.0, 20.0)
    assert e1.id == e2.id and first[0].action == "stop" and e1.action == "stop"


def test_ranks_tick_separately() -> None:
    """A silent rank fires while another rank keeps publishing."""
    ev = _ev()
    state, _ = ev.process(None, _rec(1, 0.0, rank=0), now=0.0)
    state, _ = ev.process(state, _rec(1, 0.0, rank=1), now=0.0)
    state, _ = ev.process(state, _rec(2, 15.0, rank=1), now=15.0)
    assert _ticks(ev, state, [16.0]) == [(16.0, "firing", 0, 1)]
    assert JobEvaluator.firing(state) == [("quiet", 0)]


def test_end_record_stops_ticking_and_resolves_a_firing_rank() -> None:
    """A finished rank is not stalled: its end resolves a firing slot and later ticks say nothing."""
    ev = _ev()
    state, _ = ev.process(None, _rec(1, 0.0, rank=0), now=0.0)
    state, _ = ev.process(state, _rec(1, 0.0, rank=1), now=0.0)
    state, _ = ev.check_idle(state, "job", 20.0)  # both ranks fire
    state, out = ev.process(state, _rec(2, 21.0, rank=0, kind="end"), now=21.0)
    assert [(t.event.status, t.event.rank) for t in out] == [("resolved", 0)]
    assert "finished" in out[0].event.message
    assert _ticks(ev, state, [100.0]) == []  # rank 1 still firing, rank 0 finished: no transition
    state, out = ev.process(state, _rec(1, 22.0, rank=1, kind="end"), now=22.0)
    assert [(t.event.status, t.event.rank) for t in out] == [("resolved", 1)]
    assert all(slot.get("e") for slot in state["r"].values())  # every clock slot finished


def test_end_without_clock_rules_changes_nothing() -> None:
    """Without clock rules an end record leaves the state as it was."""
    ev = JobEvaluator([])
    state, out = ev.process(None, _rec(0, 1.0, kind="end"))
    assert out == [] and state == {"r": {}} and not ev.has_clock


def test_before_any_record_and_rule_errors() -> None:
    """No slot, no tick; a rule raising in check_idle is reset and reported, not propagated."""

    class Boom(Quiet):
        name = "Boom"

        def check_idle(self, state, now):
            raise RuntimeError("tick failed")

    ev = _ev(Boom())
    assert ev.check_idle(None, "job", 1e9)[1] == []
    state, _ = ev.process(None, _rec(0, 0.0), now=0.0)
    errors = []
    state, out = ev.check_idle(state, "job", 100.0, on_rule_error=lambda *a: errors.append(a[:2]))
    assert out == [] and errors == [("quiet", None)]
    with pytest.raises(RuntimeError):
        ev.check_idle(state, "job", 100.0)


def test_the_catalogue_stall_rule_through_the_evaluator() -> None:
    """StalledTrainingRule (clock = True) fires from a tick and resolves on the next record."""
    ev = _ev(StalledTrainingRule(threshold=5.0))
    state, _ = ev.process(None, _rec(10, 1000.0), now=1000.0)
    state, out = ev.check_idle(state, "job", 1006.0)
    assert [(t.event.status, t.event.step) for t in out] == [("firing", 10)]
    assert "step 10" in out[0].event.message
    state, out = ev.process(state, _rec(11, 1007.0), now=1007.0)
    assert [t.event.status for t in out] == ["resolved"]


def test_tick_through_the_store_fires_and_the_next_record_resolves() -> None:
    """The worker's path: records and ticks each load and save the job's entries; a tick's firing is
    stored, so the rank's next record resolves it (ticks and records share one state)."""
    ev = _ev()
    js = JobStore(MemoryStore(), ev.specs)
    for rank in (0, 1):
        js.add_rank(rank)
        state, _ = ev.process(js.load([rank]), StepRecord("job", rank, 2, 1, "train", 0.0), now=0.0)
        js.save(state, [rank])
    state = js.load(js.ranks(), groups=("clock",))
    state, fired = ev.check_idle(state, "job", 20.0)
    js.save(state, js.ranks(), groups=("clock",))
    assert sorted((t.event.rank, t.event.status) for t in fired) == [(0, "firing"), (1, "firing")]
    state, again = ev.check_idle(js.load(js.ranks(), groups=("clock",)), "job", 21.0)
    assert again == []  # already firing: the firing flag was stored
    state, out = ev.process(js.load([1]), StepRecord("job", 1, 2, 2, "train", 22.0), now=22.0)
    assert [(t.event.rank, t.event.status) for t in out] == [(1, "resolved")]


def test_tick_horizon_and_housekeeping() -> None:
    """Jobs are ticked long enough for every clock rule to fire and for ended state to expire."""
    specs = [RuleSpec("q", Quiet(threshold=100.0), None, "warning", "none")]
    assert tick_horizon(specs, 3600.0) == 3660.0
    assert tick_horizon(specs, 10.0) == 260.0
    assert housekeeping_interval(3600.0) == 60.0 and housekeeping_interval(0.0) == 1.0


@pytest.mark.parametrize(
    ("thresholds", "expected"),
    [([], None), ([1800.0], 60.0), ([20.0], 2.0), ([0.01], 0.05), ([30.0, 3.0], 0.3), ([6000.0], 60.0)],
)
def test_clock_interval(thresholds: list[float], expected: float | None) -> None:
    """A tenth of the smallest threshold, within [0.05, 60] s; None without clock rules."""
    specs = [RuleSpec(f"q{i}", Quiet(threshold=t), None, "warning", "none") for i, t in enumerate(thresholds)]
    got = clock_interval(specs)
    assert got == pytest.approx(expected) if expected is not None else got is None
