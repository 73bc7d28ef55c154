"""Every rule declares one kind (RuleKind), and the kind matches what the rule does.

The stream layer and RuleTester route records by `Rule.kind` alone, so a kind that does not
match the rule's methods would silently drop ticks, other jobs' records or ranks. Rules written
before `kind` set the flags `clock`, `per_rank`, `cross_run`: those still give the kind.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from tensorpulse.rules import REGISTRY, Rule, RuleKind, VanishingGradient, run_rule
from tensorpulse.rules.config import spec_for
from tensorpulse.rules.cross_rank import CrossRankRule
from tensorpulse.rules.testing import make_record, make_stats
from tensorpulse.stream.evaluator import is_clock, is_cross_run, is_per_rank

RULES = sorted(REGISTRY.items())
#: Parameters a rule cannot do without.
REQUIRED: dict[str, dict[str, object]] = {
    "SimilarAcrossRuns": {"other_trials": ["other"]},
    "TensorVariance": {"max_threshold": 1.0},
    "Threshold": {"statistic": "mean", "op": ">", "value": 1.0},
}


def _declared_kind(cls: type[Rule]) -> RuleKind | None:
    """The kind written in the body of `cls` or of a base class below Rule (None: only Rule's default)."""
    for klass in cls.__mro__:
        if klass is Rule:
            return None
        if "kind" in vars(klass):
            return RuleKind(vars(klass)["kind"])
    return None


@pytest.mark.parametrize(("name", "cls"), RULES, ids=[n for n, _ in RULES])
def test_every_registered_rule_declares_a_kind_that_matches_its_methods(name: str, cls: type[Rule]) -> None:
    """Declared, not inherited from Rule; CLOCK iff check_idle, CROSS_RUN iff update_other, CROSS_RANK iff CrossRankRule."""
    kind = _declared_kind(cls)
    assert kind is not None, f"{name} does not declare kind"
    assert cls.kind is kind
    assert (cls.check_idle is not Rule.check_idle) == (kind is RuleKind.CLOCK)
    assert hasattr(cls, "update_other") == (kind is RuleKind.CROSS_RUN)
    assert hasattr(cls, "watches") == (kind is RuleKind.CROSS_RUN)
    assert issubclass(cls, CrossRankRule) == (kind is RuleKind.CROSS_RANK)
    # The older flags, for code that still reads them, agree with the kind.
    assert (cls.clock, cls.per_rank, cls.cross_run) == (
        kind is RuleKind.CLOCK,
        kind is not RuleKind.CROSS_RANK,
        kind is RuleKind.CROSS_RUN,
    )
    spec = spec_for(cls(**REQUIRED.get(name, {})))
    assert (is_clock(spec), is_per_rank(spec), is_cross_run(spec)) == (cls.clock, cls.per_rank, cls.cross_run)


def _run(with_tensors: bool) -> list:
    """Records with scalars (train and eval losses, an XGBoost node id) and, optionally, tensors."""
    rng = np.random.default_rng(3)
    records = []
    for step in range(300):
        loss = max(1.0 - step / 100, 0.2) + 0.01 * rng.standard_normal()
        grads = rng.normal(0, 1e-9 if step > 150 else 1.0, 64)
        tensors = [
            make_stats("gradient/fc.weight", "gradients", grads),
            make_stats("fc.weight", "weights", rng.normal(0, 1.0, 64)),
        ]
        scalars = {"loss": loss, "xgboost/max_node_id": float(2 ** min(step // 20, 12))}
        records.append(make_record(step, scalars=scalars, tensors=tensors if with_tensors else ()))
        if step % 10 == 9:
            eval_loss = 1.0 - step / 200 if step < 100 else 0.5 + (step - 100) / 100
            records.append(make_record(step, mode="eval", scalars={"loss": eval_loss}))
    return records


SCALAR_RULES = [(n, c) for n, c in RULES if c.kind is RuleKind.SCALAR]


@pytest.mark.parametrize(("name", "cls"), SCALAR_RULES, ids=[n for n, _ in SCALAR_RULES])
def test_scalar_rules_do_not_read_tensors(name: str, cls: type[Rule]) -> None:
    """A SCALAR rule's findings are the same whether or not the records carry tensors."""
    full = run_rule(cls(), _run(True))
    assert full, f"{name} checked nothing on these records: the comparison would prove nothing"
    assert run_rule(cls(), _run(False)) == full


def test_the_records_of_the_scalar_check_do_exercise_tensors() -> None:
    """Against the test above: a per-tensor rule does see the difference on the same records."""
    assert VanishingGradient.kind is RuleKind.PER_TENSOR
    assert run_rule(VanishingGradient(), _run(True)) != run_rule(VanishingGradient(), _run(False))


def test_older_flags_give_the_kind() -> None:
    """Custom rules written with `clock`, `per_rank` or `cross_run` keep working through `kind`."""

    class Stalls(Rule):
        clock = True

    class Ranks(Rule):
        per_rank: ClassVar[bool] = False

    class Runs(Rule):
        cross_run = True

    class Plain(Rule):
        clock = False

    class Declared(Rule):
        kind = RuleKind.SCALAR

    class Sub(Stalls):
        """Inherits its base's kind."""

    assert [c.kind for c in (Stalls, Ranks, Runs, Plain, Declared, Sub)] == [
        RuleKind.CLOCK,
        RuleKind.CROSS_RANK,
        RuleKind.CROSS_RUN,
        RuleKind.PER_TENSOR,
        RuleKind.SCALAR,
        RuleKind.CLOCK,
    ]
    assert (Ranks.per_rank, Declared.per_rank, Declared.clock) == (False, True, False)


def test_flags_naming_two_kinds_are_refused() -> None:
    """A class whose flags make it both a cross-rank and a clock rule fails when it is defined."""
    with pytest.raises(TypeError, match="a clock and a cross_rank rule"):

        class Both(Rule):
            clock = True
            per_rank = False

    with pytest.raises(TypeError, match="flags say 'clock'"):

        class Mixed(Rule):
            kind = RuleKind.CROSS_RUN
            clock = True


def test_kind_values_are_strings() -> None:
    """The kinds are plain strings too (for logs, JSON and the docs)."""
    assert [k.value for k in RuleKind] == ["per_tensor", "scalar", "cross_rank", "cross_run", "clock"]
    assert RuleKind("clock") is RuleKind.CLOCK and f"{RuleKind.SCALAR}" == "scalar"
