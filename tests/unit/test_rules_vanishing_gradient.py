"""VanishingGradient: mean |g| below a threshold on any gradient, never at step 0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import VanishingGradient
from tensorpulse.rules.testing import make_record, make_stats, replay, state_size
from tensorpulse.wire import TensorStats


def grad(name: str, value: float, n: int = 100) -> TensorStats:
    return make_stats(f"gradient/{name}", "gradients", np.full(n, value), abs_mean=abs(value))


@pytest.mark.parametrize(
    ("step", "value", "expected"),
    [
        (0, 1e-8, None),  # step 0 is skipped
        (1, 1e-8, True),
        (1, -1e-8, True),  # the magnitude counts, not the sign
        (1, 1e-6, False),
        (1, 1e-7, False),  # strictly below the threshold
        (1, 0.0, True),
        (5, 0.3, False),
    ],
)
def test_threshold_table(step: int, value: float, expected: bool | None) -> None:
    """A single gradient fires exactly when its mean |g| is below 1e-7 after step 0."""
    _, finding = VanishingGradient().update({}, make_record(step, tensors=[grad("fc.weight", value)]))
    if expected is None:
        assert finding is None
    else:
        assert finding is not None and finding.firing is expected
        assert finding.threshold == 1e-7
        assert finding.value == pytest.approx(abs(value))


def test_reports_tensors_below_threshold_smallest_first() -> None:
    """Tensors lists every vanishing gradient, smallest mean |g| first, and value is that minimum."""
    record = make_record(
        3,
        tensors=[grad("a", 5e-8), grad("b", 1e-3), grad("c", 1e-9), grad("d", 5e-8)],
    )
    _, finding = VanishingGradient().update({}, record)
    assert finding is not None and finding.firing
    assert finding.tensors == ("gradient/c", "gradient/a", "gradient/d")
    assert finding.value == pytest.approx(1e-9)
    assert "gradient/c" in finding.message


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (make_stats("gradient/w", "gradients", None), None),  # n == 0: ignored
        (make_stats("gradient/w", "gradients", [1.0, math.nan]), False),  # NaN abs_mean is not vanishing
        (make_stats("fc.weight", "weights", np.zeros(10)), None),  # not a gradient
    ],
)
def test_ignored_tensors(tensor: TensorStats, expected: bool | None) -> None:
    """Empty tensors and other collections are ignored and a NaN abs_mean never fires."""
    _, finding = VanishingGradient().update({}, make_record(2, tensors=[tensor]))
    assert (None if finding is None else finding.firing) is expected


def test_custom_threshold_and_resolution() -> None:
    """With threshold=1e-6 a 5e-7 gradient fires, and a larger one at the next step resolves it."""
    rule = VanishingGradient(threshold=1e-6)
    records = [make_record(s, tensors=[grad("w", v)]) for s, v in [(1, 5e-7), (2, 5e-7), (3, 1e-2)]]
    _, out = replay(rule, records)
    assert [(s, f.firing) for s, f in out] == [(1, True), (2, True), (3, False)]


@pytest.mark.parametrize("params", [{"threshold": -1.0}, {"thresh": 1e-6}, {"threshold": "small"}])
def test_invalid_params(params: dict) -> None:
    """Negative, misspelt or mistyped parameters raise ConfigError."""
    with pytest.raises(ConfigError, match="VanishingGradient"):
        VanishingGradient(**params)


def _stream(steps: int) -> list:
    rng = np.random.default_rng(0)
    return [
        make_record(
            s, tensors=[grad("w", 1e-9 if s % 7 < 3 else 1e-3), grad("b", float(rng.uniform(1e-4, 1)))]
        )
        for s in range(steps)
    ]


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON after every record leaves the findings unchanged."""
    rule = VanishingGradient()
    records = _stream(200)
    _, plain = replay(rule, records)
    state, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert any(f.firing for _, f in plain) and any(not f.firing for _, f in plain)
    assert json.loads(json.dumps(state)) == state


def test_state_bounded() -> None:
    """The state does not grow over 10k steps."""
    rule = VanishingGradient()
    state, _ = replay(rule, _stream(10_000))
    assert state_size(state) <= state_size(rule.initialize()) + 16
