"""TensorVariance: a tensor whose variance leaves a configured range."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from pydantic import Field

from tensorpulse.errors import ConfigError
from tensorpulse.wire import StepRecord

from .base import Finding, NoState, Regex, Rule, RuleKind, RuleParams, State, compile_regex, range_finding


class TensorVarianceParams(RuleParams):
    collection_names: list[str] | None = None
    tensor_regex: str | None = None
    max_threshold: float | None = Field(None, ge=0.0)
    min_threshold: float | None = Field(None, ge=0.0)


class TensorVariance(Rule):
    """Fires while a selected tensor's variance is above `max_threshold` or below `min_threshold`.

    Our definition: variance is the population variance over all elements (std², ddof=0, sent by
    the hook as std). At each train step, over the non-empty tensors of `collection_names`
    matching `tensor_regex` (re.search; neither given: every tensor of the record), the rule fires
    if any variance is > max_threshold or < min_threshold. At least one threshold is required and
    min_threshold must be below max_threshold (ConfigError otherwise); a missing one is not
    checked. A NaN variance (ExplodingTensor's business) is neither. value/threshold: the largest
    variance and max_threshold when any is too large, else the smallest and min_threshold; when
    healthy, the largest variance and max_threshold (the smallest and min_threshold when only
    min_threshold is set). tensors: the offending tensors, too large first (largest first), then
    too small (smallest first). It resolves at the next step with a selected tensor where all are
    in range, and returns None at steps without a selected tensor. Stateless. Not in the default
    rule set: it has no meaningful default thresholds.
    The hook must capture std of the selected tensors.
    """

    name: ClassVar[str] = "TensorVariance"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = TensorVarianceParams
    #: Judges each record on its own: keeps nothing.
    State = NoState
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "std of the selected tensors"

    def _check(self) -> None:
        p = self.params
        if p.max_threshold is None and p.min_threshold is None:
            raise ConfigError(
                f"rule {self.name}: expected at least one of max_threshold and min_threshold but got neither"
            )
        if (
            p.max_threshold is not None
            and p.min_threshold is not None
            and not p.min_threshold < p.max_threshold
        ):
            raise ConfigError(
                f"rule {self.name}: expected min_threshold < max_threshold but got "
                f"{p.min_threshold:g} and {p.max_threshold:g}"
            )
        self._regex: Regex | None = compile_regex(p.tensor_regex, "tensor_regex")
        self._collections = None if p.collection_names is None else frozenset(p.collection_names)

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        variances = [(t.name, t.variance) for t in record.select(self._collections, self._regex) if t.n > 0]
        if not variances:
            return state, None
        finding = range_finding(
            variances,
            p.min_threshold,
            p.max_threshold,
            lambda above, under, worst, value, side, threshold: (
                f"{len(above) + len(under)} tensor(s) with variance out of range at step {record.step}; "
                f"{worst}: variance {value:.3g} {side} {threshold:g}"
            ),
        )
        return state, finding

    def batch_reference(self, records: Sequence[StepRecord]) -> list[Finding | None]:
        """Each record on its own (stateless), with numpy: std² of the selected tensors against the bounds."""
        p = self.params
        hi = np.inf if p.max_threshold is None else p.max_threshold
        lo = -np.inf if p.min_threshold is None else p.min_threshold
        out: list[Finding | None] = []
        for r in records:
            selected = [t for t in r.select(self._collections, self._regex) if t.n > 0]
            if not selected:
                out.append(None)
                continue
            names = [t.name for t in selected]
            v = np.array([t.std for t in selected], dtype=np.float64) ** 2
            above = np.flatnonzero(v > hi)[np.argsort(-v[v > hi], kind="stable")]
            under = np.flatnonzero(v < lo)[np.argsort(v[v < lo], kind="stable")]
            finite = v[~np.isnan(v)]
            if len(above):
                out.append(
                    Finding(
                        True, float(v[above[0]]), p.max_threshold, tuple(names[i] for i in [*above, *under])
                    )
                )
            elif len(under):
                out.append(Finding(True, float(v[under[0]]), p.min_threshold, tuple(names[i] for i in under)))
            elif p.max_threshold is not None:
                out.append(Finding(False, float(finite.max()) if finite.size else None, p.max_threshold))
            else:
                out.append(Finding(False, float(finite.min()) if finite.size else None, p.min_threshold))
        return out
