"""JobEvaluator with cross-rank rules: one job-level slot fed by every rank, events at the assembled step."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest

from tensorpulse.replay import replay
from tensorpulse.rules import RankDivergence
from tensorpulse.rules.base import Finding, Rule
from tensorpulse.rules.config import RuleSpec
from tensorpulse.rules.testing import make_stats
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.wire import StepRecord, encode


class RanksSeen(Rule):
    """Test rule: counts the records it sees and the distinct ranks among them; fires at 2+ ranks."""

    name = "RanksSeen"
    per_rank: ClassVar[bool] = False

    def initialize(self):
        return {"records": 0, "ranks": []}

    def update(self, state, record):
        ranks = sorted({*state["ranks"], record.rank})
        new = {"records": state["records"] + 1, "ranks": ranks}
        return new, Finding(len(ranks) >= 2, value=float(len(ranks)))


class PerRankCount(Rule):
    """Test rule: counts records per slot; never fires."""

    name = "PerRankCount"

    def initialize(self):
        return {"records": 0}

    def update(self, state, record):
        return {"records": state["records"] + 1}, None


def rec(step: int, rank: int, act: float = 0.5, world: int = 2, ts: float | None = None) -> StepRecord:
    return StepRecord(
        "job",
        rank,
        world,
        step,
        "train",
        float(step) + 0.1 * rank if ts is None else ts,
        tensors=(make_stats("fc/relu_output", "activations", np.full((2, 4), act)),),
        scalars={"loss": 1.0},
    )


def divergence(**params) -> JobEvaluator:
    return JobEvaluator([RuleSpec("RankDivergence", RankDivergence(**params), None, "warning", "stop")])


def test_cross_rank_rule_has_one_slot_that_sees_every_rank() -> None:
    """A per_rank=False rule keeps "<name>|*" and sees both ranks; a per-rank rule keeps one slot per rank."""
    ev = JobEvaluator(
        [
            RuleSpec("seen", RanksSeen(), None, "info", "none"),
            RuleSpec("count", PerRankCount(), None, "info", "none"),
        ]
    )
    state = None
    for step in range(3):
        for rank in (0, 1):
            state, _ = ev.process(state, rec(step, rank))
    assert sorted(state["r"]) == ["count|0", "count|1", "seen|*"]
    assert state["r"]["seen|*"]["s"] == {"records": 6, "ranks": [0, 1]}
    assert state["r"]["count|1"]["s"] == {"records": 3}
    assert JobEvaluator.firing(state) == [("seen", 1)]


def test_event_names_the_assembled_step_outlier_rank_and_first_ts() -> None:
    """The firing event names the compared step, the outlier rank and the step's earliest record ts."""
    ev = divergence(patience=1)
    state, events = None, []
    for step in range(4):
        for rank in (1, 0):  # rank 0 completes each step
            act = 40.0 if (rank == 1 and step >= 2) else 0.5
            # rank 0 arrives last but created its record first: the step's ts is rank 0's
            state, out = ev.process(state, rec(step, rank, act=act, ts=step + 0.2 * (rank + 1)), now=99.0)
            events += out
    assert len(events) == 1
    tr = events[0]
    e = tr.event
    assert (e.status, e.step, e.rank, e.mode) == ("firing", 2, 1, "train")
    assert e.publish_ts == pytest.approx(2.2)  # the step's earliest record ts (rank 0's)
    assert tr.action == "stop" and e.tensors == ("fc/relu_output",) and e.value == pytest.approx(80.0)
    assert JobEvaluator.firing(state) == [("RankDivergence", 1)]


def test_resolved_event_names_the_rank_that_fired() -> None:
    """Resolution comes at the first agreeing step and names the rank of the firing alert (its metric series)."""
    ev = divergence(patience=1)
    state, events = None, []
    acts = {0: [0.5, 40.0, 0.5], 1: [0.5, 0.5, 0.5]}  # rank 0 diverges at step 1 only
    for step in range(3):
        for rank in (0, 1):
            state, out = ev.process(state, rec(step, rank, act=acts[rank][step]))
            events += [t.event for t in out]
    assert [(e.status, e.step, e.rank) for e in events] == [("firing", 1, 0), ("resolved", 2, 0)]
    assert JobEvaluator.firing(state) == []


def test_state_round_trip_and_per_rank_rules_alongside() -> None:
    """The job slot's state survives JSON between every record; per-rank rules are unaffected by it."""
    specs = [
        RuleSpec("RankDivergence", RankDivergence(patience=2), None, "warning", "none"),
        RuleSpec("count", PerRankCount(), None, "info", "none"),
    ]
    records = [rec(s, r, act=30.0 if (r == 1 and s >= 3) else 0.5) for s in range(8) for r in (0, 1)]
    plain, tripped = JobEvaluator(specs), JobEvaluator(specs)
    a = b = None
    got_a, got_b = [], []
    for r in records:
        a, out_a = plain.process(a, r, now=1.0)
        b, out_b = tripped.process(b, r, now=1.0)
        b = json.loads(json.dumps(b))
        got_a += [t.event.id for t in out_a]
        got_b += [t.event.id for t in out_b]
    assert got_a == got_b and len(got_a) == 1
    assert b["r"]["count|0"]["s"] == {"records": 8}


def test_failing_cross_rank_rule_is_reset_and_reported() -> None:
    """A job-level rule that raises is reset; the error handler gets the record; other rules go on."""

    class Boom(RanksSeen):
        name = "Boom"

        def update(self, state, record):
            if record.rank == 1:
                raise RuntimeError("bad record")
            return super().update(state, record)

    errors = []
    ev = JobEvaluator(
        [RuleSpec("boom", Boom(), None, "info", "none"), RuleSpec("seen", RanksSeen(), None, "info", "none")]
    )
    state, _ = ev.process(None, rec(0, 0))
    state, out = ev.process(state, rec(0, 1), on_rule_error=lambda n, r, e: errors.append((n, r.rank)))
    assert errors == [("boom", 1)] and state["r"]["boom|*"]["s"] == {"records": 0, "ranks": []}
    assert [t.event.rule for t in out] == ["seen"]


def test_a_cross_rank_rule_cannot_be_a_clock_rule() -> None:
    """Declaring per_rank=False together with clock=True is refused when the class is defined (one kind)."""
    with pytest.raises(TypeError, match="cross-rank rule cannot also be a clock"):

        class Both(RanksSeen):
            name = "Both"
            clock = True


def test_replay_of_wire_records_fires_the_same_alert() -> None:
    """tensorpulse replay drives the same evaluator: encoded records of two ranks give the alert at step 4."""
    payloads = []
    for step in range(8):
        for rank in (0, 1):
            act = 0.5 * (500.0 if (rank == 0 and step >= 4) else 1.0)
            payloads.append(_encoded(rec(step, rank, act=act)))
    specs = [RuleSpec("RankDivergence", RankDivergence(patience=1), None, "warning", "none")]
    result = replay(payloads, "job", specs)
    assert [(e.status, e.step, e.rank) for e in result.events] == [("firing", 4, 0)]


def _encoded(r: StepRecord) -> bytes:
    """The wire encoding of a test record with its one activation tensor."""
    from tensorpulse.wire import TensorBlock, schema_id

    t = r.tensors[0]
    floats = np.array([[t.mean, t.std, t.min, t.max, t.abs_mean]], dtype=np.float32)
    block = TensorBlock([t.name], [t.collection], np.array([t.n]), floats, np.array([t.zeros]))
    return encode(
        job=r.job,
        rank=r.rank,
        world=r.world,
        step=r.step,
        mode=r.mode,
        ts=r.ts,
        seq=r.step,
        scalars=dict(r.scalars),
        tensors=block,
        sid=schema_id(block.names, block.collections),
    )
