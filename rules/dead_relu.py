"""DeadRelu: too many units of a ReLU layer are (almost) never active."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from tensorpulse.errors import ConfigError
from tensorpulse.wire import ACTIVITY_EDGES, StepRecord

from . import functional as F
from .base import Finding, NoState, Regex, Rule, RuleKind, RuleParams, State, compile_regex

#: The values threshold_inactivity may take: the activity histogram edges, in percent.
ALLOWED_INACTIVITY = tuple(round(e * 100, 6) for e in ACTIVITY_EDGES)


class DeadReluParams(RuleParams):
    tensor_regex: str = ".*relu_output"
    threshold_inactivity: float = Field(1.0, gt=0.0, le=100.0, description="percent of samples")
    threshold_layer: float = Field(50.0, ge=0.0, le=100.0, description="percent of a layer's units")


class DeadRelu(Rule):
    """Fires while more than `threshold_layer` % of a ReLU layer's units are dead.

    Our definition: a unit is dead when it is active (> 0) in fewer than `threshold_inactivity` %
    of the samples of the step; this comes from the per-unit activity histogram the hook sends
    (TensorStats.activity), never from the layer's zero fraction (a healthy ReLU layer is often
    40-60 % zeros). At each train step, over tensors whose name matches `tensor_regex`
    (re.search) and that carry activity, the rule fires if any tensor's dead-unit fraction is
    > threshold_layer / 100; value is the largest dead percentage, tensors the layers over the
    threshold (record order). It resolves at the next step with activity where no layer is over.
    It returns None when no matching tensor has activity. threshold_inactivity must be one of the
    histogram edges (0.1, 1, 5, 10, 50); anything else is a ConfigError. Stateless.
    The hook must capture per-unit activity histograms of ReLU outputs ("activations" collection).
    """

    name: ClassVar[str] = "DeadRelu"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = DeadReluParams
    #: Judges each record on its own: keeps nothing.
    State = NoState
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = 'per-unit activity histogram (TensorStats.activity) of ReLU outputs, "activations"'

    def _check(self) -> None:
        edge = F.activity_edge(self.params.threshold_inactivity)
        if edge is None:
            allowed = ", ".join(f"{v:g}" for v in ALLOWED_INACTIVITY)
            raise ConfigError(
                f"rule {self.name}: threshold_inactivity={self.params.threshold_inactivity:g} is not "
                f"supported; allowed values (percent of samples): {allowed}"
            )
        self._edge = edge
        self._regex: Regex | None = compile_regex(self.params.tensor_regex, "tensor_regex")

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        limit = self.params.threshold_layer
        worst = -1.0
        dead: list[str] = []
        first = ""
        for t in record.select(None, self._regex):
            frac = t.inactive_unit_fraction(self._edge)
            if frac is None:
                continue
            percent = 100.0 * frac
            worst = max(worst, percent)
            if percent > limit:
                if not dead:
                    first = f"{t.name}: {percent:.1f} % of {t.activity[0]} units"  # type: ignore[index]
                dead.append(t.name)
        if worst < 0.0:
            return state, None
        if not dead:
            return state, Finding(False, value=worst, threshold=limit)
        return state, Finding(
            True,
            value=worst,
            threshold=limit,
            tensors=tuple(dead),
            message=(
                f"{len(dead)} ReLU layer(s) with > {limit:g} % dead units (active in < "
                f"{self.params.threshold_inactivity:g} % of samples) at step {record.step}; {first}"
            ),
        )
