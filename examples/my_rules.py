"""A custom tensorpulse rule: the gradients' global norm jumps far above its recent average."""

import math

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.rules import Finding, Rule, RuleKind, RuleParams
from tensorpulse.wire import StepRecord


class GradNormSpikeParams(RuleParams):
    factor: float = Field(10.0, gt=1.0)  # fire when the norm > factor x its recent average
    window: int = Field(10, ge=1)  # steps averaged (and seen before the first check)


class GradNormSpike(Rule):
    """Fires when the global gradient norm is more than `factor` times its recent average.

    One norm over every gradient tensor, not one per tensor: a single small gradient (a bias)
    swings by 5x between the minibatches of a healthy run, the global norm does not.
    """

    name = "GradNormSpike"
    Params = GradNormSpikeParams
    needs = "mean and std of the gradients (l2 is derived from them)"
    kind = RuleKind.PER_TENSOR  # reads tensor statistics, one state per rank (the default)

    class State(TypedDict):  # the state's fields: the worker checks a stored state against them
        avg: float  # the recent average of the norm
        seen: int  # finite norms seen so far

    def initialize(self) -> State:
        return {"avg": 0.0, "seen": 0}  # plain JSON: the worker stores it between records

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        grads = [t for t in record.select(["gradients"]) if t.n]
        if not grads:
            return state, None  # nothing to check at this step
        norm = math.sqrt(sum(t.l2**2 for t in grads))
        avg, seen = state["avg"], state["seen"]
        limit = self.params.factor * avg
        spike = seen >= self.params.window and not norm <= limit  # a NaN norm is a spike too
        top = max(grads, key=lambda t: t.l2 if math.isfinite(t.l2) else math.inf).name
        message = f"gradient norm {norm:.3g} is over {self.params.factor:g}x its recent average {avg:.3g}"
        if math.isfinite(norm):  # the mean of the first `window` norms, then a moving average
            seen += 1
            avg += (norm - avg) / min(seen, self.params.window)
        tensors = (top,) if spike else ()
        return {"avg": avg, "seen": seen}, Finding(spike, norm, limit, tensors, message)
