"""WeightUpdateRatio: ‖Δw‖/(‖w_prev‖ + epsilon) from the hook's deltas, outside [small, large]."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import WeightUpdateRatio
from tensorpulse.rules import functional as F
from tensorpulse.rules.testing import make_record, make_stats, replay, state_size
from tensorpulse.wire import Delta, StepRecord, TensorStats


def weight(
    update_l2: float,
    prev_l2: float = 1.0,
    prev_step: int = 9,
    name: str = "fc.weight",
    collection: str = "weights",
) -> TensorStats:
    return make_stats(name, collection, np.ones(4), delta=Delta(prev_step, update_l2, prev_l2, 0.0))


@pytest.mark.parametrize(
    ("update_l2", "prev_l2", "params", "expected"),
    [
        (1e-3, 1.0, {}, False),
        (10.0, 1.0, {}, False),  # 10/(1 + 1e-9) is not above 10
        (10.1, 1.0, {}, True),
        (2e-8, 1.0, {}, False),
        (5e-9, 1.0, {}, True),
        (0.0, 1.0, {}, True),  # no update at all
        (0.0, 1.0, {"small_threshold": 0.0}, False),  # 0 is not below 0
        (50.0, 1.0, {"large_threshold": 100.0}, False),
        (50.0, 1.0, {"large_threshold": 20.0}, True),
        (1e-5, 1.0, {"small_threshold": 1e-4}, True),
        (20.0, 1.0, {"epsilon": 1.0}, False),  # 20/2 = 10, not above 10
        (1e-9, 0.0, {}, False),  # a zero tensor: 1e-9/1e-9 = 1
        (1.0, 0.0, {"epsilon": 0.0}, True),  # update of a zero tensor: inf
        (0.0, 0.0, {"epsilon": 0.0}, False),  # 0/0 is NaN: neither
        (math.nan, 1.0, {}, False),
    ],
)
def test_threshold_table(update_l2: float, prev_l2: float, params: dict, expected: bool) -> None:
    """The ratio fires strictly above large_threshold or strictly below small_threshold."""
    _, finding = WeightUpdateRatio(**params).update({}, make_record(10, tensors=[weight(update_l2, prev_l2)]))
    assert finding is not None and finding.firing is expected


@pytest.mark.parametrize(
    ("num_steps", "prev_step", "checked"),
    [
        (None, 0, True),
        (None, 9, True),
        (1, 9, True),
        (1, 8, False),
        (5, 5, True),  # step 10 − 5
        (5, 4, False),
    ],
)
def test_num_steps(num_steps: int | None, prev_step: int, checked: bool) -> None:
    """With num_steps set, a delta counts only if its previous step is >= step − num_steps."""
    rule = WeightUpdateRatio(num_steps=num_steps)
    _, finding = rule.update({}, make_record(10, tensors=[weight(100.0, prev_step=prev_step)]))
    assert (finding is not None and finding.firing) is checked
    assert (finding is None) is not checked


def test_only_weights_with_deltas_count() -> None:
    """Biases, gradients and weights without a delta are not checked."""
    tensors = [
        weight(100.0, name="fc.bias", collection="biases"),
        weight(100.0, name="gradient/fc.weight", collection="gradients"),
        make_stats("fc2.weight", "weights", np.ones(4)),
    ]
    assert WeightUpdateRatio().update({}, make_record(10, tensors=tensors))[1] is None


def test_value_threshold_and_tensor_order() -> None:
    """Too-large tensors come first (largest first), then too-small (smallest first)."""
    tensors = [
        weight(0.0, name="a"),
        weight(20.0, name="b"),
        weight(1e-3, name="ok"),
        weight(50.0, name="c"),
        weight(5e-9, name="d"),
    ]
    _, f = WeightUpdateRatio().update({}, make_record(10, tensors=tensors))
    assert f is not None and f.firing
    assert f.tensors == ("c", "b", "a", "d")
    assert f.value == pytest.approx(50.0) and f.threshold == 10.0
    _, f = WeightUpdateRatio().update({}, make_record(10, tensors=tensors[:1] + tensors[2:3]))
    assert f is not None and f.firing and f.value == 0.0 and f.threshold == 1e-8 and f.tensors == ("a",)
    _, f = WeightUpdateRatio().update({}, make_record(10, tensors=tensors[2:3]))
    assert f is not None and not f.firing and f.value == pytest.approx(1e-3) and f.threshold == 10.0


@pytest.mark.parametrize(
    "params",
    [
        {"small_threshold": 10.0},
        {"small_threshold": 20.0, "large_threshold": 10.0},
        {"num_steps": 0},
        {"epsilon": -1.0},
        {"large_threshold": 0.0},
    ],
)
def test_invalid_params(params: dict) -> None:
    """small must be below large; num_steps >= 1; epsilon >= 0."""
    with pytest.raises(ConfigError):
        WeightUpdateRatio(**params)


def _arrays(steps: int, tensors: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (step, tensor): update norm, previous norm and previous step, with occasional extremes."""
    rng = np.random.default_rng(seed)
    prev = rng.uniform(0.1, 5.0, (steps, tensors))
    ratio = 10.0 ** rng.uniform(-4, -1, (steps, tensors))
    ratio[rng.random((steps, tensors)) < 0.05] = 20.0
    ratio[rng.random((steps, tensors)) < 0.05] = 0.0
    gap = rng.integers(1, 8, (steps, tensors))
    return ratio * prev, prev, np.arange(steps)[:, None] - gap


def _records(upd: np.ndarray, prev: np.ndarray, prev_step: np.ndarray) -> list[StepRecord]:
    return [
        make_record(
            s,
            tensors=[
                weight(float(upd[s, j]), float(prev[s, j]), int(prev_step[s, j]), f"layer{j}.weight")
                for j in range(upd.shape[1])
            ],
        )
        for s in range(upd.shape[0])
    ]


@pytest.mark.parametrize("params", [{}, {"num_steps": 3}, {"large_threshold": 0.05, "epsilon": 0.5}])
def test_matches_batch_reference(params: dict) -> None:
    """Streaming findings equal a numpy restatement of the definition over all steps at once."""
    upd, prev, prev_step = _arrays(200)
    rule = WeightUpdateRatio(**params)
    _, out = replay(rule, _records(upd, prev, prev_step))
    p = rule.params
    ratio = upd / (prev + p.epsilon)
    steps = np.arange(upd.shape[0])[:, None]
    usable = np.ones_like(ratio, dtype=bool) if p.num_steps is None else prev_step >= steps - p.num_steps
    high = usable & (ratio > p.large_threshold)
    low = usable & (ratio < p.small_threshold)
    expected = []
    for s in range(upd.shape[0]):
        if not usable[s].any():
            continue
        firing = bool(high[s].any() or low[s].any())
        if high[s].any():
            value = ratio[s][high[s]].max()
        elif low[s].any():
            value = ratio[s][low[s]].min()
        else:
            value = ratio[s][usable[s]].max()
        names = {f"layer{j}.weight" for j in range(upd.shape[1]) if high[s, j] or low[s, j]}
        expected.append((s, firing, names))
        assert out[len(expected) - 1][1].value == pytest.approx(value)
    assert [(s, f.firing, set(f.tensors)) for s, f in out] == expected
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _records(*_arrays(100))
    _, plain = replay(WeightUpdateRatio(num_steps=4), records)
    for k in (1, 5):
        _, trip = replay(WeightUpdateRatio(num_steps=4), records, roundtrip_every=k)
        assert repr(trip) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state is the same size after 1k and after 100k steps."""
    rule = WeightUpdateRatio()
    records = _records(*_arrays(10))
    state, sizes = rule.initialize(), {}
    for s in range(100_000):
        state, _ = rule.update(state, records[s % 10])
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] == sizes[1_000] == state_size(rule.initialize())


@pytest.mark.parametrize(
    ("update_l2", "prev_l2", "epsilon", "expected"),
    [
        (1.0, 1.0, 0.0, 1.0),
        (1.0, 1.0, 1.0, 0.5),
        (0.0, 0.0, 1e-9, 0.0),
        (1.0, 0.0, 0.0, math.inf),
        (0.0, 0.0, 0.0, math.nan),
    ],
)
def test_update_ratio_function(update_l2: float, prev_l2: float, epsilon: float, expected: float) -> None:
    """functional.update_ratio divides by (prev + epsilon); x/0 is inf, 0/0 NaN, never an exception."""
    got = F.update_ratio(update_l2, prev_l2, epsilon)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


def test_out_of_range_function() -> None:
    """functional.out_of_range splits values above high (largest first) and below low (smallest first)."""
    values = [("a", 5.0), ("b", math.nan), ("c", -1.0), ("d", 9.0), ("e", 0.5), ("f", -3.0)]
    assert F.out_of_range(values, 0.0, 1.0) == ([("d", 9.0), ("a", 5.0)], [("f", -3.0), ("c", -1.0)])
    assert F.out_of_range(values, None, 1.0) == ([("d", 9.0), ("a", 5.0)], [])
    assert F.out_of_range(values, 0.0, None) == ([], [("f", -3.0), ("c", -1.0)])
