"""The worker combines each step's FSDP2 shards (wire `t.sh`) into the whole parameter's statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tensorpulse import statistics, wire
from tensorpulse.stream.shards import ShardedParameters, ShardJoin

SENT = ("n", "mean", "std", "min", "max", "abs_mean", "zeros", "nan", "inf")


def chunks(x: np.ndarray, count: int) -> list[np.ndarray]:
    """Rows split as FSDP2's Shard(0) splits them (torch.chunk: ceil(rows / count) each, the last
    ones shorter or empty), each flattened."""
    size = -(-x.shape[0] // count)
    return [x[min(i * size, x.shape[0]) : min((i + 1) * size, x.shape[0])].reshape(-1) for i in range(count)]


def record(
    rank: int, world: int, step: int, parts: dict[str, tuple[np.ndarray, int, int]], numel: dict
) -> wire.StepRecord:
    """What rank `rank` publishes: each named shard's statistics (float32 on the wire) and its mark."""
    names = list(parts)
    refs = [statistics.reference(parts[n][0]) for n in names]
    block = wire.TensorBlock(
        names=names,
        collections=["gradients" if n.startswith("gradient/") else "weights" for n in names],
        n=np.array([r["n"] for r in refs]),
        floats=np.array([[r[c] for c in wire.FLOAT_COLUMNS] for r in refs], dtype=np.float32),
        zeros=np.array([r["zeros"] for r in refs]),
        nan=np.array([r["nan"] for r in refs]),
        inf=np.array([r["inf"] for r in refs]),
        quantiles={i: r["quantiles"] for i, r in enumerate(refs) if r["quantiles"] is not None},
        shards={i: (numel[n], parts[n][1], parts[n][2], -1) for i, n in enumerate(names)},
    )
    payload = wire.encode(job="fsdp", rank=rank, world=world, step=step, mode="train", ts=1.0, tensors=block)
    return wire.decode(payload, {})


def assert_whole(got: wire.TensorStats, x: np.ndarray) -> None:
    """Counts exact; float statistics as the float64 reference over the whole (float32 shards)."""
    want = statistics.reference(x.reshape(-1))
    for key in ("n", "zeros", "nan", "inf"):
        assert getattr(got, key) == want[key], key
    for key in ("mean", "std", "min", "max", "abs_mean", "l2"):
        if math.isnan(want[key]):
            assert math.isnan(getattr(got, key)), key
        else:
            assert getattr(got, key) == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_steps_shards_combine_into_the_whole_parameter(world: int) -> None:
    """Shards from `world` ranks, arriving in any order, give the whole tensor's statistics once the last arrives."""
    rng = np.random.default_rng(world)
    w = rng.normal(0.5, 2.0, (33, 7))
    w[3, 2] = 0.0
    numel = {"2.weight": w.size}
    join = ShardJoin()
    recs = [record(r, world, 5, {"2.weight": (s, r, world)}, numel) for r, s in enumerate(chunks(w, world))]
    got = [join.add(rec) for rec in reversed(recs)]
    assert got[:-1] == [[]] * (world - 1)  # nothing until every shard is in
    [(step, whole)] = got[-1]
    assert step == 5 and whole.name == "2.weight" and whole.shard is None
    assert_whole(whole, w)
    assert whole.quantiles is None  # does not combine; each rank's record keeps its shard's
    assert all(t.quantiles is not None for r in recs for t in r.tensors)
    assert join.pending() == 0


def test_empty_shards_count_and_a_nan_in_one_shard_is_in_the_whole() -> None:
    """3 rows over 4 ranks leave rank 3 an empty shard; a NaN on rank 1 makes the whole's count 1 and mean NaN."""
    w = np.arange(12.0).reshape(3, 4)
    w[1, 1] = np.nan
    parts = chunks(w, 4)
    assert [p.size for p in parts] == [4, 4, 4, 0]
    join = ShardJoin()
    out = []
    for r, s in enumerate(parts):
        out += join.add(record(r, 4, 0, {"0.weight": (s, r, 4)}, {"0.weight": 12}))
    [(_, whole)] = out
    assert whole.nan == 1 and whole.n == 12 and math.isnan(whole.mean)


def test_replicas_of_a_shard_count_once() -> None:
    """HSDP: ranks 0 and 2 hold shard 0, ranks 1 and 3 shard 1; the whole is combined from one copy each."""
    w = np.linspace(-1, 1, 20).reshape(10, 2)
    s0, s1 = chunks(w, 2)
    join = ShardJoin()
    numel = {"w": 20}
    assert join.add(record(0, 4, 1, {"w": (s0, 0, 2)}, numel)) == []
    assert join.add(record(2, 4, 1, {"w": (s0, 0, 2)}, numel)) == []  # the replica adds nothing
    [(_, whole)] = join.add(record(1, 4, 1, {"w": (s1, 1, 2)}, numel))
    assert_whole(whole, w)
    assert join.add(record(3, 4, 1, {"w": (s1, 1, 2)}, numel)) == []  # nor does the late one
    assert join.add(record(2, 4, 1, {"w": (s0, 0, 2)}, numel)) == []  # nor a repeat: combined once
    assert join.pending() == 0


def test_steps_wait_apart_and_the_oldest_is_given_up_beyond_the_bound() -> None:
    """Shards of different steps never mix; beyond max_pending_steps the oldest incomplete step is counted and dropped."""
    w = np.ones((4, 4))
    a, b = chunks(w, 2)
    join = ShardJoin(max_pending_steps=2)
    numel = {"w": 16}
    assert join.add(record(0, 2, 0, {"w": (a, 0, 2)}, numel)) == []
    assert join.add(record(0, 2, 1, {"w": (a, 0, 2)}, numel)) == []
    assert join.add(record(0, 2, 2, {"w": (a, 0, 2)}, numel)) == []  # step 0 is given up
    assert join.incomplete == 1 and join.pending() == 2
    assert join.add(record(1, 2, 0, {"w": (b, 1, 2)}, numel)) == []  # too late: given up
    assert join.incomplete == 2 and join.pending() == 2
    [(step, whole)] = join.add(record(1, 2, 2, {"w": (b, 1, 2)}, numel))
    assert step == 2 and whole.n == 16 and whole.mean == 1.0
    join.forget("fsdp")
    assert join.pending() == 0


def test_unsharded_records_are_left_alone() -> None:
    """A record without shard marks (DDP, one process) combines nothing."""
    payload = wire.encode(
        job="fsdp",
        rank=0,
        world=2,
        step=0,
        mode="train",
        ts=1.0,
        tensors=wire.TensorBlock(
            names=["w"],
            collections=["weights"],
            n=np.array([4]),
            floats=np.zeros((1, 5), np.float32),
            zeros=np.array([4]),
        ),
    )
    assert ShardJoin().add(wire.decode(payload, {})) == []


def test_gauges_show_the_newest_combined_step_and_go_with_the_job() -> None:
    """tensorpulse_parameter_stat holds the newest complete step's whole-parameter values, no rank label; forget removes them."""
    registry = CollectorRegistry()
    gauges = ShardedParameters()
    registry.register(gauges)
    numel = {"gradient/0.weight": 8}
    g1 = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    g0 = -g1
    for step, g in ((1, g1), (0, g0)):  # step 0 completes last: the gauge keeps step 1
        for r, s in enumerate(chunks(g, 2)):
            gauges.observe(record(r, 2, step, {"gradient/0.weight": (s, r, 2)}, numel))
    labels = {
        "training_job": "fsdp",
        "mode": "train",
        "collection": "gradients",
        "tensor": "gradient/0.weight",
    }
    assert registry.get_sample_value("tensorpulse_parameter_step", labels) == 1
    assert registry.get_sample_value("tensorpulse_parameter_stat", {**labels, "stat": "mean"}) == 4.5
    assert registry.get_sample_value("tensorpulse_parameter_stat", {**labels, "stat": "l2"}) == pytest.approx(
        float(np.linalg.norm(g1))
    )
    assert registry.get_sample_value("tensorpulse_parameter_stat", {**labels, "stat": "n"}) == 8
    gauges.forget("fsdp")
    assert registry.get_sample_value("tensorpulse_parameter_stat", {**labels, "stat": "mean"}) is None
