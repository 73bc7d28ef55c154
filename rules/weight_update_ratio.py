"""WeightUpdateRatio: a weight update that is far too large or far too small for the weight."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from tensorpulse.errors import ConfigError
from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, NoState, Rule, RuleKind, RuleParams, State, range_finding


class WeightUpdateRatioParams(RuleParams):
    num_steps: int | None = Field(None, ge=1, description="oldest usable previous step: step - num_steps")
    large_threshold: float = Field(10.0, gt=0.0)
    small_threshold: float = Field(1e-8, ge=0.0)
    epsilon: float = Field(1e-9, ge=0.0)
    ignore_frozen: bool = True


class WeightUpdateRatio(Rule):
    """Fires while some weight's update ratio is above `large_threshold` or below `small_threshold`.

    Our definition: the update ratio of a weight tensor at a saved step is
    ‖w − w_prev‖ / (‖w_prev‖ + epsilon), with w_prev the same tensor at the hook's previous saved
    step (L2 norms over all elements, computed on the training side: TensorStats.delta). At each
    train step, over the tensors of collection "weights" that carry a delta, the rule fires if any
    ratio is > large_threshold or < small_threshold. With `num_steps` set, a delta counts only if
    its previous step is >= step − num_steps (a ratio over a longer gap says little about one
    update); without it every delta counts. A NaN ratio (non-finite weights, ExplodingTensor's
    business) is neither; 0/0 (a zero tensor that stayed zero, epsilon 0) is NaN.
    value/threshold: the largest ratio and large_threshold when any is too large, else the
    smallest ratio and small_threshold when any is too small; when healthy, the largest ratio and
    large_threshold. tensors: the offending weights, too large first (largest first), then too
    small (smallest first). It resolves at the next step with a usable delta where every ratio is
    in range, and returns None when no weight carries a usable delta (e.g. the hook's first saved
    step). Stateless. small_threshold must be below large_threshold (ConfigError otherwise).
    With `ignore_frozen` (default true; ours), weights that get no gradient in a record that carries
    gradients (requires_grad off: frozen on purpose) are left out; their ratio of 0 fired on every
    fine-tuning run with a frozen layer.
    The hook must capture the delta (update and previous L2 norms) of every weight tensor.
    """

    name: ClassVar[str] = "WeightUpdateRatio"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = WeightUpdateRatioParams
    #: Judges each record on its own: keeps nothing.
    State = NoState
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = (
        'delta (‖w − w_prev‖ and ‖w_prev‖) of every tensor of collection "weights" on train steps'
    )

    def _check(self) -> None:
        p = self.params
        if not p.small_threshold < p.large_threshold:
            raise ConfigError(
                f"rule {self.name}: expected small_threshold < large_threshold but got "
                f"{p.small_threshold:g} and {p.large_threshold:g}"
            )

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        oldest = None if p.num_steps is None else record.step - p.num_steps
        skip = F.frozen(record.tensors) if p.ignore_frozen else frozenset()
        ratios = [
            (t.name, F.update_ratio(t.delta.update_l2, t.delta.prev_l2, p.epsilon))
            for t in record.select(["weights"])
            if t.delta is not None and t.name not in skip and (oldest is None or t.delta.prev_step >= oldest)
        ]
        if not ratios:
            return state, None
        finding = range_finding(
            ratios,
            p.small_threshold,
            p.large_threshold,
            lambda large, small, worst, value, side, threshold: (
                f"{len(large)} weight(s) with update ratio > {p.large_threshold:g} and {len(small)} with "
                f"< {p.small_threshold:g} at step {record.step}; {worst}: "
                f"‖Δw‖/‖w‖ = {value:.3g} {side} {threshold:g}"
            ),
        )
        return state, finding
