"""SaturatedActivation: per-unit in-range activity of tanh/sigmoid inputs decides, per layer."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import SaturatedActivation
from tensorpulse.rules import functional as F
from tensorpulse.rules.saturated_activation import HOOK_SIGMOID_RANGE, HOOK_TANH_RANGE
from tensorpulse.rules.testing import make_record, make_stats, replay, state_size
from tensorpulse.wire import ACTIVITY_EDGES, StepRecord, TensorStats

RANGES = {"tanh": HOOK_TANH_RANGE, "sigmoid": HOOK_SIGMOID_RANGE}
NAMES = {"tanh": "net.1/Tanh_input", "sigmoid": "net.3/Sigmoid_input"}


def in_range_histogram(x: np.ndarray, lo: float, hi: float) -> tuple[int, ...]:
    """What the hook sends: (units, units inside (lo, hi) in fewer than each edge fraction of samples)."""
    a = x.reshape(-1, x.shape[-1])
    frac = ((a > lo) & (a < hi)).mean(axis=0)
    return (a.shape[1], *(int((frac < e).sum()) for e in ACTIVITY_EDGES))


def layer_inputs(
    in_range_prob: np.ndarray, kind: str = "tanh", samples: int = 2000, seed: int = 0
) -> np.ndarray:
    """Inputs (samples, units) where unit j lies inside the non-saturated range with probability p[j]."""
    lo, hi = RANGES[kind]
    rng = np.random.default_rng(seed)
    inside = rng.random((samples, in_range_prob.size)) < in_range_prob
    saturated = np.where(rng.random(inside.shape) < 0.5, lo - 1.0 - rng.random(inside.shape), hi + 1.0)
    return np.where(inside, rng.uniform(0.9 * lo, 0.9 * hi, inside.shape), saturated)


def stats(x: np.ndarray, kind: str = "tanh", name: str | None = None) -> TensorStats:
    lo, hi = RANGES[kind]
    return make_stats(name or NAMES[kind], "activations", x, activity=in_range_histogram(x, lo, hi))


def test_healthy_layer_does_not_fire() -> None:
    """A layer whose units are in range half of the time does not fire; value is 0 %."""
    _, finding = SaturatedActivation().update(
        {}, make_record(1, tensors=[stats(layer_inputs(np.full(50, 0.5)))])
    )
    assert finding is not None and not finding.firing
    assert finding.value == 0.0 and finding.threshold == 50.0


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
def test_fires_on_saturated_layer(kind: str) -> None:
    """60 of 100 units never in range fires with value 60 % and the layer named."""
    prob = np.concatenate([np.zeros(60), np.full(40, 0.9)])
    _, finding = SaturatedActivation().update(
        {}, make_record(1, tensors=[stats(layer_inputs(prob, kind), kind)])
    )
    assert finding is not None and finding.firing
    assert finding.value == pytest.approx(60.0)
    assert finding.tensors == (NAMES[kind],)
    assert "60.0 % of 100 units" in finding.message


@pytest.mark.parametrize(
    ("saturated", "rare_prob", "threshold_inactivity", "threshold_layer", "expected"),
    [
        (50, 0.0, 1.0, 50.0, False),  # exactly 50 % is not more than 50 %
        (51, 0.0, 1.0, 50.0, True),
        (60, 0.005, 1.0, 50.0, True),  # in range 0.5 % of the time: saturated at 1 %
        (60, 0.005, 0.1, 50.0, False),  # ... not at 0.1 %
        (60, 0.03, 1.0, 50.0, False),
        (60, 0.03, 5.0, 50.0, True),
        (60, 0.07, 10.0, 50.0, True),
        (60, 0.3, 10.0, 50.0, False),
        (60, 0.3, 50.0, 50.0, True),
        (30, 0.0, 1.0, 25.0, True),
        (30, 0.0, 1.0, 30.0, False),
        (1, 0.0, 1.0, 0.0, True),  # threshold_layer 0: any saturated unit
        (0, 0.0, 1.0, 0.0, False),
        (100, 0.0, 1.0, 100.0, False),  # nothing is more than 100 %
    ],
)
@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
def test_threshold_table(
    kind: str,
    saturated: int,
    rare_prob: float,
    threshold_inactivity: float,
    threshold_layer: float,
    expected: bool,
) -> None:
    """Saturated below threshold_inactivity % of samples in range; fires above threshold_layer % of units."""
    prob = np.concatenate([np.full(saturated, rare_prob), np.full(100 - saturated, 0.6)])
    rule = SaturatedActivation(threshold_inactivity=threshold_inactivity, threshold_layer=threshold_layer)
    record = make_record(1, tensors=[stats(layer_inputs(prob, kind, samples=20_000), kind)])
    _, finding = rule.update({}, record)
    assert finding is not None and finding.firing is expected


@pytest.mark.parametrize("value", [0.1, 1, 5, 10, 50])
def test_allowed_inactivity_thresholds(value: float) -> None:
    """Every histogram edge (in percent) is accepted."""
    assert SaturatedActivation(threshold_inactivity=value).params.threshold_inactivity == value


@pytest.mark.parametrize("value", [2.0, 0.5, 25, 100])
def test_other_inactivity_thresholds_rejected(value: float) -> None:
    """Any other threshold_inactivity raises ConfigError listing the allowed values."""
    with pytest.raises(ConfigError, match=r"allowed values .*0\.1, 1, 5, 10, 50"):
        SaturatedActivation(threshold_inactivity=value)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"threshold_tanh_min": 9.5}, "threshold_tanh_min < threshold_tanh_max"),
        ({"threshold_tanh_max": -9.4999}, "threshold_tanh_min < threshold_tanh_max"),
        ({"threshold_sigmoid_min": 17.0}, "threshold_sigmoid_min < threshold_sigmoid_max"),
        ({"threshold_layer": 101.0}, "invalid parameters"),
        ({"threshold_inactivity": 0.0}, "invalid parameters"),
        ({"tensor_regex": "("}, "invalid regular expression"),
    ],
)
def test_invalid_params(params: dict, match: str) -> None:
    """Inverted ranges, out-of-range percentages and bad regexes are ConfigErrors."""
    with pytest.raises(ConfigError, match=match):
        SaturatedActivation(**params)


def test_defaults_match_the_hook_ranges() -> None:
    """The range parameters default to the ranges the hook applies (SageMaker's defaults)."""
    p = SaturatedActivation().params
    assert (p.threshold_tanh_min, p.threshold_tanh_max) == (-9.4999, 9.4999)
    assert (p.threshold_sigmoid_min, p.threshold_sigmoid_max) == (-23.0, 16.99999)


DEAD = np.zeros(10)


@pytest.mark.parametrize(
    ("name", "regex", "selected"),
    [
        ("net.1/Tanh_input", None, True),
        ("net.1/tanh_input", None, True),  # the hook's lower-case spelling
        ("net.2/Sigmoid_input_1", None, True),  # second call of the module
        ("model/sigmoid_input", None, True),
        ("net.1/Tanh_output", None, False),
        ("net.1/relu_output", None, False),
        ("net.1/Tanh_input", "Sigmoid", False),
        ("net.7/custom_input", "custom_input", True),
    ],
)
def test_selection(name: str, regex: str | None, selected: bool) -> None:
    """The default regex matches tanh and sigmoid inputs in either spelling, and nothing else."""
    rule = SaturatedActivation() if regex is None else SaturatedActivation(tensor_regex=regex)
    _, finding = rule.update({}, make_record(1, tensors=[stats(layer_inputs(DEAD), name=name)]))
    assert (finding is not None and finding.firing) is selected
    assert (finding is None) is not selected


@pytest.mark.parametrize(
    "tensor",
    [
        make_stats("net.1/Tanh_input", "activations", None),  # no histogram
        make_stats("net.1/Tanh_input", "activation_inputs", np.ones(8)),  # captured without one
        make_stats("net.1/Tanh_input", "activations", None, activity=(0, 0, 0, 0, 0, 0)),  # no units
    ],
)
def test_returns_none_without_activity(tensor: TensorStats) -> None:
    """With no matching tensor carrying a histogram the rule checks nothing."""
    assert SaturatedActivation().update({}, make_record(1, tensors=[tensor]))[1] is None


def test_worst_layer_reported_and_resolves() -> None:
    """Value is the worst layer's %, only layers over the limit are listed, and it resolves."""
    bad = stats(layer_inputs(np.concatenate([np.zeros(80), np.full(20, 0.5)]), "sigmoid"), "sigmoid")
    ok = stats(layer_inputs(np.full(100, 0.5)))
    _, out = replay(SaturatedActivation(), [make_record(1, tensors=[ok, bad]), make_record(2, tensors=[ok])])
    assert [(s, f.firing, f.tensors) for s, f in out] == [(1, True, (NAMES["sigmoid"],)), (2, False, ())]
    assert out[0][1].value == pytest.approx(80.0)


def _raw_stream(steps: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Raw inputs per step for two layers whose share of rarely-in-range units drifts."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        layers = {}
        for kind in ("tanh", "sigmoid"):
            share = rng.uniform(0.2, 0.8)
            level = rng.choice([0.0, 0.004, 0.03, 0.08, 0.3])
            prob = np.where(rng.random(40) < share, level, 0.7)
            layers[kind] = layer_inputs(prob, kind, samples=500, seed=1000 * s + len(kind))
        out.append(layers)
    return out


def _records(raw: list[dict[str, np.ndarray]]) -> list[StepRecord]:
    return [
        make_record(s, tensors=[stats(x, kind) for kind, x in layers.items()]) for s, layers in enumerate(raw)
    ]


@pytest.mark.parametrize(
    ("threshold_inactivity", "threshold_layer"), [(1.0, 50.0), (5.0, 40.0), (10.0, 60.0)]
)
def test_matches_batch_reference(threshold_inactivity: float, threshold_layer: float) -> None:
    """Streaming findings equal a direct numpy restatement over the raw inputs of every step."""
    raw = _raw_stream(40)
    _, out = replay(
        SaturatedActivation(threshold_inactivity=threshold_inactivity, threshold_layer=threshold_layer),
        _records(raw),
    )
    expected = []
    for s, layers in enumerate(raw):
        percents = {}
        for kind, x in layers.items():
            lo, hi = RANGES[kind]
            in_range = ((x > lo) & (x < hi)).mean(axis=0)
            percents[NAMES[kind]] = 100.0 * float((in_range < threshold_inactivity / 100).mean())
        over = tuple(n for n, p in percents.items() if p > threshold_layer)
        expected.append((s, bool(over), max(percents.values()), over))
    assert [(s, f.firing, f.tensors) for s, f in out] == [(s, f, t) for s, f, _, t in expected]
    assert [f.value for _, f in out] == pytest.approx([v for _, _, v, _ in expected])
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _records(_raw_stream(30))
    _, plain = replay(SaturatedActivation(), records)
    for k in (1, 7):
        _, trip = replay(SaturatedActivation(), records, roundtrip_every=k)
        assert repr(trip) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state is the same size after 1k and after 100k steps."""
    rule = SaturatedActivation()
    records = _records(_raw_stream(10))
    state, sizes = rule.initialize(), {}
    for s in range(100_000):
        state, _ = rule.update(state, records[s % 10])
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] == sizes[1_000] == state_size(rule.initialize())


def test_inactive_layers_function() -> None:
    """functional.inactive_layers: worst % over tensors with activity, and those over the limit."""
    a = make_stats("a", "activations", None, activity=(10, 0, 6, 6, 6, 6))
    b = make_stats("b", "activations", None, activity=(4, 1, 1, 2, 2, 4))
    none = make_stats("c", "activations", None)
    assert F.inactive_layers([a, none, b], 0.01, 50.0) == (60.0, [("a", 60.0, 10)])
    assert F.inactive_layers([a, b], 0.05, 40.0) == (60.0, [("a", 60.0, 10), ("b", 50.0, 4)])
    assert F.inactive_layers([none], 0.01, 50.0) is None
