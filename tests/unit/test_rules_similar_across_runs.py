"""SimilarAcrossRuns: two jobs' records interleaved, compared at the same step; the crossrun payload."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.errors import ConfigError
from tensorpulse.rules import REGISTRY, SimilarAcrossRuns
from tensorpulse.rules.config import RuleSpec, parse_rules
from tensorpulse.rules.testing import make_record, make_stats
from tensorpulse.stream.crossrun import crossrun_topic, forward_payload
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.wire import StepRecord


def _rec(job: str, step: int, *, diverge: float = 0.0, rank: int = 0, mode: str = "train") -> StepRecord:
    """A step of a deterministic run; `diverge` shifts the gradient's values (a different run)."""
    rng = np.random.default_rng(step)
    w = rng.normal(size=64)
    g = rng.normal(0, 0.01, size=64) + diverge
    return make_record(
        step,
        job=job,
        rank=rank,
        mode=mode,
        scalars={"loss": 1.0 / (step + 1) + diverge},
        tensors=[make_stats("fc.weight", "weights", w), make_stats("gradient/fc.weight", "gradients", g)],
    )


def _interleave(a: list, b: list, lag: int) -> list:
    """B runs `lag` records behind A: A0..A(lag-1), then A(lag) B0, A(lag+1) B1, ..."""
    out = list(a[:lag])
    for i in range(max(len(a), len(b))):
        if i + lag < len(a):
            out.append(a[i + lag])
        if i < len(b):
            out.append(b[i])
    return out


def _run(rule: SimilarAcrossRuns, records: list, job: str = "a", roundtrip: bool = True):
    """Feed records like the crossrun stream: own job's to update, the other's to update_other."""
    state, out = rule.initialize(), []
    for r in records:
        if r.job == job:
            state, finding = rule.update(state, r)
        else:
            state, finding = rule.update_other(state, r)
        if roundtrip:
            state = json.loads(json.dumps(state))
        if finding is not None:
            out.append((r.job, r.step, finding))
    return state, out


@pytest.mark.parametrize("lag", [0, 3, -3])
def test_identical_runs_never_fire(lag: int) -> None:
    """Two identically seeded runs, either one ahead, compare at every step and never fire."""
    a = [_rec("a", s) for s in range(30)]
    b = [_rec("b", s) for s in range(30)]
    records = _interleave(a, b, lag) if lag >= 0 else _interleave(b, a, -lag)
    _, out = _run(SimilarAcrossRuns(other_trials=["b"]), records)
    assert len(out) == 30 and not any(f.firing for _, _, f in out)


@pytest.mark.parametrize("lag", [0, 4, -4])
def test_divergence_fires_at_the_step_it_starts(lag: int) -> None:
    """B diverges from step 17: the first firing comparison is step 17, whichever side arrives second."""
    a = [_rec("a", s) for s in range(30)]
    b = [_rec("b", s, diverge=0.5 if s >= 17 else 0.0) for s in range(30)]
    records = _interleave(a, b, lag) if lag >= 0 else _interleave(b, a, -lag)
    _, out = _run(SimilarAcrossRuns(other_trials="^b$"), records)
    firing = [(s, f) for _, s, f in out if f.firing]
    assert min(s for s, _ in firing) == 17 and all(not f.firing for _, s, f in out if s < 17)
    f = firing[0][1]
    assert set(f.tensors) == {"gradient/fc.weight", "loss"} and f.value == 2.0
    assert "differs from job b at train step 17" in f.message


def test_resolves_when_runs_agree_again_and_ignores_unrelated_jobs() -> None:
    """A comparison that agrees again resolves; records of a job not in other_trials are ignored."""
    rule = SimilarAcrossRuns(other_trials=["b"])
    recs = [_rec("a", 0), _rec("b", 0, diverge=1.0), _rec("a", 1), _rec("b", 1)]
    _, out = _run(rule, recs)
    assert [(s, f.firing) for _, s, f in out] == [(0, True), (1, False)]
    assert (
        not rule.watches("c") and rule.watches("b") and not SimilarAcrossRuns(other_trials="^b").watches("ab")
    )


def test_tolerances_and_nan() -> None:
    """rtol/atol decide what differs; NaN on both sides is the same."""
    nan = make_stats("n", "weights", [1.0, math.nan])  # NaN statistics on both sides: the same
    base = make_record(0, job="a", tensors=[make_stats("w", "weights", [1.0, 2.0]), nan])
    near = make_record(0, job="b", tensors=[make_stats("w", "weights", [1.0, 2.0 + 1e-7]), nan])
    loose = SimilarAcrossRuns(other_trials=["b"], rtol=1e-3)
    strict = SimilarAcrossRuns(other_trials=["b"], rtol=0.0, atol=0.0)
    assert not _run(loose, [base, near])[1][0][2].firing
    assert _run(strict, [base, near])[1][0][2].firing
    assert not _run(strict, [base, base.__class__(**{**_fields(base), "job": "b"})])[1][0][2].firing


def _fields(r: StepRecord) -> dict:
    return {f: getattr(r, f) for f in r.__slots__}


def test_window_bounds_the_state_and_far_apart_runs_are_not_compared() -> None:
    """Each side keeps `window` steps; a run further behind than that is never compared."""
    rule = SimilarAcrossRuns(other_trials=["b"], window=5)
    a = [_rec("a", s) for s in range(40)]
    b = [_rec("b", s, diverge=1.0) for s in range(30)]  # 10 behind until A ends: never within 5 steps
    state, out = _run(rule, _interleave(a, b, 10))
    assert out == []
    assert len(state["a"]) == 5 and len(state["b"]["b"]) == 5
    small, _ = _run(rule, _interleave(a[:10], b[:10], 10))
    assert len(json.dumps(state)) <= len(json.dumps(small)) * 1.2


def test_selection_and_bad_params() -> None:
    """collection_names and tensor_regex pick what is compared; bad parameters are ConfigErrors."""
    r = _rec("a", 1)
    assert set(SimilarAcrossRuns(other_trials=["b"]).fingerprints(r)) == {
        "fc.weight",
        "gradient/fc.weight",
        "loss",
    }
    assert set(SimilarAcrossRuns(other_trials=["b"], collection_names=["weights"]).fingerprints(r)) == {
        "fc.weight"
    }
    assert set(SimilarAcrossRuns(other_trials=["b"], tensor_regex="^gradient").fingerprints(r)) == {
        "gradient/fc.weight"
    }
    with pytest.raises(ConfigError, match="other_trials"):
        SimilarAcrossRuns(other_trials=[])
    with pytest.raises(ConfigError, match="other_trials"):
        SimilarAcrossRuns(other_trials="(")
    with pytest.raises(ConfigError, match="invalid parameters"):
        SimilarAcrossRuns()
    assert REGISTRY["SimilarAcrossRuns"] is SimilarAcrossRuns


def test_evaluator_routes_both_jobs_per_rank() -> None:
    """process() takes the job's own records, process_other() the other job's; events are about the job."""
    ev = JobEvaluator([RuleSpec("same", SimilarAcrossRuns(other_trials=["b"]), None, "warning", "stop")])
    state, events = None, []
    for step in range(6):
        for rank in (0, 1):
            diverge = 1.0 if (rank == 1 and step >= 3) else 0.0
            state, out = ev.process(state, _rec("a", step, rank=rank), now=1.0)
            events += out
            state, out = ev.process_other(state, "a", _rec("b", step, rank=rank, diverge=diverge), now=1.0)
            events += out
            state = json.loads(json.dumps(state))
    assert [(t.event.job, t.event.rank, t.event.step, t.event.status, t.action) for t in events] == [
        ("a", 1, 3, "firing", "stop")
    ]
    _, none = ev.process_other(state, "a", _rec("c", 9), now=1.0)
    _, own = ev.process_other(state, "a", _rec("a", 9), now=1.0)
    assert (
        none == [] and own == [] and [s.name for s in ev.watches("b")] == ["same"] and ev.watches("c") == []
    )


def test_rules_file_and_forwarded_payload() -> None:
    """The rule loads from a rules file; the crossrun payload decodes alone and keeps what is compared."""
    specs = parse_rules(
        "defaults: false\nrules:\n  - rule: SimilarAcrossRuns\n    jobs: '^a$'\n"
        "    params: {other_trials: [b], collection_names: [gradients], atol: 1.0e-6}\n"
    )
    assert [s.name for s in specs] == ["SimilarAcrossRuns"] and specs[0].rule.params.atol == 1e-6
    record = _rec("b", 5)
    payload = forward_payload(record, specs)
    assert payload is not None
    back = wire.decode(payload)
    assert [t.name for t in back.tensors] == ["gradient/fc.weight"] and back.scalars == {}
    rule = specs[0].rule
    sent, got = rule.fingerprints(record), rule.fingerprints(back)
    assert list(got) == list(sent) and got["gradient/fc.weight"] == pytest.approx(
        sent["gradient/fc.weight"], rel=1e-6
    )
    assert (back.job, back.step, back.rank, back.ts) == ("b", 5, 0, 5.0)
    assert forward_payload(make_record(1, job="b", scalars={"loss": 1.0}), specs) is None
    assert crossrun_topic("my group/1") == "tensorpulse.crossrun.my-group-1"
