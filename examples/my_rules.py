"""A custom tensorpulse rule: a gradient whose l2 norm jumps by a factor from one step to the next."""

import math

from pydantic import Field

from tensorpulse.rules import Finding, Rule, RuleParams, State
from tensorpulse.wire import StepRecord


class GradNormSpikeParams(RuleParams):
    factor: float = Field(10.0, gt=1.0)  # fire when l2 > factor x its value at the previous step


class GradNormSpike(Rule):
    """Fires when a gradient's l2 norm is more than `factor` times what it was at the previous step."""

    name = "GradNormSpike"
    Params = GradNormSpikeParams
    needs = "mean and std of the gradients (l2 is derived from them)"

    def initialize(self) -> State:
        return {"prev": {}}  # plain JSON: the worker stores it between records

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        now = {t.name: t.l2 for t in record.select(["gradients"]) if t.n and math.isfinite(t.l2)}
        if not now:
            return state, None  # nothing to check at this step
        limit = self.params.factor
        spikes = tuple(n for n, v in now.items() if v > limit * state["prev"].get(n, math.inf))
        message = f"gradient l2 rose more than {limit:g}x in one step: {', '.join(spikes)}"
        return {"prev": now}, Finding(bool(spikes), threshold=limit, tensors=spikes, message=message)
