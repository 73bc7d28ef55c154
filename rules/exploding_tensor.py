"""ExplodingTensor: NaN or infinite values in a tensor or a scalar (loss, metric)."""

from __future__ import annotations

import re
from typing import ClassVar

from tensorpulse.wire import MODES, StepRecord

from . import functional as F
from .base import Finding, Rule, RuleParams, State, compile_regex

#: Collection names that select the scalars of a record (scalars carry no collection on the wire).
SCALAR_COLLECTIONS = frozenset({"losses", "metrics"})


class ExplodingTensorParams(RuleParams):
    collection_names: list[str] | None = None
    tensor_regex: str | None = None
    only_nan: bool = False


class ExplodingTensor(Rule):
    """Fires while a selected tensor or scalar holds NaN (or ±inf unless `only_nan`).

    Our definition: at every step of every mode, tensors are those in `collection_names` (all
    collections when None) whose name matches `tensor_regex` (re.search; all when None); a
    tensor is non-finite when its exact NaN count (or NaN + inf count) is > 0. A NaN min or max
    with a zero NaN count also counts as one NaN (min/max propagate NaN; a finite tensor cannot
    produce one). Sum, mean and l2 are never used: they overflow on finite tensors. Scalars are
    checked when `collection_names` is None or names "losses" or "metrics", restricted by
    `tensor_regex` when given; a scalar is non-finite when NaN (or ±inf unless only_nan).
    value = number of non-finite elements (one per scalar), tensors = offending names (tensors in
    record order, then scalars), and the message names the first. It resolves (firing=False) at
    the first step of a mode it sees with nothing non-finite. Stateless.
    The hook must capture exact NaN and inf counts per tensor, and send losses/metrics as scalars.
    """

    name: ClassVar[str] = "ExplodingTensor"
    Params: ClassVar[type[RuleParams]] = ExplodingTensorParams
    modes: ClassVar[frozenset[str]] = frozenset(MODES)
    severity: ClassVar[str] = "critical"
    needs: ClassVar[str] = "exact nan and inf counts of the selected tensors; losses and metrics as scalars"

    def _check(self) -> None:
        self._regex: re.Pattern[str] | None = compile_regex(self.params.tensor_regex, "tensor_regex")
        names = self.params.collection_names
        self._collections = None if names is None else frozenset(names)
        self._scalars = names is None or bool(SCALAR_COLLECTIONS & frozenset(names))

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        only_nan = self.params.only_nan
        offenders: list[str] = []
        details: list[str] = []
        count = 0
        for t in record.select(self._collections, self._regex):
            bad = F.nonfinite_count(t, only_nan)
            if bad:
                count += bad
                offenders.append(t.name)
                details.append(
                    f"tensor {t.name} has {bad} non-finite of {t.n} elements ({t.nan} NaN, {t.inf} inf; "
                    f"min {t.min}, max {t.max})"
                )
        if self._scalars:
            for key, value in F.select_scalars(record.scalars, self._regex).items():
                if F.scalar_nonfinite(value, only_nan):
                    count += 1
                    offenders.append(key)
                    details.append(f"scalar {key} = {value}")
        if not count:
            return state, Finding(False, value=0.0, threshold=0.0)
        more = f" (and {len(offenders) - 1} more)" if len(offenders) > 1 else ""
        return state, Finding(
            True,
            value=float(count),
            threshold=0.0,
            tensors=tuple(offenders),
            message=f"non-finite values at {record.mode} step {record.step}: {details[0]}{more}",
        )
