"""ClassImbalance: the labels seen so far are badly imbalanced, or some class is mostly mispredicted."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, Regex, Rule, RuleKind, RuleParams, State, compile_regex


class ClassImbalanceParams(RuleParams):
    threshold_imbalance: float = Field(10.0, gt=0.0, description="largest / smallest class count")
    threshold_misprediction: float = Field(
        0.7, ge=0.0, le=1.0, description="fraction of a class mispredicted"
    )
    samples: int = Field(500, ge=1, description="labels to see before judging")
    argmax: bool = Field(False, description="accepted for SageMaker compatibility; no effect (see docs)")
    labels_regex: str | None = Field("labels", description="names of the label-count blocks (None: all)")
    predictions_regex: str | None = Field("labels", description="names of the confusion-count blocks")
    min_class_samples: int = Field(
        10, ge=1, description="samples a class needs before its misprediction counts"
    )


class ClassImbalance(Rule):
    """Fires while the label counts are imbalanced or a class's misprediction fraction is too high.

    Our definition: the hook's `record_labels` sends per step a label bincount (and, with
    predictions, k×k confusion counts) as StepRecord.classes[name]. The rule sums, over the train
    records it counts, the label counts of the blocks whose name matches `labels_regex`
    (re.search; None: every block), cumulatively from the first counted record, and, per class,
    the samples and correct predictions (confusion row sums and diagonal) of the blocks matching
    `predictions_regex` that carry confusion counts, in consecutive blocks of at least `samples`
    predicted labels (a block closes at the record that reaches `samples`; the next one starts
    empty). Both regexes default to "labels", the name `record_labels` uses. Blocks with
    different k are aligned on class id (the vectors grow to the largest k). A record is counted
    only if its step is newer than the last counted one (a redelivery or an older step is skipped).
    Once at least `samples` labels were counted, every counted record is judged:
    - imbalance: largest class count / smallest class count > threshold_imbalance, over the
      classes 0..k−1 of the largest k seen. A class with no samples counts as one sample, so the
      ratio stays finite and a class absent from the data fires once another class has more than
      threshold_imbalance samples (990 zeros and 10 ones: 99, fires; 500 samples spread over 1000
      ImageNet classes: about 3, does not). Classes the hook never sized cannot count: pass
      `num_classes` to record_labels so that unseen classes are part of k.
    - misprediction: in the last closed block of predictions, among the classes with at least
      `min_class_samples` samples in it (ours; 1 or 2 samples of a rare class say little), any
      class with 1 − correct/samples > threshold_misprediction. Blocks rather than cumulative
      counts (ours): on healthy 5-class MLP runs here, cumulative fractions kept the rule firing
      from step 3 to step 250-420, long after every class was learnt, and would dilute a later
      collapse; with blocks it fired on and off (2 to 4 alerts) until step 170-250, while one
      class was still almost never predicted (recall 0 up to step 130-240), and then stayed
      quiet. Expect such an alert early in a classification run: it resolves once every class
      is learnt.
    value/threshold: the ratio and threshold_imbalance when the imbalance holds or nothing holds,
    else the worst misprediction fraction and threshold_misprediction. tensors: "class <id>" of the
    largest and smallest class (imbalance), then the mispredicted classes, worst first. It resolves
    at the first judged record where neither condition holds. It returns None before `samples`
    labels and on records without a matching block.
    `argmax` is accepted for SageMaker compatibility and has no effect: the hook already reduces
    scores to class ids (argmax over dim 1) on the device before counting.
    State: the last counted step and five count vectors of length k (labels; the open block's
    samples and correct predictions; the last closed block's).
    The hook must call record_labels(labels, predictions) on train steps.
    """

    name: ClassVar[str] = "ClassImbalance"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = ClassImbalanceParams

    class State(TypedDict):
        step: int | None  # the last counted step
        labels: list[float]  # label count per class
        rows: list[float]  # the open block: samples per true class
        correct: list[float]  # the open block: correct predictions per class
        last: list[list[float]] | None  # the last complete block: [rows, correct]

    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "label counts and confusion counts (record_labels) on train steps"

    def _check(self) -> None:
        p = self.params
        self._labels: Regex | None = compile_regex(p.labels_regex, "labels_regex")
        self._predictions: Regex | None = compile_regex(p.predictions_regex, "predictions_regex")

    def initialize(self) -> State:
        return {"step": None, "labels": [], "rows": [], "correct": [], "last": None}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        labels = [c for n, c in record.classes.items() if self._labels is None or self._labels.search(n)]
        preds = [
            c
            for n, c in record.classes.items()
            if c.confusion is not None and (self._predictions is None or self._predictions.search(n))
        ]
        if not (labels or preds) or not F.is_new_step(state["step"], record.step):
            return state, None
        counts, rows, correct = state["labels"], state["rows"], state["correct"]
        for c in labels:
            counts = F.add_counts(counts, c.labels)
        for c in preds:
            k = c.k
            rows = F.add_counts(rows, [sum(c.confusion[i * k : (i + 1) * k]) for i in range(k)])  # type: ignore[index]
            correct = F.add_counts(correct, c.correct())  # type: ignore[arg-type]
        last = state["last"]
        if sum(rows) >= p.samples:
            last, rows, correct = [rows, correct], [], []
        state = {"step": record.step, "labels": counts, "rows": rows, "correct": correct, "last": last}
        if sum(counts) < p.samples:
            return state, None

        ratio, hi, lo = F.imbalance_ratio(counts)  # type: ignore[misc]
        wrong = (
            []
            if last is None
            else F.mispredicted(last[1], last[0], p.threshold_misprediction, p.min_class_samples)
        )
        imbalanced = ratio > p.threshold_imbalance
        if not imbalanced and not wrong:
            return state, Finding(False, value=ratio, threshold=p.threshold_imbalance)
        tensors: list[str] = []
        parts: list[str] = []
        if imbalanced:
            tensors += [f"class {hi}", f"class {lo}"]
            parts.append(
                f"class {hi} has {counts[hi]:g} of {sum(counts):g} labels, class {lo} {counts[lo]:g} "
                f"(ratio {ratio:.3g} > {p.threshold_imbalance:g})"
            )
        if wrong:
            tensors += [f"class {c}" for c, _ in wrong if f"class {c}" not in tensors]
            c, frac = wrong[0]
            parts.append(
                f"{len(wrong)} class(es) mostly mispredicted: class {c} {frac:.1%} wrong of "
                f"{last[0][c]:g} in the last {sum(last[0]):g} predictions (> {p.threshold_misprediction:.0%})"
            )
        value, threshold = (
            (ratio, p.threshold_imbalance) if imbalanced else (wrong[0][1], p.threshold_misprediction)
        )
        return state, Finding(
            True,
            value=value,
            threshold=threshold,
            tensors=tuple(tensors),
            message=f"at step {record.step}: " + "; ".join(parts),
        )
