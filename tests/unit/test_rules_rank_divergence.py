"""RankDivergence and the cross-rank step assembly it runs on (tensorpulse.rules.cross_rank)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import REGISTRY, RankDivergence, default_rules
from tensorpulse.rules.cross_rank import RankedFinding
from tensorpulse.rules.testing import make_stats, replay, state_size
from tensorpulse.wire import StepRecord

ACT = "fc1/relu_output"


def rec(
    step: int,
    rank: int,
    world: int,
    act: float = 0.5,
    loss: float = 1.0,
    *,
    ts: float | None = None,
    mode: str = "train",
    extra: dict[str, float] | None = None,
) -> StepRecord:
    """One rank's record whose activation has mean |x| = `act` (and a gradient, which is not compared)."""
    tensors = (
        make_stats(ACT, "activations", np.full((4, 8), act)),
        make_stats("gradient/fc1.weight", "gradients", np.full(8, 100.0 * (rank + 1))),
    )
    return StepRecord(
        "job",
        rank,
        world,
        step,
        mode,
        float(step) if ts is None else ts,
        tensors=tensors,
        scalars={"loss": loss, "lr": 0.1, **(extra or {})},
    )


def run(rule: RankDivergence, records: list[StepRecord]) -> list[tuple[int, RankedFinding]]:
    """(step evaluated, finding) for every finding, the state JSON round-tripped after every record."""
    state = rule.initialize()
    out = []
    for r in records:
        state, finding = rule.update(state, r)
        state = json.loads(json.dumps(state))
        if finding is not None:
            assert isinstance(finding, RankedFinding)
            out.append((finding.step, finding))
    return out


def two_ranks(steps: int, bad_from: int | None = None, factor: float = 1000.0) -> list[StepRecord]:
    """Two ranks in lockstep; rank 1's activation is `factor` times larger from step `bad_from`."""
    out = []
    for s in range(steps):
        for r in (0, 1):
            bad = r == 1 and bad_from is not None and s >= bad_from
            out.append(rec(s, r, 2, act=(0.5 + 0.01 * s) * (factor if bad else 1.0), loss=1.0 + 0.1 * r))
    return out


def test_registered_and_in_the_default_set() -> None:
    """The rule is catalogued and runs by default (it checks nothing on single-rank jobs)."""
    assert REGISTRY["RankDivergence"] is RankDivergence
    assert any(isinstance(r, RankDivergence) for r in default_rules())
    assert RankDivergence.per_rank is False


def test_single_rank_jobs_check_nothing() -> None:
    """With world 1 no finding is ever made and the state stays empty, whatever the values."""
    rule = RankDivergence()
    state = rule.initialize()
    for s in range(20):
        state, finding = rule.update(state, rec(s, 0, 1, act=10.0**s))
        assert finding is None
    assert state == rule.initialize()


def test_corrupted_rank_fires_after_patience_naming_rank_tensor_and_ratio() -> None:
    """Rank 1's activations 1000x larger from step 10: fires at step 12 (patience 3), naming rank 1."""
    found = run(RankDivergence(), two_ranks(20, bad_from=10))
    firing = [(s, f) for s, f in found if f.firing]
    assert firing and all(s >= 12 for s, _ in firing)
    step, f = firing[0]
    assert step == 12 and f.rank == 1 and f.tensors == (ACT,) and f.mode == "train"
    expected = (0.5 + 0.12) * 1000 / (0.5 + 0.12)
    assert f.value == pytest.approx(expected, rel=1e-6) and f.threshold == 10.0
    assert "rank 1" in f.message and ACT in f.message and "abs_mean" in f.message
    assert all(not f.firing for s, f in found if s < 10)


def test_resolves_when_ranks_agree_again() -> None:
    """The first compared step without divergence after firing is a resolving finding."""
    records = two_ranks(15, bad_from=5)
    healthy = [rec(s, r, 2) for s in range(15, 18) for r in (0, 1)]
    found = run(RankDivergence(patience=1), records + healthy)
    states = [(s, f.firing) for s, f in found]
    assert (5, True) in states and (4, False) in states
    assert states[-3:] == [(15, False), (16, False), (17, False)]


def test_smaller_outlier_is_named_by_its_movement() -> None:
    """With two ranks the tie goes to the rank that moved since the last healthy step, even downwards."""
    records = two_ranks(12, bad_from=6, factor=1e-3)
    (step, f), *_ = [(s, f) for s, f in run(RankDivergence(patience=1), records) if f.firing]
    assert step == 6 and f.rank == 1
    swapped = [dataclasses.replace(r, rank=1 - r.rank) for r in records]
    (step, f), *_ = [(s, f) for s, f in run(RankDivergence(patience=1), swapped) if f.firing]
    assert step == 6 and f.rank == 0


def test_outlier_among_many_ranks_is_the_one_far_from_the_median() -> None:
    """With four ranks the outlier is the one far from the others' median, from the first step."""
    records = [rec(s, r, 4, act=50.0 if r == 2 else 0.5 + 0.1 * r) for s in range(3) for r in range(4)]
    found = run(RankDivergence(patience=1), records)
    assert [(s, f.firing, f.rank) for s, f in found] == [(0, True, 2), (1, True, 2), (2, True, 2)]


def test_loss_scalar_diverges_too_and_gradients_are_not_compared() -> None:
    """The loss is compared by default (as "scalar:loss"); gradients (all-reduced under DDP) are not."""
    records = [rec(s, r, 2, loss=5.0 if r == 1 else 0.2) for s in range(3) for r in (0, 1)]
    found = run(RankDivergence(patience=1), records)
    assert [f.tensors for _, f in found] == [("scalar:loss",)] * 3
    assert found[0][1].value == pytest.approx(25.0)
    only_grads = RankDivergence(collection_names=["gradients"], patience=1)
    assert [f.firing for _, f in run(only_grads, records)] == [False] * 3  # gradient ratio 2 < 10
    strict = RankDivergence(collection_names=["gradients"], patience=1, ratio_threshold=1.5)
    assert [f.tensors for _, f in run(strict, records)] == [("gradient/fc1.weight",)] * 3


def test_tiny_values_are_floored_at_min_value() -> None:
    """Values below min_value count as min_value: 1e-5 vs 1e-3 never diverges at the default floor."""
    records = [rec(s, r, 2, act=1e-5 if r else 1e-3, loss=1.0) for s in range(4) for r in (0, 1)]
    assert not any(f.firing for _, f in run(RankDivergence(patience=1), records))
    assert all(f.firing for _, f in run(RankDivergence(patience=1, min_value=1e-6), records))


def test_non_finite_values_are_left_to_exploding_tensor() -> None:
    """A NaN statistic on one rank is not compared (ExplodingTensor reports it)."""
    records = [rec(s, r, 2, act=math.nan if r else 0.5) for s in range(3) for r in (0, 1)]
    assert not any(f.firing for _, f in run(RankDivergence(patience=1), records))


def test_missing_rank_times_out_by_record_ts_and_is_named() -> None:
    """Rank 2 never reports: a step is compared once a later record is rank_timeout seconds newer."""
    rule = RankDivergence(patience=1, rank_timeout=5.0, max_pending_steps=100)
    records = [rec(s, r, 3, act=9.0 if r == 1 else 0.5, ts=float(s)) for s in range(10) for r in (0, 1)]
    found = run(rule, records)
    # step s is compared when a record of ts > s + 5 arrives: steps 0..3 by the records of steps 6..9
    assert [s for s, _ in found] == [0, 1, 2, 3]
    assert all(f.firing and f.rank == 1 and f.message.endswith("ranks missing: 2") for _, f in found)


def test_step_overtaken_by_a_complete_step_is_compared_with_the_ranks_present() -> None:
    """A step that a rank skipped is compared as soon as a later step completes."""
    records = [rec(0, 0, 2), rec(0, 1, 2), rec(1, 0, 2, act=80.0), rec(2, 0, 2), rec(2, 1, 2)]
    found = run(RankDivergence(patience=1), records)
    # step 1 has only rank 0: nothing to compare; steps 0 and 2 compare both ranks
    assert [(s, f.firing) for s, f in found] == [(0, False), (2, False)]


def test_late_records_of_compared_steps_are_ignored() -> None:
    """A record of a step already compared changes nothing."""
    rule = RankDivergence(patience=1)
    state = rule.initialize()
    for r in two_ranks(3):
        state, _ = rule.update(state, r)
    before = json.dumps(state, sort_keys=True)
    new, finding = rule.update(state, rec(1, 1, 2, act=1e6))
    assert finding is None and json.dumps(new, sort_keys=True) == before


def test_state_is_bounded_when_a_rank_never_reports() -> None:
    """With a silent rank and no timeout in sight, at most max_pending_steps steps wait; memory is flat."""
    rule = RankDivergence(max_pending_steps=4, rank_timeout=1e9)
    state = rule.initialize()
    sizes = []
    for s in range(300):
        for r in (0, 1):
            state, _ = rule.update(state, rec(s, r, 3))
        assert len(state["p"]) <= 4
        sizes.append(state_size(state))
    assert max(sizes[50:]) == max(sizes[250:])


def test_update_is_pure_and_json_round_trip_changes_nothing() -> None:
    """update() never mutates its input state; findings are the same with or without JSON round trips."""
    rule = RankDivergence(patience=2)
    records = two_ranks(30, bad_from=12)
    state = rule.initialize()
    for r in records:
        frozen = json.dumps(state, sort_keys=True)
        new, _ = rule.update(state, r)
        assert json.dumps(state, sort_keys=True) == frozen
        state = new
    _, plain = replay(rule, records)
    _, tripped = replay(rule, records, roundtrip_every=1)
    assert plain == tripped and any(f.firing for _, f in plain)


def _reference_ratios(records: list[StepRecord], floor: float) -> dict[int, float]:
    """Batch reference: per step, the largest max/min of the floored activation and loss across ranks."""
    by_step: dict[int, list[StepRecord]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    out = {}
    for step, recs in by_step.items():
        acts = np.maximum([abs(next(t for t in r.tensors if t.name == ACT).abs_mean) for r in recs], floor)
        losses = np.maximum([abs(r.scalars["loss"]) for r in recs], floor)
        out[step] = float(max(acts.max() / acts.min(), losses.max() / losses.min()))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_a_batch_reference_whatever_the_arrival_order(seed: int) -> None:
    """Shuffled arrival (each rank in order, ranks interleaved) gives the reference's divergent steps."""
    rng = random.Random(seed)
    world, steps = 3, 40
    per_rank = []
    for r in range(world):
        values = [
            rec(s, r, world, act=rng.choice([0.5, 0.6, 30.0]) if r == seed % world else 0.5, loss=1.0)
            for s in range(steps)
        ]
        per_rank.append(values)
    # Interleave the ranks at random, keeping each rank's own order (as one Kafka partition does).
    queues = [list(v) for v in per_rank]
    arrival = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        arrival.append(q.pop(0))
    rule = RankDivergence(patience=1, max_pending_steps=steps)
    found = dict(run(rule, arrival))
    ref = _reference_ratios(list(itertools.chain(*per_rank)), rule.params.min_value)
    assert sorted(found) == list(range(steps))
    for step, f in found.items():
        assert f.firing == (ref[step] > 10.0), step
        if f.firing:
            assert f.value == pytest.approx(ref[step]) and f.rank == seed % world


def test_healthy_ranks_never_fire() -> None:
    """Three ranks training the same small MLP setup on their own data never diverge (train and eval)."""
    pytest.importorskip("torch")
    from tensorpulse.rules.testing import mlp_run

    runs = [mlp_run(steps=120, seed=seed, job="job") for seed in range(3)]
    records = []
    for group in zip(*runs, strict=True):
        for rank, r in enumerate(group):
            records.append(dataclasses.replace(r, rank=rank, world=3))
    found = run(RankDivergence(patience=1), records)
    assert len([f for _, f in found if f.mode == "train"]) == 120
    assert not any(f.firing for _, f in found)


def test_invalid_parameters_are_rejected() -> None:
    """Unknown statistics, ratios <= 1 and bad regexes raise ConfigError naming the parameter."""
    with pytest.raises(ConfigError, match="statistic"):
        RankDivergence(statistic="median")
    with pytest.raises(ConfigError, match="ratio_threshold"):
        RankDivergence(ratio_threshold=1.0)
    with pytest.raises(ConfigError, match="tensor_regex"):
        RankDivergence(tensor_regex="(")


@pytest.mark.parametrize("world", [8, 1024])
def test_large_jobs_keep_extremes_and_name_the_outlier(world: int) -> None:
    """Over `max_exact_ranks` ranks a step is kept as per-name extremes: the same verdict and outlier,
    and a state whose size does not grow with the job (exact below the bound, as the other tests show)."""
    rule = RankDivergence(patience=1, max_exact_ranks=4)
    sick = world * 3 // 4
    records = [
        rec(step, r, world, act=50.0 if (r == sick and step == 2) else 0.5 + 0.001 * r)
        for step in range(4)
        for r in random.Random(step).sample(range(world), world)
    ]
    state, sizes, found = rule.initialize(), [], []
    for r in records:
        state, finding = rule.update(state, r)
        state = json.loads(json.dumps(state))
        sizes.append(state_size(state))
        if finding is not None:
            found.append(finding)
    firing = [f for f in found if f.firing]
    assert [(f.step, f.rank) for f in firing] == [(2, sick)]
    assert firing[0].value == pytest.approx(50.0 / 0.5)
    assert f"rank {sick}" in firing[0].message
    assert [f.step for f in found if not f.firing] == [0, 1, 3]
    assert max(sizes) < 4096  # bytes, whatever the number of ranks


def test_extremes_agree_with_the_exact_comparison() -> None:
    """On 6 ranks with a low and a high outlier in turn, both ways name the same rank and ratio."""
    records = []
    for step, (rank, act) in enumerate([(2, 40.0), (4, 0.004), (0, 30.0), (5, 1.0)]):
        records += [rec(step, r, 6, act=act if r == rank else 0.5) for r in range(6)]
    exact = run(RankDivergence(patience=1), records)
    summary = run(RankDivergence(patience=1, max_exact_ranks=2), records)
    pick = lambda out: [(s, f.firing, f.rank if f.firing else None, round(f.value or 0, 6)) for s, f in out]  # noqa: E731
    assert pick(summary) == pick(exact)
    assert [r for _, f, r, _ in pick(exact) if f] == [2, 4, 0]
