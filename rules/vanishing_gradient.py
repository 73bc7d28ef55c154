"""VanishingGradient: a gradient whose mean absolute value has fallen below a threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, NoState, Rule, RuleKind, RuleParams, State


class VanishingGradientParams(RuleParams):
    threshold: float = Field(1e-7, ge=0.0, description="mean(|g|) below this counts as vanishing")


class VanishingGradient(Rule):
    """Fires while any gradient tensor's mean absolute value is below `threshold`.

    Our definition: at every train step except step 0, over the tensors of collection
    "gradients" with n > 0, the rule fires if any abs_mean < threshold; value is the smallest
    abs_mean, tensors are the names below the threshold ordered from the smallest abs_mean
    (ties by name). A NaN abs_mean is not vanishing (ExplodingTensor reports it). It resolves
    (firing=False) at the first later step where no gradient is below the threshold. It returns
    None at step 0 and at steps without gradient statistics. Stateless.
    The hook must capture abs_mean of every gradient ("gradients" collection) on train steps.
    """

    name: ClassVar[str] = "VanishingGradient"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = VanishingGradientParams
    #: Judges each record on its own: keeps nothing.
    State = NoState
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = 'abs_mean of every tensor of collection "gradients" on train steps'

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        if record.step == 0:
            return state, None
        grads = [t for t in record.select(["gradients"]) if t.n > 0]
        if not grads:
            return state, None
        threshold = self.params.threshold
        hits = F.below(grads, threshold)
        if not hits:
            seen = [t.abs_mean for t in grads if not math.isnan(t.abs_mean)]
            return state, Finding(False, value=min(seen) if seen else None, threshold=threshold)
        names = tuple(t.name for t in hits)
        return state, Finding(
            True,
            value=hits[0].abs_mean,
            threshold=threshold,
            tensors=names,
            message=(
                f"{len(names)} gradient(s) vanishing at step {record.step}: {names[0]} has "
                f"mean |g| = {hits[0].abs_mean:.3g} < {threshold:g}"
            ),
        )

    def batch_reference(self, records: Sequence[StepRecord]) -> list[Finding | None]:
        """Each record judged on its own (the rule is stateless), from the definition above."""
        th = self.params.threshold
        out: list[Finding | None] = []
        for r in records:
            grads = {t.name: t.abs_mean for t in r.tensors if t.collection == "gradients" and t.n > 0}
            if r.step == 0 or not grads:
                out.append(None)
                continue
            low = sorted((v, n) for n, v in grads.items() if v < th)  # NaN < th is False
            finite = [v for v in grads.values() if not math.isnan(v)]
            out.append(
                Finding(True, low[0][0], th, tuple(n for _, n in low))
                if low
                else Finding(False, min(finite) if finite else None, th)
            )
        return out
