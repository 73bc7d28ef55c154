"""TensorVariance: the population variance (std²) of selected tensors outside [min, max]."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import TensorVariance, default_rules
from tensorpulse.rules.testing import make_record, make_stats, replay, state_size
from tensorpulse.wire import StepRecord, TensorStats


def spread(std: float, name: str = "fc.weight", collection: str = "weights") -> TensorStats:
    """A tensor of ±std values: population variance exactly std²."""
    return make_stats(name, collection, np.array([-std, std, -std, std]))


@pytest.mark.parametrize(
    ("std", "params", "expected"),
    [
        (0.5, {"max_threshold": 1.0}, False),
        (1.0, {"max_threshold": 1.0}, False),  # variance 1 is not above 1
        (1.5, {"max_threshold": 1.0}, True),
        (1.5, {"max_threshold": 4.0}, False),
        (0.25, {"min_threshold": 0.25}, True),  # variance 1/16 < 1/4
        (0.5, {"min_threshold": 0.25}, False),  # variance 1/4 is not below 1/4
        (0.0, {"min_threshold": 1e-12}, True),  # a constant tensor
        (0.0, {"max_threshold": 1.0}, False),  # only max set: small variance is fine
        (100.0, {"min_threshold": 1.0}, False),  # only min set: large variance is fine
        (0.25, {"min_threshold": 0.25, "max_threshold": 1.0}, True),
        (0.75, {"min_threshold": 0.25, "max_threshold": 1.0}, False),
        (1.5, {"min_threshold": 0.25, "max_threshold": 1.0}, True),
    ],
)
def test_threshold_table(std: float, params: dict, expected: bool) -> None:
    """Fires strictly above max_threshold or strictly below min_threshold; a missing bound is not checked."""
    _, finding = TensorVariance(**params).update({}, make_record(1, tensors=[spread(std)]))
    assert finding is not None and finding.firing is expected


def test_value_threshold_and_tensor_order() -> None:
    """Too-large variances come first (largest first), then too-small ones (smallest first)."""
    tensors = [spread(0.1, "a"), spread(2.0, "b"), spread(0.7, "ok"), spread(3.0, "c"), spread(0.0, "d")]
    rule = TensorVariance(min_threshold=0.1, max_threshold=1.0)
    _, f = rule.update({}, make_record(1, tensors=tensors))
    assert f is not None and f.firing
    assert f.tensors == ("c", "b", "d", "a")
    assert f.value == pytest.approx(9.0) and f.threshold == 1.0
    _, f = rule.update({}, make_record(1, tensors=[tensors[0], tensors[2]]))
    assert f is not None and f.firing and f.value == pytest.approx(0.01) and f.threshold == 0.1
    _, f = rule.update({}, make_record(1, tensors=[tensors[2]]))
    assert f is not None and not f.firing and f.value == pytest.approx(0.49) and f.threshold == 1.0
    _, f = TensorVariance(min_threshold=0.1).update({}, make_record(1, tensors=[tensors[2], tensors[1]]))
    assert f is not None and not f.firing and f.value == pytest.approx(0.49) and f.threshold == 0.1


TENSORS = [
    spread(2.0, "fc.weight", "weights"),
    spread(2.0, "fc.bias", "biases"),
    spread(2.0, "gradient/fc.weight", "gradients"),
]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ("fc.weight", "fc.bias", "gradient/fc.weight")),  # neither: every tensor
        ({"collection_names": ["gradients"]}, ("gradient/fc.weight",)),
        ({"collection_names": ["weights", "biases"]}, ("fc.weight", "fc.bias")),
        ({"tensor_regex": "weight"}, ("fc.weight", "gradient/fc.weight")),
        ({"collection_names": ["weights"], "tensor_regex": "^gradient"}, None),
    ],
)
def test_selection(params: dict, expected: tuple[str, ...] | None) -> None:
    """collection_names and tensor_regex (re.search) both narrow the selection."""
    _, f = TensorVariance(max_threshold=1.0, **params).update({}, make_record(1, tensors=TENSORS))
    if expected is None:
        assert f is None
    else:
        assert f is not None and f.firing and f.tensors == expected


def test_nan_and_empty_tensors_are_skipped() -> None:
    """A NaN variance is neither too large nor too small; an empty tensor is not checked."""
    nan = make_stats("nan", "weights", np.array([1.0, np.nan]))
    empty = make_stats("empty", "weights", None)
    rule = TensorVariance(min_threshold=0.5, max_threshold=1.0)
    _, f = rule.update({}, make_record(1, tensors=[nan, empty]))
    assert f is not None and not f.firing and f.value is None
    assert rule.update({}, make_record(1, tensors=[empty]))[1] is None


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({}, "at least one of max_threshold and min_threshold"),
        ({"min_threshold": 2.0, "max_threshold": 1.0}, "min_threshold < max_threshold"),
        ({"min_threshold": 1.0, "max_threshold": 1.0}, "min_threshold < max_threshold"),
        ({"max_threshold": -1.0}, "invalid parameters"),
        ({"max_threshold": 1.0, "tensor_regex": "["}, "invalid regular expression"),
    ],
)
def test_invalid_params(params: dict, match: str) -> None:
    """Without a threshold, or with an empty range, the rule refuses to start."""
    with pytest.raises(ConfigError, match=match):
        TensorVariance(**params)


def test_not_in_default_set() -> None:
    """It has no default thresholds, so the default rule set leaves it out."""
    assert "TensorVariance" not in {r.name for r in default_rules()}


def _raw(steps: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(0, 10 ** rng.uniform(-2, 0.6), 64) for _ in range(3)] for _ in range(steps)]


def _records(raw: list[list[np.ndarray]]) -> list[StepRecord]:
    return [
        make_record(s, tensors=[make_stats(f"layer{j}.weight", "weights", a) for j, a in enumerate(arrays)])
        for s, arrays in enumerate(raw)
    ]


@pytest.mark.parametrize(
    "params",
    [{"max_threshold": 1.0}, {"min_threshold": 0.01}, {"min_threshold": 0.005, "max_threshold": 3.0}],
)
def test_matches_batch_reference(params: dict) -> None:
    """Streaming findings equal np.var (ddof=0) of the raw tensors checked against the thresholds."""
    raw = _raw(150)
    _, out = replay(TensorVariance(**params), _records(raw))
    var = np.array([[a.var() for a in arrays] for arrays in raw])
    hi, lo = params.get("max_threshold", np.inf), params.get("min_threshold", -np.inf)
    names = [f"layer{j}.weight" for j in range(var.shape[1])]
    expected = [
        (
            s,
            bool(((row > hi) | (row < lo)).any()),
            {n for n, v in zip(names, row, strict=True) if v > hi or v < lo},
        )
        for s, row in enumerate(var)
    ]
    assert [(s, f.firing, set(f.tensors)) for s, f in out] == expected
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _records(_raw(60))
    rule = TensorVariance(min_threshold=0.01, max_threshold=1.0)
    _, plain = replay(rule, records)
    for k in (1, 4):
        assert repr(replay(rule, records, roundtrip_every=k)[1]) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state is the same size after 1k and after 100k steps."""
    rule = TensorVariance(max_threshold=1.0)
    records = _records(_raw(10))
    state, sizes = rule.initialize(), {}
    for s in range(100_000):
        state, _ = rule.update(state, records[s % 10])
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] == sizes[1_000] == state_size(rule.initialize())
