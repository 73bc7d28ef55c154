"""RuleTester over every rule of the registry (healthy and faulty runs), and the faults it must catch.

Each rule gets a synthetic run shaped for its inputs (no torch: the whole module runs in seconds):
a healthy run, on which it must stay quiet unless the table says why not, and a run with the
fault it names, on which it must fire. RuleTester checks both: batch reference (where the rule
has one), msgpack and JSON state round-trip after every record, determinism and purity, a reset
and a parameter change starting fresh, and bounded state over a long run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from typing_extensions import TypedDict

from tensorpulse.rules import REGISTRY, Finding, Rule, RuleParams, State
from tensorpulse.rules.base import declares_state
from tensorpulse.rules.testing import (
    RuleCheckError,
    RuleTester,
    UndeclaredStateWarning,
    lengthen,
    make_record,
    make_stats,
)
from tensorpulse.wire import ClassCounts, Delta, ImageSums, StepRecord, TokenCounts, Vector

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- synthetic runs


def run(
    steps: int = 160, *, fault: str = "", seed: int = 0, job: str = "job", rank: int = 0, world: int = 1
) -> list[StepRecord]:
    """A healthy training as records (weights, gradients, activations, loss, evals every 10 steps,
    labels, images, tokens, XGBoost scalars and importances), or with `fault` from step 30 on
    (from step 100 for "stall")."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (8, 8))
    after = 30
    out: list[StepRecord] = []
    for s in range(steps):
        bad = s >= after
        early = s < 10
        w = w + rng.normal(0, 0.01, w.shape)
        weight = w
        if fault == "constant_init" and s == 0:
            weight = np.full(w.shape, 0.05)
        elif fault == "frozen" and bad:
            weight = np.full(w.shape, 0.3)
        elif fault == "zeros" and bad:
            weight = np.zeros(w.shape)
        elif fault == "variance" and bad:
            weight = w * 30
        grad = rng.normal(0, 1e-9 if fault == "vanishing" and bad else 1e-2, (8, 8))
        update = 50.0 if fault == "big_update" and bad else 0.01
        dead = fault == "dead" and bad
        saturated = fault == "saturated" and bad
        scale = 100.0 if fault == "diverge" and bad and rank == 1 else 1.0
        relu = np.maximum(rng.normal(0, scale, (32, 16)), 0)
        tensors = [
            make_stats("net.0.weight", "weights", weight, delta=Delta(s - 1, update, 1.0) if s else None),
            make_stats("net.0.bias", "biases", rng.normal(0, 0.1, 8)),
            make_stats("gradient/net.0.weight", "gradients", grad, quantiles=early),
            make_stats("gradient/net.0.bias", "gradients", rng.normal(0, 1e-2, 8)),
            make_stats(
                "net.1/relu_output",
                "activations",
                relu,
                activity=(16, 0, 16, 16, 16, 16) if dead else (16, 0, 0, 0, 0, 2),
            ),
            make_stats(
                "net.3/Tanh_input",
                "activations",
                rng.normal(0, 30 if saturated else 1, (32, 8)),
                activity=(8, 0, 8, 8, 8, 8) if saturated else (8, 0, 0, 0, 0, 1),
            ),
        ]
        if early:
            tensors += [
                make_stats("net.0/relu_input", "activation_inputs", rng.normal(0, 1.0, 64)),
                make_stats("net.2/relu_input", "activation_inputs", rng.normal(0, 1.2, 64)),
            ]
        loss = 2.0 * math.exp(-s / 60) + 0.2 + rng.normal(0, 0.005)
        if fault == "rising_loss":
            loss = 1.0 + 0.005 * s + rng.normal(0, 0.005)
        elif fault == "nan" and s in (50, 51):
            loss = math.nan
        elif fault == "spike" and 40 <= s < 45:
            loss = 10.0
        loss *= scale
        labels = (60, 2, 2) if fault == "imbalance" else (22, 21, 21)
        confusion = (
            (10, 11, 0, 1, 19, 1, 0, 1, 20) if fault == "confusion" else (20, 1, 0, 1, 19, 1, 0, 1, 20)
        )
        mean0 = 0.8 if fault == "images" else 0.01
        importance = (
            (9.0, 5.0, 4.0, 0.1, 0.1, 0.1) if fault == "importance" else (1.0, 1.1, 0.9, 1.0, 1.2, 0.8)
        )
        out.append(
            dataclasses.replace(
                make_record(
                    s,
                    job=job,
                    rank=rank,
                    scalars={
                        "loss": loss,
                        "xgboost/max_node_id": 100.0 if fault == "deep_trees" and bad else 20.0,
                    },
                    tensors=tensors,
                    classes={"labels": ClassCounts(3, labels, confusion)},
                    images={"inputs": ImageSums(32, 64, (mean0 * 2048, 0.0, -0.01 * 2048), (2048.0,) * 3)},
                    tokens={"input_ids": TokenCounts(100, {0: 80 if fault == "tokens" and bad else 10})},
                    vectors={"feature_importance/gain": Vector(importance, tuple("abcdef"))},
                ),
                world=world,
                ts=s + 500.0 if fault == "stall" and s >= 100 else float(s),  # "stall": 400 s silent
            )
        )
        if s % 10 == 9:
            e = s // 10
            eval_loss = 2.0 * math.exp(-s / 60) + 0.25
            if fault == "overfit" and s >= 60:
                eval_loss = 1.0 + 0.3 * (s - 60) / 10
            out.append(
                dataclasses.replace(
                    make_record(e, mode="eval", job=job, rank=rank, scalars={"loss": eval_loss}), world=world
                )
            )
    return out


def ranks(fault: str = "") -> list[StepRecord]:
    """Two ranks of one job (world 2), interleaved step by step; `diverge`: rank 1 goes off."""
    a, b = run(fault=fault, seed=0, rank=0, world=2), run(fault=fault, seed=1, rank=1, world=2)
    return [r for pair in zip(a, b, strict=True) for r in pair]


def twins(fault: str = "") -> list[StepRecord]:
    """This job and job "twin" interleaved; healthy: the same seed (identical statistics);
    `differs`: the twin has another seed."""
    a = run(seed=0)
    b = run(seed=1 if fault else 0, job="twin")
    return [r for pair in zip(a, b, strict=True) for r in pair]


@dataclass(frozen=True)
class Case:
    """How one rule is tested: its parameters, the fault it must catch, the parameter change."""

    fault: str
    other: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    records: str = "run"  # or "ranks", "twins"
    #: Why the rule fires on the healthy run (None: it must not).
    healthy_fires: str | None = None

    def make(self, faulty: bool) -> list[StepRecord]:
        fault = self.fault if faulty else ""
        return {"run": run, "ranks": ranks, "twins": twins}[self.records](fault=fault)


CASES: dict[str, Case] = {
    "VanishingGradient": Case("vanishing", {"threshold": 1e-3}),
    "ExplodingTensor": Case("nan", {"only_nan": True}),
    "DeadRelu": Case("dead", {"threshold_layer": 60.0}),
    "LossNotDecreasing": Case("rising_loss", {"patience": 4}),
    "Overfit": Case("overfit", {"patience": 2}),
    "UnchangedTensor": Case("frozen", {"num_steps": 4}),
    "PoorWeightInitialization": Case("constant_init", {"steps": 5}),
    "SaturatedActivation": Case("saturated", {"threshold_layer": 60.0}),
    "WeightUpdateRatio": Case("big_update", {"large_threshold": 5.0}),
    "AllZero": Case("zeros", {"threshold": 90.0}),
    "StalledTrainingRule": Case("stall", {"threshold": 120.0}, params={"threshold": 60.0}),
    "ClassImbalance": Case("imbalance", {"threshold_imbalance": 5.0}),
    "CheckInputImages": Case("images", {"threshold_mean": 0.5}),
    "NLPSequenceRatio": Case("tokens", {"token_thresholds_percent": "60"}),
    "TreeDepth": Case("deep_trees", {"depth": 5}),
    "FeatureImportanceOverweight": Case("importance", {"threshold": 0.9}),
    "RankDivergence": Case("diverge", {"ratio_threshold": 20.0}, records="ranks"),
    "SimilarAcrossRuns": Case(
        "differs", {"other_trials": "^tw"}, params={"other_trials": ["twin"]}, records="twins"
    ),
    "TensorVariance": Case("variance", {"max_threshold": 20.0}, params={"max_threshold": 10.0}),
    "Overtraining": Case(
        "rising_loss",
        {"patience_train": 8},
        healthy_fires=(
            "SageMaker's literal test, 'you could stop here': by step 130 the healthy loss falls 0.003 a "
            "step, less than delta=0.01 in patience_train=5 steps (opt-in for that reason, see its docstring)"
        ),
    ),
    "Confusion": Case("confusion", {"min_diag": 0.8}),
    "EarlyStopping": Case("overfit", {"patience": 4}),
    "Threshold": Case(
        "spike", {"patience": 3}, params={"scalar": "loss", "op": ">", "value": 5.0, "patience": 2}
    ),
}

#: The rules that declare a batch reference (Rule.batch_reference). None yet for the stateless
#: DeadRelu, SaturatedActivation, WeightUpdateRatio, ExplodingTensor, FeatureImportanceOverweight;
#: the rest are state machines over windows, for which a second copy would check little.
#: StalledTrainingRule's covers `update` (the gaps), not check_idle.
WITH_REFERENCE = {
    "VanishingGradient",
    "AllZero",
    "TreeDepth",
    "Threshold",
    "TensorVariance",
    "StalledTrainingRule",
}


def test_every_registered_rule_has_a_case() -> None:
    """The table covers the whole registry, the opt-in rules included, and nothing else."""
    assert set(CASES) == set(REGISTRY)


@pytest.mark.parametrize("faulty", [False, True], ids=["healthy", "faulty"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_rule_passes_rule_tester(name: str, faulty: bool) -> None:
    """Every rule passes every RuleTester check on its healthy and its faulty run; it stays quiet
    on the healthy one and fires on the faulty one (unless the table says why not)."""
    case = CASES[name]
    tester = RuleTester(REGISTRY[name], other_params=case.other, **case.params)
    records = case.make(faulty)
    findings = tester.check(records)
    assert findings, f"{name} checked nothing on its {'faulty' if faulty else 'healthy'} run"
    fired = [(records[i].step, f.message) for i, f in findings if f is not None and f.firing]
    if not faulty:
        assert case.healthy_fires or not fired, f"{name} fired on the healthy run: {fired[:3]}"
    else:
        assert fired, f"{name} did not fire on the {case.fault!r} run"
    assert tester.check_reference(records) == (name in WITH_REFERENCE)
    assert declares_state(REGISTRY[name]) and tester.check_state(records), f"{name} declares no State"


def test_references_see_both_verdicts() -> None:
    """Each batch reference is compared on a run where the rule fires and one where it does not."""
    for name in WITH_REFERENCE:
        case = CASES[name]
        rule = REGISTRY[name](**case.params)
        for faulty in (False, True):
            records = [r for r in case.make(faulty) if r.mode in rule.modes]
            verdicts = {f.firing for f in rule.batch_reference(records) or [] if f is not None}
            fires = faulty and name != "StalledTrainingRule"  # its update never fires; check_idle does
            assert verdicts == ({False, True} if fires else {False}), name


def test_stalled_training_fires_between_records() -> None:
    """The clock rule the tester drives through `update` only: its state after a run makes
    `check_idle` fire once the threshold has passed, and not before."""
    rule = REGISTRY["StalledTrainingRule"](threshold=60.0)
    tester = RuleTester(rule)
    records = run()
    state, _ = tester.stream(rule, records)
    last = max(r.ts for r in records)  # the newest publish time (eval records count their own steps)
    assert not rule.check_idle(state, last + 59.0)[1].firing  # type: ignore[union-attr]
    assert rule.check_idle(state, last + 61.0)[1].firing  # type: ignore[union-attr]


def test_lengthen_moves_steps_on() -> None:
    """A lengthened run's steps keep rising per mode, and its deltas point at the previous step."""
    records = run(20)
    long = lengthen(records, 100)
    assert len(long) >= 100
    for mode in ("train", "eval"):
        steps = [r.step for r in long if r.mode == mode]
        assert steps == sorted(set(steps))
    deltas = [(r.step, t.delta.prev_step) for r in long for t in r.tensors if t.delta is not None]
    assert all(prev == step - 1 for step, prev in deltas)


# --------------------------------------------------------------------------- what it catches


class LossParams(RuleParams):
    limit: float = 1.0


class LossOver(Rule):
    """Toy rule: fires while scalar "loss" > limit; counts the records seen."""

    name: ClassVar[str] = "LossOver"
    Params = LossParams

    class State(TypedDict):
        n: int

    def initialize(self) -> State:
        return {"n": 0}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        loss = record.scalars.get("loss")
        if loss is None:
            return state, None
        return {"n": state["n"] + 1}, Finding(loss > self.params.limit, loss, self.params.limit)

    def batch_reference(self, records: Any) -> list[Finding | None]:
        limit = self.params.limit
        return [
            None if "loss" not in r.scalars else Finding(r.scalars["loss"] > limit, r.scalars["loss"], limit)
            for r in records
        ]


def losses(*values: float) -> list[StepRecord]:
    return [make_record(i, scalars={"loss": v}) for i, v in enumerate(values)]


def test_a_good_toy_rule_passes() -> None:
    """The toy rule itself passes, so each broken variant below fails for its own fault only."""
    findings = RuleTester(LossOver, limit=1.0, other_params={"limit": 2.0}).check(losses(0.5, 1.0, 1.5, 2.5))
    assert [f.firing for _, f in findings if f] == [False, False, True, True]


def test_takes_an_instance() -> None:
    """An instance is tested with its own parameters (fresh copies are built from them); parameters
    beside an instance are refused."""
    from tensorpulse.rules import Threshold

    rule = Threshold(scalar="loss", op=">", value=1.0, patience=2)
    tester = RuleTester(rule, other_params={"patience": 1})
    findings = tester.check(losses(2.0, 2.0, 0.5, 2.0))
    assert [f.firing for _, f in findings if f] == [False, True, False, False]
    assert tester.check_reference(losses(2.0, 2.0)) and tester.fresh().params == rule.params
    with pytest.raises(TypeError, match="pass the class"):
        RuleTester(rule, patience=3)


def test_catches_a_reference_mismatch() -> None:
    """`update` using >= where the definition says >: the record at the limit differs."""

    class AtLimit(LossOver):
        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            loss = record.scalars["loss"]
            return state, Finding(loss >= self.params.limit, loss, self.params.limit)

    with pytest.raises(
        RuleCheckError, match=r"AtLimit\(limit=1.0\) failed the reference check: at record 1 \(train step 1"
    ):
        RuleTester(AtLimit, limit=1.0).check(losses(0.5, 1.0, 1.5))


def test_catches_a_state_that_does_not_round_trip() -> None:
    """A tuple comes back from msgpack as a list; a set cannot be stored at all."""

    class Tuples(LossOver):
        def initialize(self) -> State:
            return {"last": (0,)}

        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            same = isinstance(state["last"], tuple)
            return {"last": (record.step,)}, Finding(not same, 0.0, 0.0)

    class Sets(LossOver):
        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            return {"seen": {record.step}}, None

    with pytest.raises(
        RuleCheckError, match=r"msgpack round-trip check: at record 1 .* differ: firing True vs False"
    ):
        RuleTester(Tuples).check_roundtrip(losses(1.0, 1.0, 1.0))
    with pytest.raises(
        RuleCheckError, match=r"the state after record 0 \(train step 0.*cannot be serialised"
    ):
        RuleTester(Sets).check_roundtrip(losses(1.0, 1.0))


def test_catches_state_kept_on_the_rule() -> None:
    """A rule that counts on `self` instead of in its state (the worker shares one instance)."""

    class OnSelf(LossOver):
        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            self.seen = getattr(self, "seen", 0) + 1
            return state, Finding(self.seen > 2, float(self.seen), 2.0)

    with pytest.raises(RuleCheckError, match=r"purity check: the rule changed its own attributes \['seen'\]"):
        RuleTester(OnSelf).check_deterministic(losses(1.0, 1.0, 1.0))


def test_catches_an_update_that_mutates_its_input() -> None:
    """`update` appending to the list of the state it was given (the store holds that state)."""

    class InPlace(LossOver):
        def initialize(self) -> State:
            return {"seen": []}

        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            state["seen"].append(record.step)
            return {"seen": state["seen"][-3:]}, None

    with pytest.raises(
        RuleCheckError, match=r"purity check: the rule changed the state it was given at record 0"
    ):
        RuleTester(InPlace).check_deterministic(losses(1.0, 1.0))


_counter = iter(range(1_000_000))


def test_catches_nondeterminism() -> None:
    """A rule whose finding depends on something outside its state and the record."""

    class Drifts(LossOver):
        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            return state, Finding(False, float(next(_counter)), 0.0)

    with pytest.raises(RuleCheckError, match=r"determinism check: at record 0 .* differ: value"):
        RuleTester(Drifts).check_deterministic(losses(1.0, 1.0))


def test_catches_a_reset_that_is_not_fresh() -> None:
    """initialize() handing out one shared dict that a shallow copy in update then changes."""
    shared: dict[str, list[int]] = {"seen": []}

    class Shared(LossOver):
        def initialize(self) -> State:
            return shared

        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            new = dict(state)
            new["seen"].append(record.step)
            return new, Finding(len(new["seen"]) > 2, float(len(new["seen"])), 2.0)

    with pytest.raises(
        RuleCheckError, match=r"reset check: initialize\(\) after a run gave \{'seen': \[0, 1\]\}"
    ):
        RuleTester(Shared).check_reset(losses(1.0, 1.0))


def test_catches_a_parameter_outside_params() -> None:
    """A setting kept outside Params does not change the state key: the new setting reads old state."""

    class Hidden(LossOver):
        def __init__(self, window: int = 3, **params: Any) -> None:
            super().__init__(**params)
            self.window = window

    with pytest.raises(RuleCheckError, match=r"parameter change check: .* reads the state stored under"):
        RuleTester(Hidden, window=3, other_params={"window": 5}).check_params_change(losses(1.0, 2.0))


def test_catches_unbounded_state() -> None:
    """A rule that keeps every loss: its state grows with the run."""

    class KeepsAll(LossOver):
        def initialize(self) -> State:
            return {"all": []}

        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            return {"all": [*state["all"], record.scalars["loss"]]}, None

    with pytest.raises(
        RuleCheckError, match=r"bounded state check: the state grows with the run: \d+ bytes after record \d+"
    ):
        RuleTester(KeepsAll).check_bounded(losses(*[1.0] * 20))


def test_catches_a_state_unlike_its_declaration() -> None:
    """A field of another type, a field the declaration does not name, a field missing from
    initialize(), and a tuple (a list once the store gave it back): each is named."""

    class Text(LossOver):
        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            return {"n": str(state["n"])}, None

    class Extra(LossOver):
        def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
            return {"n": 1, "last": record.step}, None

    class Missing(LossOver):
        def initialize(self) -> State:
            return {}

    class PairState(TypedDict):
        pair: tuple[int, int]

    class Pair(LossOver):
        State = PairState

        def initialize(self) -> State:
            return {"pair": (0, 0)}

    with pytest.raises(
        RuleCheckError,
        match=r"declared state check: the state after record 0 \(train step 0.* does not match "
        r"Text.State at n: Input should be a valid integer \(got '0'\)",
    ):
        RuleTester(Text).check_state(losses(1.0, 1.0))
    with pytest.raises(RuleCheckError, match=r"at last: a field the declared State does not name \(got 0\)"):
        RuleTester(Extra).check_state(losses(1.0))
    with pytest.raises(
        RuleCheckError, match=r"the state initialize\(\) returns does not match Missing.State at n: Field required"
    ):
        RuleTester(Missing).check_state(losses(1.0))
    with pytest.raises(
        RuleCheckError,
        match=r"initialize\(\) returns after a msgpack round-trip does not match Pair.State at pair: "
        r"Input should be a valid tuple",
    ):
        RuleTester(Pair).check_state(losses(1.0))


def test_asks_for_a_declaration() -> None:
    """A rule without `State` still runs and passes the other checks; the tester warns, once per check()."""

    class Undeclared(LossOver):
        State = Rule.State

    assert not declares_state(Undeclared) and declares_state(LossOver)
    with pytest.warns(UndeclaredStateWarning, match=r"does not declare its state's type: add a `State` TypedDict"):
        findings = RuleTester(Undeclared, limit=1.0).check(losses(0.5, 2.5))
    assert [f.firing for _, f in findings if f] == [False, True]


def test_refuses_parameters_that_change_nothing() -> None:
    """other_params equal to the tested ones would make the parameter-change check vacuous."""
    with pytest.raises(ValueError, match="change none of"):
        RuleTester(LossOver, limit=1.0, other_params={"limit": 1.0}).check_params_change(losses(1.0))


# --------------------------------------------------------------------------- the README example


@pytest.fixture
def examples_on_path() -> Iterator[None]:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        yield
    finally:
        sys.path.remove(str(ROOT / "examples"))


def test_readme_rule_tester_example(examples_on_path: None) -> None:
    """The README's RuleTester block runs as written (PYTHONPATH=examples, as it says)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:] if "RuleTester(" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme_example"})
