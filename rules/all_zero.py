"""AllZero: a tensor whose values are (almost) all zero."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from tensorpulse.wire import StepRecord

from .base import Finding, NoState, Regex, Rule, RuleKind, RuleParams, State, compile_regex

#: Collections skipped when neither collection_names nor tensor_regex is given.
DEFAULT_EXCLUDED = frozenset({"biases"})


class AllZeroParams(RuleParams):
    collection_names: list[str] | None = None
    tensor_regex: str | None = None
    threshold: float = Field(100.0, gt=0.0, le=100.0, description="percent of a tensor's values")


class AllZero(Rule):
    """Fires while at least `threshold` % of a selected tensor's values are exactly zero.

    Our definition: the zero fraction is the hook's exact count of elements equal to 0 over the
    element count (TensorStats.zero_frac; NaN is not zero). At each train step, over the
    non-empty tensors of `collection_names` matching `tensor_regex` (re.search), the rule fires if
    any tensor has zero fraction >= threshold / 100. When neither collection_names nor
    tensor_regex is given, every tensor except collection "biases" is selected: biases are
    routinely initialised to zero, and an all-zero bias at step 0 is not a fault.
    value: the largest zero percentage; threshold: `threshold`; tensors: those at or over it
    (record order). It resolves at the next step with a selected tensor where none is, and
    returns None at steps without a selected tensor. Stateless.
    The hook must capture the zero count and element count of the selected tensors.
    """

    name: ClassVar[str] = "AllZero"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = AllZeroParams
    #: Judges each record on its own: keeps nothing.
    State = NoState
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "zero count and element count of the selected tensors"

    def _check(self) -> None:
        p = self.params
        self._regex: Regex | None = compile_regex(p.tensor_regex, "tensor_regex")
        self._collections = None if p.collection_names is None else frozenset(p.collection_names)
        self._exclude = (
            DEFAULT_EXCLUDED if p.collection_names is None and p.tensor_regex is None else frozenset()
        )

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        limit = self.params.threshold
        percents = [
            (t.name, 100.0 * t.zero_frac)
            for t in record.select(self._collections, self._regex)
            if t.n > 0 and t.collection not in self._exclude
        ]
        if not percents:
            return state, None
        worst = max(pct for _, pct in percents)
        hits = [(name, pct) for name, pct in percents if pct >= limit]
        if not hits:
            return state, Finding(False, value=worst, threshold=limit)
        return state, Finding(
            True,
            value=worst,
            threshold=limit,
            tensors=tuple(name for name, _ in hits),
            message=(
                f"{len(hits)} tensor(s) with >= {limit:g} % zeros at step {record.step}; "
                f"{hits[0][0]}: {hits[0][1]:.1f} % zeros"
            ),
        )

    def batch_reference(self, records: Sequence[StepRecord]) -> list[Finding | None]:
        """Each record on its own (stateless): zero percentages from the raw counts, zeros / n."""
        limit = self.params.threshold
        out: list[Finding | None] = []
        for r in records:
            pct = [
                (t.name, 100.0 * t.zeros / t.n)
                for t in r.select(self._collections, self._regex)
                if t.n > 0 and t.collection not in self._exclude
            ]
            if not pct:
                out.append(None)
                continue
            over = tuple(n for n, v in pct if v >= limit)
            out.append(Finding(bool(over), max(v for _, v in pct), limit, over))
        return out
