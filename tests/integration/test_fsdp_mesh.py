"""Shard marks on a 2 x 2 device mesh (4 gloo CPU processes, no broker): HSDP replicas, 2-D shards, columns.

Each rank runs tests/integration/mesh_rank.py, which builds DTensors of one 9 x 6 tensor with four
placements and records producers/shards.py's mark and its local shard. The worker's ShardJoin,
fed every rank's shard statistics, must give the whole tensor's statistics in every sharded case.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .helpers import launch_ranks, wait_for
from .mesh_rank import CASES, SHAPE

pytest.importorskip("torch")
pytestmark = pytest.mark.integration

WORLD = 4
NUMEL = SHAPE[0] * SHAPE[1]


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every rank's marks and local values, rank order."""
    out = tmp_path_factory.mktemp("mesh")
    procs = launch_ranks(Path(__file__).with_name("mesh_rank.py"), WORLD, [str(out)], out)
    try:

        def done() -> bool:
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    raise AssertionError((out / f"rank-{rank}.log").read_text(errors="replace")[-3000:])
            return all(p.poll() == 0 for p in procs)

        wait_for(done, 120, "the four mesh ranks")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((out / f"mesh-{r}.json").read_text()) for r in range(WORLD)]


def _record(rank: int, values: list[float], mark: list[int] | None) -> Any:
    """The record rank `rank` would publish for this shard (statistics through the wire codec)."""
    from tensorpulse import statistics, wire

    ref = statistics.reference(np.asarray(values))
    block = wire.TensorBlock(
        names=["w"],
        collections=["weights"],
        n=np.array([ref["n"]]),
        floats=np.array([[ref[c] for c in wire.FLOAT_COLUMNS]], dtype=np.float32),
        zeros=np.array([ref["zeros"]]),
        shards={} if mark is None else {0: tuple(mark)},
    )
    return wire.decode(
        wire.encode(job="mesh", rank=rank, world=WORLD, step=0, mode="train", ts=1.0, tensors=block), {}
    )


def test_marks_say_which_shard_of_how_many_and_where(views: list[dict[str, Any]]) -> None:
    """HSDP: index = the shard coordinate, 2 shards, replicas share it, row offsets; 2-D: 4 shards; replicated: no mark."""
    for v in views:
        rep, shard = v["coordinate"]
        rows = -(-SHAPE[0] // 2)
        assert v["hsdp"]["mark"] == [NUMEL, shard, 2, shard * rows * SHAPE[1]]
        assert v["two_dims"]["mark"] == [NUMEL, rep * 2 + shard, 4, -1]
        assert v["columns"]["mark"] == [NUMEL, shard, 2, -1]  # dim 1: not one block of the whole
        assert v["replicated"]["mark"] is None
    whole = np.asarray(views[0]["whole"]).reshape(SHAPE)
    for v in views:  # the offset points at the shard's first element
        mark, values = v["hsdp"]["mark"], v["hsdp"]["values"]
        assert whole.reshape(-1)[mark[3] : mark[3] + len(values)].tolist() == values


@pytest.mark.parametrize("case", [c for c in CASES if c != "replicated"])
def test_the_join_combines_every_sharded_case_into_the_whole(views: list[dict[str, Any]], case: str) -> None:
    """Fed every rank's shard (replicas included), the worker's join gives the whole tensor's statistics once."""
    from tensorpulse import statistics
    from tensorpulse.stream.shards import ShardJoin

    join = ShardJoin()
    out = []
    for rank, v in enumerate(views):
        out += join.add(_record(rank, v[case]["values"], v[case]["mark"]))
    [(_, whole)] = out
    want = statistics.reference(np.asarray(views[0]["whole"]))
    assert whole.n == NUMEL
    for key in ("mean", "std", "min", "max", "abs_mean", "l2"):
        assert getattr(whole, key) == pytest.approx(want[key], rel=1e-6), key
