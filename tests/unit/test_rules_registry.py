"""The rule catalogue: registry, lookup with suggestions, defaults, and the contract every rule keeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import tensorpulse.rules as rules
from tensorpulse.errors import ConfigError
from tensorpulse.rules import REGISTRY, Finding, Rule, RuleParams, default_rules, get_rule_class, run_rule
from tensorpulse.rules.testing import make_record, make_stats, mlp_run, replay
from tensorpulse.wire import MODES, StepRecord

NAMES = [
    "VanishingGradient",
    "ExplodingTensor",
    "DeadRelu",
    "LossNotDecreasing",
    "Overfit",
    "UnchangedTensor",
    "PoorWeightInitialization",
]


def test_registry_names() -> None:
    """The registry holds the seven SageMaker-named rules, keyed by their catalogue name."""
    assert sorted(REGISTRY) == sorted(NAMES)
    for name, cls in REGISTRY.items():
        assert cls.name == name and issubclass(cls, Rule)


def test_exports() -> None:
    """The package exports the contract types next to the registry."""
    assert rules.Finding is Finding and rules.RuleParams is RuleParams and rules.run_rule is run_rule


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("VanishingGradients", "VanishingGradient"),
        ("deadrelu", "DeadRelu"),
        ("Overfitting", "Overfit"),
        ("ExplodingTensors", "ExplodingTensor"),
    ],
)
def test_unknown_rule_suggests_close_match(name: str, suggestion: str) -> None:
    """An unknown name raises ConfigError with a close match and the list of known rules."""
    with pytest.raises(ConfigError) as info:
        get_rule_class(name)
    message = str(info.value)
    assert f"did you mean {suggestion}" in message
    assert all(n in message for n in NAMES)


def test_unknown_rule_without_match() -> None:
    """A name close to nothing still lists the known rules and suggests nothing."""
    with pytest.raises(ConfigError, match="known rules") as info:
        get_rule_class("Zzzz")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_get_rule_class(name: str) -> None:
    """Every catalogue name resolves to its class."""
    assert get_rule_class(name) is REGISTRY[name]


def test_default_rules() -> None:
    """default_rules() returns one fresh instance of each of the seven rules."""
    instances = default_rules()
    assert [r.name for r in instances] == NAMES
    assert default_rules()[0] is not instances[0]


@pytest.mark.parametrize("cls", REGISTRY.values(), ids=list(REGISTRY))
def test_rule_declarations(cls: type[Rule]) -> None:
    """Every rule declares a docstring, needs, valid modes and severity, and a strict Params model."""
    assert cls.__doc__ and len(cls.__doc__) > 200
    assert cls.needs and "\n" not in cls.needs
    assert cls.modes and cls.modes <= frozenset(MODES)
    assert cls.severity in ("info", "warning", "critical")
    with pytest.raises(ConfigError, match="invalid parameters"):
        cls(not_a_parameter=1)


def test_declared_modes() -> None:
    """The modes each rule watches (the stream layer only feeds these)."""
    assert {n: sorted(REGISTRY[n].modes) for n in NAMES} == {
        "VanishingGradient": ["train"],
        "ExplodingTensor": sorted(MODES),
        "DeadRelu": ["train"],
        "LossNotDecreasing": sorted(MODES),
        "Overfit": ["eval", "train"],
        "UnchangedTensor": ["train"],
        "PoorWeightInitialization": ["train"],
    }


def _kitchen_sink(steps: int) -> list[StepRecord]:
    """Records touching every rule's inputs, including NaNs, dead layers and frozen weights."""
    rng = np.random.default_rng(3)
    out = []
    for s in range(steps):
        frozen = s % 20 < 8
        tensors = [
            make_stats("net.0.weight", "weights", np.full(16, 0.5) if frozen else rng.normal(size=16)),
            make_stats(
                "gradient/net.0.weight",
                "gradients",
                rng.normal(0, 1e-9 if s % 9 == 0 else 1e-2, 64),
                quantiles=s < 10,
            ),
            make_stats("net.1/relu_input", "activation_inputs", rng.normal(0, 1 + (s % 4), 64)),
            make_stats("net.3/relu_input", "activation_inputs", rng.normal(0, 1, 64)),
            make_stats(
                "net.1/relu_output",
                "activations",
                np.maximum(rng.normal(-1.0 if s % 6 == 0 else 0.0, 1, (32, 16)), 0),
            ),
        ]
        loss = math.nan if s % 17 == 16 else float(1.0 + 0.3 * math.sin(s / 5) + rng.normal(0, 0.05))
        out.append(make_record(s, scalars={"loss": loss}, tensors=tensors))
        if s % 10 == 9:
            out.append(make_record(s // 10, mode="eval", scalars={"loss": 1.3 + 0.2 * math.sin(s / 30)}))
    return out


@pytest.mark.parametrize("rule", default_rules(), ids=NAMES)
def test_update_is_pure_and_state_is_json(rule: Rule) -> None:
    """update() never mutates the state it is given, and every state is JSON-serialisable."""
    state = rule.initialize()
    for record in _kitchen_sink(120):
        if record.mode not in rule.modes:
            continue
        frozen = json.dumps(state, sort_keys=True)
        new, finding = rule.update(state, record)
        assert json.dumps(state, sort_keys=True) == frozen
        assert finding is None or isinstance(finding, Finding)
        json.dumps(new)
        state = new


@pytest.mark.parametrize("rule", default_rules(), ids=NAMES)
def test_kitchen_sink_roundtrip(rule: Rule) -> None:
    """Every default rule gives the same findings when its state is JSON round-tripped each record."""
    records = _kitchen_sink(300)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert plain, f"{rule.name} produced no findings on the kitchen-sink stream"


def test_rules_keep_no_state_on_self() -> None:
    """Running a rule leaves the instance unchanged (its compiled settings only)."""
    for rule in default_rules():
        before = {k: repr(v) for k, v in vars(rule).items()}
        replay(rule, _kitchen_sink(60))
        assert {k: repr(v) for k, v in vars(rule).items()} == before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defaults_quiet_on_healthy_training(seed: int) -> None:
    """On a healthy PyTorch MLP run (falling train and validation loss) no default rule fires."""
    records = mlp_run(steps=200, seed=seed)
    evals = [r.scalars["loss"] for r in records if r.mode == "eval"]
    assert evals == sorted(evals, reverse=True)  # validation loss falls the whole time
    for rule in default_rules():
        _, out = replay(rule, records)
        assert out, f"{rule.name} checked nothing"
        fired = [(s, f.message) for s, f in out if f.firing]
        assert not fired, f"{rule.name} fired on a healthy run: {fired[:3]}"


def test_defaults_fire_on_broken_training() -> None:
    """The same MLP with constant weights trips PoorWeightInitialization; a NaN loss trips ExplodingTensor."""
    records = mlp_run(steps=30, init="constant", eval_every=0)
    records.append(make_record(30, scalars={"loss": math.nan}))
    fired = {rule.name for rule in default_rules() if any(f.firing for _, f in replay(rule, records)[1])}
    assert {"PoorWeightInitialization", "ExplodingTensor"} <= fired
