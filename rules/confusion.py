"""Confusion: per-class recall of the accumulated confusion matrix is too low, or one confusion too high."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, Regex, Rule, RuleKind, RuleParams, State, compile_regex

#: At most this many rows and cells are named in a Finding (k can be up to 256).
MAX_LISTED = 32


class ConfusionParams(RuleParams):
    category_no: int | None = Field(None, ge=1, description="number of classes (None: from the data)")
    labels: str | None = Field("labels", description="regex over the names of the label/confusion blocks")
    predictions: str | None = Field("labels", description="regex the same block's name must also match")
    min_diag: float = Field(0.9, ge=0.0, le=1.0)
    max_off_diag: float = Field(0.1, ge=0.0, le=1.0)
    min_class_samples: int = Field(10, ge=1, description="samples a row needs before it is judged")


class Confusion(Rule):
    """Fires while a row of the accumulated confusion matrix has low recall or a large off-diagonal share.

    Our definition: the hook's `record_labels(labels, predictions)` sends per step k×k confusion
    counts (row = label, column = prediction) in StepRecord.classes[name]. One block carries both
    labels and predictions, so a block counts when its name matches both `labels` and
    `predictions` (re.search; None matches every name; both default to "labels", the name
    record_labels uses): the two parameters are kept for SageMaker compatibility. The rule sums the
    counts of the counted train records (a record counts if its step is newer than the last counted
    one) into one matrix: category_no × category_no when it is set (a block with smaller k fills
    the top-left corner; a block with larger k is an error naming both), else growing to the
    largest k seen. Each row is normalised by its sum (recall); only rows with at least
    `min_class_samples` samples are judged (ours: one sample of a class is not a recall). The rule
    fires when a judged row's diagonal share < min_diag or any of its off-diagonal shares >
    max_off_diag (a perfect prediction never fires). The counts are cumulative (SageMaker's
    definition), so the untrained first steps weigh in until later steps dilute them: on healthy
    1000-step 5-class MLP runs here the cumulative smallest recall ended at 0.65-0.78 while the
    last 500 predictions had 0.91-0.97, and the rule fired at every step. It is a quality bar for
    a trained classifier more than a fault detector.
    value/threshold: the smallest diagonal share below min_diag and min_diag, else the largest
    off-diagonal share above max_off_diag and max_off_diag; when healthy, the smallest judged
    diagonal share and min_diag. tensors: "recall[i]" for each low row (lowest first), then
    "confusion[i,j]" for each large off-diagonal cell (largest first), at most 32 names. It
    resolves when the accumulated matrix passes both checks, and returns None while no row can be
    judged and on records without a matching block with confusion counts. State: the last counted step, k and k×k
    counts (k <= 256, the wire's limit for confusion counts).
    The hook must call record_labels(labels, predictions) on train steps.
    """

    name: ClassVar[str] = "Confusion"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = ConfusionParams

    class State(TypedDict):
        step: int | None  # the last counted step
        k: int  # classes
        m: list[float]  # the k x k confusion counts, row-major (true class, predicted)

    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "confusion counts (record_labels with predictions) on train steps"

    def _check(self) -> None:
        p = self.params
        self._labels: Regex | None = compile_regex(p.labels, "labels")
        self._predictions: Regex | None = compile_regex(p.predictions, "predictions")

    def initialize(self) -> State:
        k = self.params.category_no or 0
        return {"step": None, "k": k, "m": [0] * (k * k)}

    def _matches(self, name: str) -> bool:
        return all(r is None or r.search(name) for r in (self._labels, self._predictions))

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        blocks = [(n, c) for n, c in record.classes.items() if c.confusion is not None and self._matches(n)]
        if not blocks or not F.is_new_step(state["step"], record.step):
            return state, None
        matrix, k = state["m"], state["k"]
        for name, c in blocks:
            if p.category_no is not None and c.k > p.category_no:
                raise ValueError(
                    f"rule {self.name}: block {name!r} of job {record.job!r} at step {record.step} has "
                    f"{c.k} classes, more than category_no={p.category_no}"
                )
            matrix, k = F.add_square(matrix, k, c.confusion, c.k)  # type: ignore[arg-type]
        state = {"step": record.step, "k": k, "m": matrix}
        worst, low, high = F.confusion_violations(matrix, k, p.min_diag, p.max_off_diag, p.min_class_samples)
        if worst is None:
            return state, None
        if not low and not high:
            return state, Finding(False, value=worst, threshold=p.min_diag)
        tensors = [f"recall[{i}]" for i, _ in low] + [f"confusion[{i},{j}]" for i, j, _ in high]
        tensors = tensors[:MAX_LISTED]
        parts = []
        if low:
            i, share = low[0]
            parts.append(f"{len(low)} class(es) with recall < {p.min_diag:g}, lowest class {i}: {share:.3g}")
        if high:
            i, j, share = high[0]
            parts.append(
                f"{len(high)} confusion(s) > {p.max_off_diag:g}, largest: {share:.3g} of class {i} "
                f"predicted as {j}"
            )
        value, threshold = (low[0][1], p.min_diag) if low else (high[0][2], p.max_off_diag)
        return state, Finding(
            True,
            value=value,
            threshold=threshold,
            tensors=tuple(tensors),
            message=f"at step {record.step}: " + "; ".join(parts),
        )
