"""AllZero: at least `threshold` % of a selected tensor's values are exactly zero."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import AllZero
from tensorpulse.rules.testing import make_record, make_stats, replay, state_size
from tensorpulse.wire import StepRecord, TensorStats


def zeros(
    count: int, n: int = 10, name: str = "gradient/fc.weight", collection: str = "gradients"
) -> TensorStats:
    """A tensor of n values of which the first `count` are zero."""
    return make_stats(name, collection, np.concatenate([np.zeros(count), np.full(n - count, 0.5)]))


@pytest.mark.parametrize(
    ("count", "threshold", "expected"),
    [
        (10, 100.0, True),
        (9, 100.0, False),
        (0, 100.0, False),
        (5, 50.0, True),  # exactly 50 % reaches 50 %
        (4, 50.0, False),
        (1, 10.0, True),
        (0, 1e-9, False),
        (1, 1e-9, True),
    ],
)
def test_threshold_table(count: int, threshold: float, expected: bool) -> None:
    """Fires when the zero percentage is at least the threshold."""
    _, finding = AllZero(threshold=threshold).update({}, make_record(1, tensors=[zeros(count)]))
    assert finding is not None and finding.firing is expected
    assert finding.value == pytest.approx(10.0 * count) and finding.threshold == threshold


def test_nan_is_not_zero() -> None:
    """A NaN element is not a zero: [0, NaN] is 50 % zeros."""
    t = make_stats("g", "gradients", np.array([0.0, np.nan]))
    _, finding = AllZero().update({}, make_record(1, tensors=[t]))
    assert finding is not None and not finding.firing and finding.value == 50.0


TENSORS = [
    zeros(10, name="fc.weight", collection="weights"),
    zeros(10, name="fc.bias", collection="biases"),
    zeros(10, name="gradient/fc.weight", collection="gradients"),
    zeros(10, name="net.1/relu_output", collection="activations"),
]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ("fc.weight", "gradient/fc.weight", "net.1/relu_output")),  # biases skipped by default
        ({"collection_names": ["biases"]}, ("fc.bias",)),
        ({"tensor_regex": "bias"}, ("fc.bias",)),  # a regex alone looks at every collection
        ({"collection_names": ["gradients", "weights"]}, ("fc.weight", "gradient/fc.weight")),
        ({"collection_names": ["weights"], "tensor_regex": "relu"}, None),
    ],
)
def test_selection(params: dict, expected: tuple[str, ...] | None) -> None:
    """Without collection_names and tensor_regex every tensor but zero-initialised biases is checked."""
    _, f = AllZero(**params).update({}, make_record(1, tensors=TENSORS))
    if expected is None:
        assert f is None
    else:
        assert f is not None and f.firing and f.tensors == expected


def test_empty_tensors_and_resolution() -> None:
    """Empty tensors are not checked; the rule resolves once the tensor has non-zeros again."""
    records = [
        make_record(0, tensors=[make_stats("g", "gradients", None)]),
        make_record(1, tensors=[zeros(10), zeros(3, name="other")]),
        make_record(2, tensors=[zeros(2), zeros(3, name="other")]),
    ]
    _, out = replay(AllZero(), records)
    assert [(s, f.firing, f.tensors, f.value) for s, f in out] == [
        (1, True, ("gradient/fc.weight",), 100.0),
        (2, False, (), 30.0),
    ]


@pytest.mark.parametrize(
    "params", [{"threshold": 0.0}, {"threshold": 100.5}, {"threshold": -1}, {"tensor_regex": "("}]
)
def test_invalid_params(params: dict) -> None:
    """threshold is a percentage in (0, 100]; the regex must compile."""
    with pytest.raises(ConfigError):
        AllZero(**params)


def _raw(steps: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Per step three tensors with a random share of exact zeros (sometimes all)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        arrays = []
        for _ in range(3):
            a = rng.normal(size=20)
            a[rng.random(20) < rng.choice([0.0, 0.5, 0.9, 1.0])] = 0.0
            arrays.append(a)
        out.append(arrays)
    return out


def _records(raw: list[list[np.ndarray]]) -> list[StepRecord]:
    return [
        make_record(s, tensors=[make_stats(f"t{j}", "gradients", a) for j, a in enumerate(arrays)])
        for s, arrays in enumerate(raw)
    ]


@pytest.mark.parametrize("threshold", [100.0, 90.0, 50.0])
def test_matches_batch_reference(threshold: float) -> None:
    """Streaming findings equal a numpy restatement: (a == 0).mean() * 100 >= threshold."""
    raw = _raw(200)
    _, out = replay(AllZero(threshold=threshold), _records(raw))
    pct = np.array([[(a == 0).mean() * 100 for a in arrays] for arrays in raw])
    expected = [
        (
            s,
            bool((row >= threshold).any()),
            tuple(f"t{j}" for j in np.flatnonzero(row >= threshold)),
            row.max(),
        )
        for s, row in enumerate(pct)
    ]
    assert [(s, f.firing, f.tensors) for s, f in out] == [e[:3] for e in expected]
    assert [f.value for _, f in out] == pytest.approx([e[3] for e in expected])
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _records(_raw(60))
    _, plain = replay(AllZero(threshold=90), records)
    for k in (1, 6):
        assert repr(replay(AllZero(threshold=90), records, roundtrip_every=k)[1]) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state is the same size after 1k and after 100k steps."""
    rule = AllZero()
    records = _records(_raw(10))
    state, sizes = rule.initialize(), {}
    for s in range(100_000):
        state, _ = rule.update(state, records[s % 10])
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] == sizes[1_000] == state_size(rule.initialize())
