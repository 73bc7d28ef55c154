"""PoorWeightInitialization: early-step evidence of a bad init (variance spread, narrow grads, constants, loss)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import PoorWeightInitialization
from tensorpulse.rules.testing import make_record, make_stats, mlp_run, replay, state_size
from tensorpulse.wire import StepRecord, TensorStats

RNG = np.random.default_rng(0)


def kaiming(name: str, fan_in: int = 64, fan_out: int = 64) -> TensorStats:
    return make_stats(name, "weights", RNG.normal(0.0, math.sqrt(2.0 / fan_in), (fan_out, fan_in)))


def relu_input(name: str, std: float) -> TensorStats:
    return make_stats(name, "activation_inputs", RNG.normal(0.0, std, (128, 64)))


def gradient(name: str, spread: float) -> TensorStats:
    return make_stats(name, "gradients", RNG.normal(0.0, spread / 3.29, 4096), quantiles=True)


def healthy(step: int, loss: float, **replace: TensorStats) -> StepRecord:
    tensors = {
        "w1": kaiming("net.0.weight"),
        "w2": kaiming("net.2.weight"),
        "b1": make_stats("net.0.bias", "biases", np.zeros(64)),
        "x1": relu_input("net.1/relu_input", 1.0),
        "x2": relu_input("net.3/relu_input", 1.2),
        "g1": gradient("gradient/net.0.weight", 0.05),
        "g2": gradient("gradient/net.2.weight", 0.02),
    }
    tensors.update(replace)
    return make_record(step, scalars={"loss": loss}, tensors=list(tensors.values()))


def test_kaiming_mlp_does_not_fire_and_constant_mlp_does() -> None:
    """A real PyTorch MLP with He init never fires; the same MLP with constant weights does."""
    rule = PoorWeightInitialization()
    _, good = replay(rule, mlp_run(steps=30, init="kaiming", eval_every=0))
    _, bad = replay(rule, mlp_run(steps=30, init="constant", eval_every=0))
    assert [s for s, _ in good] == list(range(10))  # one check per step in the window, then None
    assert not any(f.firing for _, f in good)
    assert bad[0][1].firing
    assert {"net.0.weight", "net.2.weight", "net.4.weight"} <= set(bad[0][1].tensors)
    assert "constant initial weights" in bad[0][1].message


def test_tiny_init_fires_on_variance_ratio_and_narrow_gradients() -> None:
    """A real MLP with N(0, 1e-3²) weights shows the variance collapsing from one layer to the next."""
    _, out = replay(PoorWeightInitialization(), mlp_run(steps=12, init="small", eval_every=0))
    assert out[0][1].firing
    assert "variance changes" in out[0][1].message


@pytest.mark.parametrize(
    ("replace", "expected", "reason"),
    [
        ({}, False, ""),
        ({"w2": make_stats("net.2.weight", "weights", np.full((64, 64), 0.5))}, True, "constant"),
        ({"w2": make_stats("net.2.weight", "weights", np.zeros((64, 64)))}, True, "constant"),
        ({"w2": make_stats("net.2.weight", "weights", [0.5])}, False, ""),  # n == 1 is not constant
        ({"b1": make_stats("net.0.bias", "biases", np.full(64, 0.1))}, False, ""),  # biases may be
        ({"w2": make_stats("net.2.norm.weight", "weights", np.ones(64))}, False, ""),  # norm scales
        ({"w2": make_stats("layer1.bn1.weight", "weights", np.ones(64))}, False, ""),
        ({"x2": relu_input("net.3/relu_input", 4.0)}, True, "variance changes"),  # ratio 16
        ({"x2": relu_input("net.3/relu_input", 3.0)}, False, ""),  # ratio 9
        ({"x2": make_stats("net.3/relu_input", "activation_inputs", np.zeros(64))}, True, "variance changes"),
        ({"x2": relu_input("net.3/tanh_input", 100.0)}, False, ""),  # not a ReLU input: one left
        ({"g2": gradient("gradient/net.2.weight", 0.0005)}, False, ""),  # small but spread out
        (
            {
                "g2": make_stats(
                    "gradient/net.2.weight", "gradients", 0.01 + RNG.normal(0, 1e-7, 4096), quantiles=True
                )
            },
            True,
            "nearly identical",
        ),
        ({"g2": make_stats("gradient/net.2.weight", "gradients", np.zeros(100))}, False, ""),  # no quantiles
        # one element has no spread (an FSDP2 shard of a 3-element bias on 2 ranks holds one)
        ({"g2": make_stats("gradient/net.2.bias", "gradients", [0.25], quantiles=True)}, False, ""),
    ],
)
def test_condition_table(replace: dict, expected: bool, reason: str) -> None:
    """Each condition alone makes the first check fire, and the message says which one."""
    _, finding = PoorWeightInitialization().update(
        PoorWeightInitialization().initialize(), healthy(0, 2.3, **replace)
    )
    assert finding is not None and finding.firing is expected
    assert reason in finding.message


def test_constant_check_without_exclusions() -> None:
    """With constant_weights_exclude_regex=None a constant norm scale fires too."""
    rule = PoorWeightInitialization(constant_weights_exclude_regex=None)
    record = healthy(0, 2.3, w2=make_stats("net.2.norm.weight", "weights", np.ones(64)))
    _, finding = rule.update(rule.initialize(), record)
    assert finding is not None and finding.firing and finding.tensors == ("net.2.norm.weight",)


@pytest.mark.parametrize(
    ("losses", "patience", "expected"),
    [
        ([2.3] * 10, 5, [False] * 5 + [True] * 5),  # fires once patience steps passed
        ([2.3, 2.4, 2.35, 2.3, 2.31, 2.29, 2.3, 2.3, 2.3, 2.3], 5, [False] * 5 + [False] * 5),
        (
            [2.3, 2.4, 2.35, 2.3, 2.31, 2.32, 2.29, 2.3, 2.3, 2.3],
            5,
            [False] * 5 + [True, False, False, False, False],
        ),
        ([2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4], 5, [False] * 10),
        ([2.3] * 10, 2, [False] * 2 + [True] * 8),
    ],
)
def test_loss_condition(losses: list[float], patience: int, expected: list[bool]) -> None:
    """The loss must go below its first value within `patience` steps, or the rule fires."""
    rule = PoorWeightInitialization(patience=patience)
    _, out = replay(rule, [healthy(s, v) for s, v in enumerate(losses)])
    assert [f.firing for _, f in out] == expected


def test_window_counts_from_first_train_step_and_then_returns_none() -> None:
    """Checks cover `steps` steps from the first one seen; after that the rule returns None forever."""
    rule = PoorWeightInitialization(steps=4)
    records = [healthy(s, 2.3 - 0.01 * (s - 1000)) for s in range(1000, 1010)]
    records[1] = healthy(1001, 2.29, w2=make_stats("net.2.weight", "weights", np.full((4, 4), 0.5)))
    state, out = replay(rule, records)
    assert [s for s, _ in out] == [1000, 1001, 1002, 1003]
    assert state["done"] is True
    # constant weights were only judged on the first record with weights (the initial ones)
    assert not any(f.firing for _, f in out)


def test_verdicts_stand_until_new_data() -> None:
    """A variance verdict stands while later records carry no activation inputs."""
    rule = PoorWeightInitialization()
    first = healthy(0, 2.3, x2=relu_input("net.3/relu_input", 5.0))
    later = make_record(1, scalars={"loss": 2.2})
    _, out = replay(rule, [first, later, healthy(2, 2.1)])
    assert [f.firing for _, f in out] == [True, True, False]


def test_returns_none_before_any_verdict() -> None:
    """A first record with nothing to judge gives no finding."""
    rule = PoorWeightInitialization()
    _, finding = rule.update(rule.initialize(), make_record(0))
    assert finding is None


@pytest.mark.parametrize(
    "params", [{"steps": 0}, {"activation_inputs_regex": "("}, {"threshold": 0.0}, {"distribution": 1}]
)
def test_invalid_params(params: dict) -> None:
    """Invalid parameters raise ConfigError."""
    with pytest.raises(ConfigError):
        PoorWeightInitialization(**params)


def _stream(n: int) -> list[StepRecord]:
    records = [
        healthy(s, 2.3, x2=relu_input("net.3/relu_input", 4.0 if s % 3 == 0 else 1.0)) for s in range(12)
    ]
    return records + [make_record(s, scalars={"loss": 1.0}) for s in range(12, n)]


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON after every record leaves the findings unchanged."""
    rule = PoorWeightInitialization()
    records = _stream(50)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert any(f.firing for _, f in plain) and any(not f.firing for _, f in plain)


def test_state_bounded() -> None:
    """The state stops changing after the window, however long the run."""
    rule = PoorWeightInitialization()
    records = _stream(10_000)
    early, _ = replay(rule, records[:20])
    state, _ = replay(rule, records)
    assert state == early  # frozen once the window is over
    assert state_size(state) < 400
    assert json.loads(json.dumps(state)) == state
