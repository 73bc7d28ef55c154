"""UnchangedTensor: a tensor whose fingerprint stays within tolerance over num_steps saved steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import UnchangedTensor
from tensorpulse.rules.testing import make_record, make_stats, replay, state_size
from tensorpulse.wire import StepRecord, TensorStats

BASE = np.linspace(0.5, 1.5, 50)


def weight(values: np.ndarray, name: str = "fc.weight", collection: str = "weights") -> TensorStats:
    return make_stats(name, collection, values)


def steps(*values: np.ndarray, start: int = 0) -> list[StepRecord]:
    return [make_record(start + i, tensors=[weight(v)]) for i, v in enumerate(values)]


def test_fires_at_third_equal_step_not_second_and_resolves() -> None:
    """Fires at the 3rd equal saved step, not the 2nd, and resolves when the tensor changes."""
    records = steps(BASE, BASE, BASE, BASE, BASE + 0.1, BASE + 0.1)
    _, out = replay(UnchangedTensor(resolve_after=1), records)
    assert [(s, f.firing) for s, f in out] == [(1, False), (2, True), (3, True), (4, False), (5, False)]
    assert out[1][1].tensors == ("fc.weight",)
    assert out[1][1].value == 3.0 and out[1][1].threshold == 3.0


@pytest.mark.parametrize(
    ("delta", "params", "expected"),
    [
        (0.0, {}, True),
        (1e-9, {}, True),  # within atol + rtol*|b|
        (1e-3, {}, False),
        (1e-3, {"rtol": 1e-2}, True),
        (1e-6, {"rtol": 0.0, "atol": 1e-8}, False),
        (1e-6, {"rtol": 0.0, "atol": 1e-5}, True),
    ],
)
def test_tolerance_table(delta: float, params: dict, expected: bool) -> None:
    """Consecutive fingerprints are equal when every component is within atol + rtol·|b|."""
    records = steps(BASE, BASE + delta, BASE + 2 * delta)
    _, out = replay(UnchangedTensor(**params), records)
    assert out[-1][1].firing is expected


@pytest.mark.parametrize(("equal_nan", "expected"), [(False, False), (True, True)])
def test_nan_equal_only_with_equal_nan(equal_nan: bool, expected: bool) -> None:
    """NaN fingerprints count as equal only when equal_nan is set."""
    values = BASE.copy()
    values[3] = np.nan
    _, out = replay(UnchangedTensor(equal_nan=equal_nan), steps(values, values, values))
    assert out[-1][1].firing is expected


@pytest.mark.parametrize(("num_steps", "first_firing"), [(2, 1), (3, 2), (5, 4)])
def test_num_steps(num_steps: int, first_firing: int) -> None:
    """The first firing step is num_steps − 1 steps after the first saved step."""
    _, out = replay(UnchangedTensor(num_steps=num_steps), steps(*[BASE] * 6))
    assert min(s for s, f in out if f.firing) == first_firing


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ("fc.weight", "fc.bias")),  # weights and biases by default
        ({"collection_names": ["gradients"]}, ("gradient/fc.weight",)),
        ({"tensor_regex": "bias"}, ("fc.bias",)),  # regex alone: every collection
        ({"tensor_regex": "weight"}, ("fc.weight", "gradient/fc.weight")),
        ({"collection_names": ["weights"], "tensor_regex": "bias"}, ()),
    ],
)
def test_selection(params: dict, expected: tuple[str, ...]) -> None:
    """collection_names defaults to weights and biases only when no tensor_regex is given."""
    tensors = [
        weight(BASE),
        weight(BASE, "fc.bias", "biases"),
        weight(BASE, "gradient/fc.weight", "gradients"),
    ]
    records = [make_record(s, tensors=tensors) for s in range(3)]
    _, out = replay(UnchangedTensor(ignore_frozen=False, **params), records)
    if expected:
        assert out[-1][1].firing and out[-1][1].tensors == expected
    else:
        assert out == []


@pytest.mark.parametrize("ignore_frozen", [True, False])
def test_frozen_on_purpose_is_not_judged(ignore_frozen: bool) -> None:
    """A weight with no gradient while others have one (requires_grad off) is frozen by design: not
    judged unless ignore_frozen=False; a weight that gets gradients and does not change still fires."""
    grad = weight(BASE * 1e-2, "gradient/fc.weight", "gradients")
    records = [make_record(s, tensors=[weight(BASE), weight(BASE, "frozen.weight"), grad]) for s in range(4)]
    _, out = replay(UnchangedTensor(ignore_frozen=ignore_frozen), records)
    expected = ("fc.weight",) if ignore_frozen else ("fc.weight", "frozen.weight")
    assert out[-1][1].firing and out[-1][1].tensors == expected


def test_hysteresis_resolves_after_resolve_after_changed_steps() -> None:
    """A firing alert stays firing through fewer than `resolve_after` healthy steps in a row."""
    values = [BASE] * 3 + [BASE + 0.1] + [BASE + 0.2] * 4 + [BASE + 0.1 * i for i in range(3, 7)]
    _, out = replay(UnchangedTensor(resolve_after=4), steps(*values))
    assert [s for s, f in out if f.firing] == [2, 6, 7]  # steps 3-5 healthy: held, not resolved
    assert [s for s, f in out if not f.firing] == [1, 11]  # the 4th healthy step in a row resolves


def test_only_changed_tensors_resolve() -> None:
    """Of two frozen tensors, one that starts changing drops out of the report."""
    records = [
        make_record(s, tensors=[weight(BASE, "a"), weight(BASE + (0.1 * s if s >= 3 else 0.0), "b")])
        for s in range(5)
    ]
    _, out = replay(UnchangedTensor(), records)
    assert [(s, f.tensors) for s, f in out] == [(1, ()), (2, ("a", "b")), (3, ("a",)), (4, ("a",))]


def test_repeated_steps_are_ignored() -> None:
    """A step delivered again (or sent by another rank) is not a new saved step."""
    records = steps(BASE, BASE) + steps(BASE, start=1) + steps(BASE, start=1)
    _, out = replay(UnchangedTensor(), records)
    assert [(s, f.firing) for s, f in out] == [(1, False)]


def test_fingerprint_compares_summary_not_elements() -> None:
    """A permutation keeps the fingerprint (documented limitation until the on-device allclose)."""
    rng = np.random.default_rng(0)
    _, out = replay(UnchangedTensor(), steps(BASE, rng.permutation(BASE), rng.permutation(BASE)))
    assert out[-1][1].firing


@pytest.mark.parametrize("params", [{"num_steps": 1}, {"rtol": -1.0}, {"collection_names": "weights"}])
def test_invalid_params(params: dict) -> None:
    """Invalid parameters raise ConfigError."""
    with pytest.raises(ConfigError):
        UnchangedTensor(**params)


def _stream(n: int) -> list[StepRecord]:
    records = []
    for s in range(n):
        frozen = (s // 10) % 2 == 0
        tensors = [weight(BASE + (0.0 if frozen else s), f"layer{i}.weight") for i in range(5)]
        tensors.append(weight(BASE * math.cos(s), "layer0.bias", "biases"))
        records.append(make_record(s, tensors=tensors))
    return records


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON after every record leaves the findings unchanged."""
    rule = UnchangedTensor()
    records = _stream(200)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert any(f.firing for _, f in plain) and any(not f.firing for _, f in plain)


def test_state_bounded() -> None:
    """The state holds one fingerprint and run length per tensor, however long the run."""
    rule = UnchangedTensor()
    state = rule.initialize()
    sizes = []
    for record in _stream(10_000):
        state, _ = rule.update(state, record)
        sizes.append(state_size(state))
    assert len(state["tensors"]) == 6
    assert max(sizes) < 2_000
    assert json.loads(json.dumps(state)) == state


def test_fingerprints_close_is_close_for_every_component() -> None:
    """The comparison of two fingerprints agrees with `close` on each component, for ordinary
    numbers, both zeros, overflowing differences, infinities and NaN, with and without equal_nan."""
    import itertools

    from tensorpulse.rules.functional import close, fingerprints_close

    values = [0.0, -0.0, 1.0, 1.0 + 1e-9, 1.1, 5, -3.0, 1e308, -1e308, math.inf, -math.inf, math.nan]
    for x, y in itertools.product(values, repeat=2):
        for rtol, atol, equal_nan in ((1e-5, 1e-8, False), (0.0, 0.0, True), (0.2, 0.0, False)):
            want = close(x, y, rtol, atol, equal_nan)
            assert fingerprints_close([x], [y], rtol, atol, equal_nan) is want, (x, y, rtol, atol, equal_nan)
            assert fingerprints_close([1.0, x], [1.0, y], rtol, atol, equal_nan) is want
