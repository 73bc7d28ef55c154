"""The ExplodingTensor alert names the job's first non-finite value across ranks (rank, tensor, step)."""

from __future__ import annotations

import json
import math

from tensorpulse.events import AlertEvent
from tensorpulse.rules import ExplodingTensor
from tensorpulse.rules.config import RuleSpec
from tensorpulse.rules.testing import make_record, make_stats
from tensorpulse.stream.evaluator import JobEvaluator


def _rec(rank: int, step: int, ts: float, bad: tuple[str, ...] = (), mode: str = "train"):
    names = ("fc1.weight", "gradient/fc1.weight", "gradient/fc2.weight")
    tensors = [
        make_stats(
            n, "gradients" if n.startswith("gradient") else "weights", [math.nan if n in bad else 1.0, 2.0]
        )
        for n in names
    ]
    r = make_record(step, rank=rank, mode=mode, tensors=tensors, scalars={"loss": 0.5})
    return r.__class__(**{**{f: getattr(r, f) for f in r.__slots__}, "ts": ts, "world": 2})


def _events(records) -> tuple[dict, list[AlertEvent]]:
    ev = JobEvaluator([RuleSpec("ExplodingTensor", ExplodingTensor(), None, "critical", "none")])
    state, out = None, []
    for r in records:
        state, trs = ev.process(state, r, now=r.ts + 0.1)
        state = json.loads(json.dumps(state))  # as the changelog would
        out += [t.event for t in trs]
    return state, out


def test_first_nonfinite_across_ranks_arriving_out_of_order() -> None:
    """Rank 0 fires first at step 163; rank 1's earlier step 161 arrives later and its alert names it."""
    _, events = _events(
        [
            _rec(0, 160, 10.0),
            _rec(1, 160, 10.0),
            _rec(0, 163, 13.0, bad=("gradient/fc2.weight",)),
            _rec(1, 161, 11.0, bad=("gradient/fc2.weight", "gradient/fc1.weight")),
        ]
    )
    firing = [e for e in events if e.status == "firing"]
    assert [(e.rank, e.step) for e in firing] == [(0, 163), (1, 161)]
    assert firing[0].details["first_nonfinite"]["step"] == 163
    first = firing[1].details["first_nonfinite"]
    # within a record the first in tensor order wins: fc1's gradient precedes fc2's
    assert (first["rank"], first["tensor"], first["step"], first["mode"]) == (
        1,
        "gradient/fc1.weight",
        161,
        "train",
    )
    assert firing[1].message.endswith("first non-finite: rank 1, gradient/fc1.weight, step 161")


def test_ties_break_on_ts_then_tensor_order_then_rank() -> None:
    """Same step: a rank whose first offender is a weight wins, then the earlier ts; same step and ts: the
    earlier tensor, then the lower rank."""
    _, events = _events(
        [_rec(1, 5, 2.0, bad=("gradient/fc1.weight",)), _rec(0, 5, 1.0, bad=("gradient/fc2.weight",))]
    )
    assert events[-1].details["first_nonfinite"]["rank"] == 0  # ts 1.0 < 2.0
    # a weight non-finite before the step's forward pass (FSDP2: one rank's shard) precedes any rank's
    # gradients of that step, whichever record came first
    _, events = _events([_rec(1, 5, 2.0, bad=("fc1.weight",)), _rec(0, 5, 1.0, bad=("gradient/fc2.weight",))])
    assert events[-1].details["first_nonfinite"]["rank"] == 1
    _, events = _events(
        [_rec(0, 5, 1.0, bad=("gradient/fc2.weight",)), _rec(1, 5, 1.0, bad=("gradient/fc1.weight",))]
    )
    assert events[-1].details["first_nonfinite"]["tensor"] == "gradient/fc1.weight"
    _, events = _events([_rec(1, 5, 1.0, bad=("fc1.weight",)), _rec(0, 5, 1.0, bad=("fc1.weight",))])
    assert events[-1].details["first_nonfinite"]["rank"] == 0


def test_first_is_kept_once_and_per_mode() -> None:
    """Later non-finite steps do not move the first; another mode has its own; the state stays small."""
    recs = [_rec(0, s, float(s), bad=("fc1.weight",) if s % 2 else ()) for s in range(1, 401)]  # ends healthy
    recs.append(_rec(0, 2, 500.0, bad=("gradient/fc2.weight",), mode="eval"))
    state, events = _events(recs)
    train = [e for e in events if e.status == "firing" and e.mode == "train"]
    assert {e.details["first_nonfinite"]["step"] for e in train} == {1}
    evals = [e for e in events if e.mode == "eval"]
    assert evals[0].details["first_nonfinite"] == {
        "rank": 0,
        "tensor": "gradient/fc2.weight",
        "step": 2,
        "mode": "eval",
        "ts": 500.0,
    }
    assert len(json.dumps(state)) < 300


def test_details_travel_in_json_but_not_in_the_id() -> None:
    """details round-trip through the alert JSON; the id depends only on the transition."""
    _, events = _events([_rec(0, 7, 1.0, bad=("fc1.weight",))])
    e = events[0]
    back = AlertEvent.from_json(e.to_json())
    assert back.details == e.details and back.id == e.id
    bare = AlertEvent(**{**e.to_dict(), "details": None, "id": ""})
    assert bare.id == e.id
    assert (
        AlertEvent.from_json(json.dumps({k: v for k, v in e.to_dict().items() if k != "details"})).details
        is None
    )
    resolved = _events([_rec(0, 7, 1.0, bad=("fc1.weight",)), _rec(0, 8, 2.0)])[1][-1]
    assert resolved.status == "resolved" and resolved.details is None
