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
from tensorpulse.wire import MODES, ClassCounts, Delta, ImageSums, StepRecord, TokenCounts, Vector

#: SageMaker Debugger's 20 built-in rule names (deep-learning, universal, application, XGBoost).
SAGEMAKER = {
    "VanishingGradient", "ExplodingTensor", "PoorWeightInitialization", "SaturatedActivation",
    "DeadRelu", "WeightUpdateRatio", "TensorVariance", "AllZero", "UnchangedTensor",
    "LossNotDecreasing", "Overfit", "Overtraining", "ClassImbalance", "Confusion",
    "SimilarAcrossRuns", "StalledTrainingRule", "CheckInputImages", "NLPSequenceRatio",
    "TreeDepth", "FeatureImportanceOverweight",
}  # fmt: skip
#: Rules no peer has.
OURS = {"EarlyStopping", "RankDivergence", "Threshold"}
#: Catalogued but not in the default set (each says why in rules/__init__.py and its docstring).
OPT_IN = {"TensorVariance", "Overtraining", "Confusion", "SimilarAcrossRuns", "EarlyStopping", "Threshold"}
NAMES = [r.name for r in default_rules()]
#: Rules that compare ranks: a single-rank stream gives them nothing to check.
CROSS_RANK = {"RankDivergence"}
#: Default rules whose inputs a plain PyTorch MLP run does not produce (labels, images, tokens,
#: XGBoost trees, tanh layers, weight deltas, several ranks).
NEED_EXTRA_DATA = {
    "ClassImbalance", "CheckInputImages", "NLPSequenceRatio", "TreeDepth",
    "FeatureImportanceOverweight", "SaturatedActivation", "WeightUpdateRatio", "RankDivergence",
}  # fmt: skip


def test_registry_names() -> None:
    """The registry holds all 20 SageMaker rule names and ours, keyed by their catalogue name."""
    assert set(REGISTRY) == SAGEMAKER | OURS
    for name, cls in REGISTRY.items():
        assert cls.name == name and issubclass(cls, Rule)


def test_default_set_is_the_registry_minus_the_opt_in_rules() -> None:
    assert set(NAMES) == set(REGISTRY) - OPT_IN
    assert len(NAMES) == len(set(NAMES))


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
    assert all(n in message for n in REGISTRY)


def test_unknown_rule_without_match() -> None:
    """A name close to nothing still lists the known rules and suggests nothing."""
    with pytest.raises(ConfigError, match="known rules") as info:
        get_rule_class("Zzzz")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_get_rule_class(name: str) -> None:
    """Every catalogue name resolves to its class."""
    assert get_rule_class(name) is REGISTRY[name]


def test_default_rules() -> None:
    """default_rules() returns one fresh instance of each default rule, the original seven first."""
    instances = default_rules()
    assert [r.name for r in instances][:7] == [
        "VanishingGradient", "ExplodingTensor", "DeadRelu", "LossNotDecreasing", "Overfit",
        "UnchangedTensor", "PoorWeightInitialization",
    ]  # fmt: skip
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
    assert {n: sorted(REGISTRY[n].modes) for n in NAMES[:7]} == {
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
                np.maximum(rng.normal(-6.0 if s % 6 == 0 else 0.0, 1, (32, 16)), 0),
            ),
        ]
        saturated = s % 7 < 3
        tensors += [
            make_stats(
                "net.5/Tanh_input",
                "activations",
                rng.normal(0, 20 if saturated else 1, (32, 8)),
                activity=(8, 0, 6 if saturated else 0, 6 if saturated else 0, 7, 8),
            ),
            make_stats(
                "net.2.weight",
                "weights",
                rng.normal(size=16),
                delta=None if s == 0 else Delta(s - 1, 50.0 if s % 11 == 0 else 0.01, 1.0, 0.5),
            ),
            make_stats("gradient/net.2.weight", "gradients", np.full(16, 1e-2)),  # trained: not frozen
            make_stats("net.4.weight", "weights", np.zeros(16) if s % 13 < 2 else rng.normal(size=16)),
        ]
        loss = math.nan if s % 17 == 16 else float(1.0 + 0.3 * math.sin(s / 5) + rng.normal(0, 0.05))
        skewed = s % 50 < 25
        labels = (60, 2, 2) if skewed else (22, 21, 21)
        confusion = (50, 5, 5, 1, 1, 0, 1, 0, 1) if skewed else (20, 1, 1, 1, 19, 1, 1, 1, 19)
        out.append(
            make_record(
                s,
                scalars={"loss": loss, "xgboost/max_node_id": 40.0 if s % 9 < 3 else 10.0},
                tensors=tensors,
                classes={"labels": ClassCounts(3, labels, confusion)},
                images={"inputs": ImageSums(8, 64, (300.0 if s % 40 < 20 else 0.5, 1.0, 1.0), (1e4, 9.0, 9.0))},
                tokens={"input_ids": TokenCounts(100, {0: 80 if s % 30 < 15 else 10})},
                vectors={
                    "feature_importance/gain": Vector(
                        (9.0, 5.0, 4.0, 0.1, 0.1) if s % 20 < 10 else (1.0, 1.0, 1.0, 1.0, 1.0),
                        ("a", "b", "c", "d", "e"),
                    )
                },
            )
        )
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
    if rule.name not in CROSS_RANK:
        assert plain, f"{rule.name} produced no findings on the kitchen-sink stream"
        if rule.name != "StalledTrainingRule":  # fires only between records (check_idle)
            assert any(f.firing for _, f in plain), f"{rule.name} never fired on the kitchen-sink stream"


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
        assert out or rule.name in NEED_EXTRA_DATA, f"{rule.name} checked nothing"
        fired = [(s, f.message) for s, f in out if f.firing]
        assert not fired, f"{rule.name} fired on a healthy run: {fired[:3]}"


def test_defaults_fire_on_broken_training() -> None:
    """The same MLP with constant weights trips PoorWeightInitialization; a NaN loss trips ExplodingTensor."""
    records = mlp_run(steps=30, init="constant", eval_every=0)
    records.append(make_record(30, scalars={"loss": math.nan}))
    fired = {rule.name for rule in default_rules() if any(f.firing for _, f in replay(rule, records)[1])}
    assert {"PoorWeightInitialization", "ExplodingTensor"} <= fired
