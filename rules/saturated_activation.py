"""SaturatedActivation: too many units of a tanh or sigmoid layer sit in the flat part of the curve."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from tensorpulse.errors import ConfigError
from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, NoState, Regex, Rule, RuleKind, RuleParams, State, compile_regex
from .dead_relu import ALLOWED_INACTIVITY

#: The non-saturated input ranges the hook applies (SageMaker's defaults); see docs/wire-format.md.
HOOK_TANH_RANGE = (-9.4999, 9.4999)
HOOK_SIGMOID_RANGE = (-23.0, 16.99999)


class SaturatedActivationParams(RuleParams):
    tensor_regex: str = "(?i)(tanh|sigmoid)_input"
    threshold_tanh_min: float = HOOK_TANH_RANGE[0]
    threshold_tanh_max: float = HOOK_TANH_RANGE[1]
    threshold_sigmoid_min: float = HOOK_SIGMOID_RANGE[0]
    threshold_sigmoid_max: float = HOOK_SIGMOID_RANGE[1]
    threshold_inactivity: float = Field(1.0, gt=0.0, le=100.0, description="percent of samples")
    threshold_layer: float = Field(50.0, ge=0.0, le=100.0, description="percent of a layer's units")


class SaturatedActivation(Rule):
    """Fires while more than `threshold_layer` % of a tanh or sigmoid layer's units are saturated.

    Our definition: a unit is saturated when its input lies inside the non-saturated range
    (tanh: threshold_tanh_min … threshold_tanh_max, sigmoid: threshold_sigmoid_min …
    threshold_sigmoid_max) in fewer than `threshold_inactivity` % of the samples of the step. The
    hook applies the ranges on the device and sends, for the inputs of tanh and sigmoid modules
    (`<module>/Tanh_input`, `<module>/Sigmoid_input`), the per-unit activity histogram in which
    "active" means "inside the range" (TensorStats.activity, wire key `act`). The rule cannot
    re-apply other ranges to a histogram, so the four range parameters only document the hook's
    ranges and must equal them: the defaults do (SageMaker's defaults, HOOK_TANH_RANGE and
    HOOK_SIGMOID_RANGE); each min must be below its max (ConfigError otherwise).
    At each train step, over tensors whose name matches `tensor_regex` (re.search; the default
    matches both spellings, `Tanh_input` and `tanh_input`) and that carry activity, the rule fires
    if any tensor's saturated-unit fraction is > threshold_layer / 100; value is the largest
    saturated percentage, tensors the layers over the threshold (record order). It resolves at
    the next step with activity where no layer is over, and returns None when no matching tensor
    carries activity (e.g. an input captured without a histogram). threshold_inactivity must be
    one of the histogram edges (0.1, 1, 5, 10, 50); anything else is a ConfigError. Stateless.
    The hook must capture per-unit in-range activity histograms of tanh and sigmoid inputs
    ("activations" collection).
    """

    name: ClassVar[str] = "SaturatedActivation"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = SaturatedActivationParams
    #: Judges each record on its own: keeps nothing.
    State = NoState
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = (
        "per-unit in-range activity histogram (TensorStats.activity) of tanh and sigmoid inputs, "
        '"activations"'
    )

    def _check(self) -> None:
        p = self.params
        edge = F.activity_edge(p.threshold_inactivity)
        if edge is None:
            allowed = ", ".join(f"{v:g}" for v in ALLOWED_INACTIVITY)
            raise ConfigError(
                f"rule {self.name}: threshold_inactivity={p.threshold_inactivity:g} is not supported; "
                f"allowed values (percent of samples): {allowed}"
            )
        for kind in ("tanh", "sigmoid"):
            lo, hi = getattr(p, f"threshold_{kind}_min"), getattr(p, f"threshold_{kind}_max")
            if not lo < hi:
                raise ConfigError(
                    f"rule {self.name}: expected threshold_{kind}_min < threshold_{kind}_max "
                    f"but got {lo:g} and {hi:g}"
                )
        self._edge = edge
        self._regex: Regex | None = compile_regex(p.tensor_regex, "tensor_regex")

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        limit = self.params.threshold_layer
        result = F.inactive_layers(record.select(None, self._regex), self._edge, limit)
        if result is None:
            return state, None
        worst, over = result
        if not over:
            return state, Finding(False, value=worst, threshold=limit)
        name, percent, units = over[0]
        return state, Finding(
            True,
            value=worst,
            threshold=limit,
            tensors=tuple(n for n, _, _ in over),
            message=(
                f"{len(over)} tanh/sigmoid layer(s) with > {limit:g} % saturated units (input in range "
                f"in < {self.params.threshold_inactivity:g} % of samples) at step {record.step}; "
                f"{name}: {percent:.1f} % of {units} units"
            ),
        )
