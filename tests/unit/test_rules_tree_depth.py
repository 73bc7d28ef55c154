"""TreeDepth: ⌊log2(largest node id + 1)⌋ > depth, from the XGBoost callback's scalar."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import TreeDepth, functional
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.rules.tree_depth import MAX_NODE_ID
from tensorpulse.wire import StepRecord


def rec(step: int, node: float | None) -> StepRecord:
    return make_record(step, scalars={} if node is None else {MAX_NODE_ID: node})


@pytest.mark.parametrize(
    ("node", "depth", "expected", "value"),
    [
        (0, 4, False, 0),  # a lone root
        (30, 4, False, 4),  # a full tree of depth 4 (ids 0..30) does not fire
        (31, 4, True, 5),  # 32 nodes: no tree of depth 4 holds that many
        (62, 4, True, 5),  # a full tree of depth 5
        (63, 5, True, 6),
        (62, 5, False, 5),
        (2, 1, False, 1),
        (3, 1, True, 2),
        (0, 0, False, 0),
        (1, 0, True, 1),
        (110, 6, False, 6),  # measured: XGBoost max_depth=6 trees
    ],
)
def test_threshold_table(node: int, depth: int, expected: bool, value: int) -> None:
    """Fires when the node count m + 1 exceeds 2^(depth+1) − 1, the size of a full tree of `depth`."""
    finding = TreeDepth(depth=depth).update({}, rec(3, node))[1]
    assert (finding.firing, finding.value, finding.threshold) == (expected, value, depth)
    assert finding.tensors == ((MAX_NODE_ID,) if expected else ())


@pytest.mark.parametrize("node", [None, math.nan, math.inf, -1.0])
def test_unusable_scalar(node: float | None) -> None:
    """A missing, non-finite or negative scalar is not judged."""
    assert TreeDepth().update({}, rec(0, node)) == ({}, None)


def test_message() -> None:
    """The message gives the node id, the node limit and the depth bound."""
    finding = TreeDepth().update({}, rec(7, 40))[1]
    assert "largest tree node id 40 at round 7" in finding.message
    assert "2^(4+1)-1 = 31 nodes, so its depth is at least 5 (> 4)" in finding.message


@pytest.mark.parametrize("params", [{"depth": -1}, {"depth": 2.5}])
def test_invalid_params(params: dict) -> None:
    """depth is a whole number >= 0."""
    with pytest.raises(ConfigError):
        TreeDepth(**params)


def test_depth_from_node_id_is_heap_depth() -> None:
    """In heap order (children 2i+1, 2i+2) the estimate is exactly the depth of the node."""
    for i in range(2000):
        depth, j = 0, i
        while j > 0:
            j, depth = (j - 1) // 2, depth + 1
        assert functional.depth_from_node_id(i) == depth == math.floor(math.log2(i + 1))


@pytest.mark.parametrize(("max_depth", "fires"), [(3, False), (4, False), (6, True)])
def test_real_xgboost_models(max_depth: int, fires: bool) -> None:
    """On XGBoost models, depth=4 fires for max_depth=6 trees and never for trees of depth <= 4."""
    xgb = pytest.importorskip("xgboost")
    from tensorpulse.producers.xgboost import max_node_id

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8))
    y = 3 * x[:, 0] + np.sin(4 * x[:, 1]) + x[:, 2] * x[:, 3] + rng.normal(0, 0.1, 2000)
    booster = xgb.train({"max_depth": max_depth, "eta": 0.3, "nthread": 1}, xgb.DMatrix(x, label=y), 5)
    finding = TreeDepth().update({}, rec(4, float(max_node_id(booster))))[1]
    assert finding.firing is fires
    assert finding.value <= max_depth


def test_matches_batch_reference() -> None:
    """Findings over a stream equal ⌊log2(m + 1)⌋ > depth computed with math.log2."""
    rng = np.random.default_rng(0)
    nodes = np.sort(rng.integers(0, 200, 300))
    records = [rec(s, float(m) if s % 7 else None) for s, m in enumerate(nodes)]
    _, out = replay(TreeDepth(depth=5), records)
    expected = [(s, math.floor(math.log2(m + 1)) > 5) for s, m in enumerate(nodes) if s % 7]
    assert [(s, f.firing) for s, f in out] == expected
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip_and_flat() -> None:
    """Stateless: the state stays {} and a JSON round trip changes nothing, over 100k steps."""
    rule = TreeDepth()
    records = [rec(s, float(s % 50)) for s in range(200)]
    assert repr(replay(rule, records, roundtrip_every=3)[1]) == repr(replay(rule, records)[1])
    state = rule.initialize()
    block = {MAX_NODE_ID: 40.0}
    for s in range(100_000):
        state, _ = rule.update(state, make_record(s, scalars=block))
        if s + 1 == 1_000:
            at_1k = state_size(state)
    assert state_size(state) == at_1k == 2
