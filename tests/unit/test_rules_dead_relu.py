"""DeadRelu: per-unit activity decides, never a layer's overall zero fraction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import DeadRelu
from tensorpulse.rules.testing import activity_histogram, make_record, make_stats, replay, state_size
from tensorpulse.wire import TensorStats


def relu_output(
    active_prob: np.ndarray, samples: int = 2000, seed: int = 0, name: str = "net.1/relu_output"
) -> TensorStats:
    """ReLU outputs (samples, units) where unit j is positive with probability active_prob[j]."""
    rng = np.random.default_rng(seed)
    active = rng.random((samples, active_prob.size)) < active_prob
    return make_stats(name, "activations", np.where(active, rng.random(active.shape) + 0.01, 0.0))


def test_healthy_layer_with_45_percent_zeros_does_not_fire() -> None:
    """A layer that is 45 % zeros but whose every unit is often active does not fire."""
    t = relu_output(np.full(100, 0.55))
    assert t.zero_frac == pytest.approx(0.45, abs=0.01)
    _, finding = DeadRelu().update({}, make_record(1, tensors=[t]))
    assert finding is not None and not finding.firing
    assert finding.value == 0.0


def test_fires_when_60_percent_of_units_never_active() -> None:
    """60 of 100 units never active fires with value 60 % and the layer named."""
    prob = np.concatenate([np.zeros(60), np.full(40, 0.9)])
    _, finding = DeadRelu().update({}, make_record(1, tensors=[relu_output(prob)]))
    assert finding is not None and finding.firing
    assert finding.value == pytest.approx(60.0)
    assert finding.threshold == 50.0
    assert finding.tensors == ("net.1/relu_output",)


@pytest.mark.parametrize(
    ("dead", "rare_prob", "threshold_inactivity", "threshold_layer", "expected"),
    [
        (50, 0.0, 1.0, 50.0, False),  # exactly 50 % is not more than 50 %
        (51, 0.0, 1.0, 50.0, True),
        (60, 0.005, 1.0, 50.0, True),  # active in 0.5 % of samples: dead at the 1 % threshold
        (60, 0.005, 0.1, 50.0, False),  # ... but alive at 0.1 %
        (60, 0.03, 1.0, 50.0, False),  # active in 3 %: alive at 1 % ...
        (60, 0.03, 5.0, 50.0, True),  # ... dead at 5 %
        (30, 0.0, 1.0, 25.0, True),
        (30, 0.0, 1.0, 50.0, False),
    ],
)
def test_threshold_table(
    dead: int, rare_prob: float, threshold_inactivity: float, threshold_layer: float, expected: bool
) -> None:
    """A unit is dead below threshold_inactivity % of samples; fires above threshold_layer % dead."""
    prob = np.concatenate([np.full(dead, rare_prob), np.full(100 - dead, 0.5)])
    rule = DeadRelu(threshold_inactivity=threshold_inactivity, threshold_layer=threshold_layer)
    _, finding = rule.update({}, make_record(1, tensors=[relu_output(prob, samples=20_000)]))
    assert finding is not None and finding.firing is expected


@pytest.mark.parametrize("value", [0.1, 1, 5, 10, 50, 1.0, 5.0])
def test_allowed_inactivity_thresholds(value: float) -> None:
    """Every histogram edge (in percent) is an accepted threshold_inactivity."""
    assert DeadRelu(threshold_inactivity=value).params.threshold_inactivity == value


@pytest.mark.parametrize("value", [2.0, 0.5, 25, 100])
def test_other_inactivity_thresholds_rejected(value: float) -> None:
    """Any other threshold_inactivity raises ConfigError listing the allowed values."""
    with pytest.raises(ConfigError, match=r"0\.1, 1, 5, 10, 50"):
        DeadRelu(threshold_inactivity=value)


@pytest.mark.parametrize(
    "tensor",
    [
        make_stats("net.1/relu_output", "activations", None),  # no activity captured
        make_stats("net.1/relu_output", "activations", None, activity=(0, 0, 0, 0, 0, 0)),  # no units
        make_stats("net.1/tanh_output", "activations", np.zeros((10, 4))),  # not a ReLU output
        make_stats("net.1.weight", "weights", np.zeros(10)),
    ],
)
def test_returns_none_without_matching_activity(tensor: TensorStats) -> None:
    """With no matching tensor that carries activity the rule checks nothing."""
    _, finding = DeadRelu().update({}, make_record(1, tensors=[tensor]))
    assert finding is None


def test_worst_layer_reported_and_resolves() -> None:
    """Value is the worst layer's dead %, only layers over the limit are listed, and it resolves."""
    bad = relu_output(np.concatenate([np.zeros(80), np.full(20, 0.5)]), name="net.3/relu_output")
    ok = relu_output(np.full(100, 0.5), name="net.1/relu_output")
    records = [make_record(1, tensors=[ok, bad]), make_record(2, tensors=[ok])]
    _, out = replay(DeadRelu(), records)
    assert [(s, f.firing, f.tensors) for s, f in out] == [
        (1, True, ("net.3/relu_output",)),
        (2, False, ()),
    ]
    assert out[0][1].value == pytest.approx(80.0)


def test_activity_histogram_helper() -> None:
    """The test helper counts units active in fewer than each edge fraction of samples."""
    a = np.zeros((1000, 4))
    a[:2, 1] = 1.0  # 0.2 %
    a[:30, 2] = 1.0  # 3 %
    a[:, 3] = 1.0  # 100 %
    assert activity_histogram(a) == (4, 1, 2, 3, 3, 3)


def _stream(steps: int) -> list:
    dead = np.concatenate([np.zeros(70), np.full(30, 0.5)])
    alive = np.full(100, 0.5)
    return [
        make_record(s, tensors=[relu_output(dead if s % 5 < 2 else alive, samples=64, seed=s)])
        for s in range(steps)
    ]


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON after every record leaves the findings unchanged."""
    rule = DeadRelu()
    records = _stream(100)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert [f.firing for _, f in plain] == [s % 5 < 2 for s in range(100)]


def test_state_bounded() -> None:
    """The state does not grow over 10k steps."""
    rule = DeadRelu()
    records = _stream(10)
    state = rule.initialize()
    for s in range(10_000):
        state, _ = rule.update(state, records[s % 10])
    assert state_size(state) == state_size(rule.initialize())
    assert json.loads(json.dumps(state)) == state
