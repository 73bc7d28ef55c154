"""The rule catalogue: SageMaker-Debugger-style rules as pure functions of (state, record).

`REGISTRY` maps each catalogue name to its class; `default_rules()` is the set a job gets when
no rules file says otherwise. Import as `tensorpulse.rules`.
"""

from __future__ import annotations

import difflib

from tensorpulse.errors import ConfigError

from .base import Finding, Rule, RuleParams, State, run_rule
from .dead_relu import DeadRelu
from .exploding_tensor import ExplodingTensor
from .loss_not_decreasing import LossNotDecreasing
from .overfit import Overfit
from .poor_weight_initialization import PoorWeightInitialization
from .unchanged_tensor import UnchangedTensor
from .vanishing_gradient import VanishingGradient

_CLASSES: tuple[type[Rule], ...] = (
    VanishingGradient,
    ExplodingTensor,
    DeadRelu,
    LossNotDecreasing,
    Overfit,
    UnchangedTensor,
    PoorWeightInitialization,
)

#: Catalogue name -> rule class.
REGISTRY: dict[str, type[Rule]] = {cls.name: cls for cls in _CLASSES}


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
    """One instance of every catalogued rule with its default parameters."""
    return [cls() for cls in _CLASSES]


__all__ = [
    "REGISTRY",
    "DeadRelu",
    "ExplodingTensor",
    "Finding",
    "LossNotDecreasing",
    "Overfit",
    "PoorWeightInitialization",
    "Rule",
    "RuleParams",
    "State",
    "UnchangedTensor",
    "VanishingGradient",
    "default_rules",
    "get_rule_class",
    "run_rule",
]
