"""The rule catalogue: SageMaker-Debugger-style rules as pure functions of (state, record).

`REGISTRY` maps each catalogue name to its class; `default_rules()` is the set a job gets when
no rules file says otherwise. Import as `tensorpulse.rules`.
"""

from __future__ import annotations

import difflib

from tensorpulse.errors import ConfigError

from .all_zero import AllZero
from .base import Finding, Rule, RuleKind, RuleParams, State, run_rule
from .check_input_images import CheckInputImages
from .class_imbalance import ClassImbalance
from .confusion import Confusion
from .dead_relu import DeadRelu
from .declarative import Threshold
from .early_stopping import EarlyStopping
from .exploding_tensor import ExplodingTensor
from .feature_importance_overweight import FeatureImportanceOverweight
from .loss_not_decreasing import LossNotDecreasing
from .nlp_sequence_ratio import NLPSequenceRatio
from .overfit import Overfit
from .overtraining import Overtraining
from .poor_weight_initialization import PoorWeightInitialization
from .rank_divergence import RankDivergence
from .saturated_activation import SaturatedActivation
from .similar_across_runs import SimilarAcrossRuns
from .stalled_training import StalledTrainingRule
from .tensor_variance import TensorVariance
from .tree_depth import TreeDepth
from .unchanged_tensor import UnchangedTensor
from .vanishing_gradient import VanishingGradient
from .weight_update_ratio import WeightUpdateRatio

_CLASSES: tuple[type[Rule], ...] = (
    VanishingGradient,
    ExplodingTensor,
    DeadRelu,
    LossNotDecreasing,
    Overfit,
    UnchangedTensor,
    PoorWeightInitialization,
    SaturatedActivation,
    WeightUpdateRatio,
    AllZero,
    StalledTrainingRule,
    ClassImbalance,
    CheckInputImages,
    NLPSequenceRatio,
    TreeDepth,
    FeatureImportanceOverweight,
    RankDivergence,
)

#: Catalogued rules that are not in the default set: TensorVariance has no default thresholds;
#: Overtraining's literal early-stopping test flaps on healthy noisy runs (see its docstring).
#: SimilarAcrossRuns needs `other_trials` (the jobs to compare with). EarlyStopping says when
#: training could stop, not that it is broken (and flaps on noisy losses like Overtraining).
#: Confusion's cumulative recall bar fires through whole healthy runs (see its docstring).
#: Threshold is the declarative rule: it has no meaning without the condition a rules file gives.
_OPT_IN: tuple[type[Rule], ...] = (
    SimilarAcrossRuns,
    TensorVariance,
    Overtraining,
    Confusion,
    EarlyStopping,
    Threshold,
)

#: Catalogue name -> rule class.
REGISTRY: dict[str, type[Rule]] = {cls.name: cls for cls in (*_CLASSES, *_OPT_IN)}


def get_rule_class(name: str) -> type[Rule]:
    """The rule class called `name`; ConfigError listing the known names (and close matches)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), REGISTRY, n=3, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in REGISTRY}
        close = [lowered[k] for k in difflib.get_close_matches(str(name).lower(), lowered, n=3, cutoff=0.6)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown rule {name!r}{hint} (known rules: {', '.join(sorted(REGISTRY))})")


def default_rules() -> list[Rule]:
    """One instance of every default-set rule (all but the opt-in ones) with its default parameters."""
    return [cls() for cls in _CLASSES]


__all__ = [
    "REGISTRY",
    "AllZero",
    "CheckInputImages",
    "ClassImbalance",
    "Confusion",
    "DeadRelu",
    "EarlyStopping",
    "ExplodingTensor",
    "FeatureImportanceOverweight",
    "Finding",
    "LossNotDecreasing",
    "NLPSequenceRatio",
    "Overfit",
    "Overtraining",
    "PoorWeightInitialization",
    "RankDivergence",
    "Rule",
    "RuleKind",
    "RuleParams",
    "SaturatedActivation",
    "SimilarAcrossRuns",
    "StalledTrainingRule",
    "State",
    "TensorVariance",
    "TreeDepth",
    "UnchangedTensor",
    "VanishingGradient",
    "WeightUpdateRatio",
    "default_rules",
    "get_rule_class",
    "run_rule",
]
