"""CheckInputImages: input images whose channel means are far from 0 (not normalised)."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, Regex, Rule, RuleKind, RuleParams, State, compile_regex

#: Image inputs tracked per job and rank; further names are not accumulated (state stays bounded).
MAX_INPUTS = 64


class CheckInputImagesParams(RuleParams):
    threshold_mean: float = Field(0.2, ge=0.0, description="largest allowed |channel mean|")
    threshold_samples: int = Field(500, ge=1, description="images to see before judging")
    regex: str | None = Field(None, description="names of the image inputs (None: all)")
    channel: int = Field(1, description="the channel axis; used by the hook (record_inputs), not here")


class _Sums(TypedDict):
    """One image input's running sums: images, values per channel (images x pixels), channel sums."""

    n: int
    v: int
    s: list[float]


class CheckInputImages(Rule):
    """Fires while an image input's mean over some channel differs from 0 by more than `threshold_mean`.

    Our definition: the hook's `record_inputs` sends per step and input name the number of
    images, the values per channel of one image, and per channel the sum (and sum of squares) of
    the values (StepRecord.images). Per input whose name matches `regex` (re.search; None: every
    input), the rule sums these over the train records it counts (a record counts if its step is
    newer than the last counted one); a channel's mean is its total sum / (images × values per
    channel). Once an input has at least `threshold_samples` images, it is judged at every counted
    record: the rule fires when any judged input has a channel with |mean| > threshold_mean
    (NaN means are skipped). If an input's channel count changes, its totals restart.
    value: the largest |mean| over the judged channels; threshold: threshold_mean; tensors: the
    inputs with an off channel (name order). It resolves when the running means come back within
    the threshold, and returns None until some input has threshold_samples images and on records
    without a matching input. State: the last counted step and, per input (at most 64), the image
    count, the values counted per channel and the channel sums.
    `channel` (default 1, NCHW) is the hook's concern: pass it to record_inputs(..., channel=) so
    the sums are taken per channel there; the rule keeps it for SageMaker compatibility only.
    The hook must call record_inputs(images, kind="images") on train steps.
    """

    name: ClassVar[str] = "CheckInputImages"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = CheckInputImagesParams

    class State(TypedDict):
        step: int | None  # the last counted step
        inputs: dict[str, _Sums]  # per input (at most MAX_INPUTS)

    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "per-channel sums of the input images (record_inputs) on train steps"

    def _check(self) -> None:
        self._regex: Regex | None = compile_regex(self.params.regex, "regex")

    def initialize(self) -> State:
        return {"step": None, "inputs": {}}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        blocks = [(n, im) for n, im in record.images.items() if self._regex is None or self._regex.search(n)]
        if not blocks or not F.is_new_step(state["step"], record.step):
            return state, None
        inputs = dict(state["inputs"])
        for name, im in blocks:
            acc = inputs.get(name)
            if acc is None and len(inputs) >= MAX_INPUTS:
                continue
            if acc is None or len(acc["s"]) != len(im.sums):
                acc = {"n": 0, "v": 0, "s": [0.0] * len(im.sums)}
            inputs[name] = {
                "n": acc["n"] + im.images,
                "v": acc["v"] + im.images * im.pixels,
                "s": F.add_counts(acc["s"], im.sums),
            }
        state = {"step": record.step, "inputs": inputs}

        worst: float | None = None
        off: list[tuple[str, int, float, int]] = []  # (input, channel, mean, images)
        for name in sorted(inputs):
            acc = inputs[name]
            if acc["n"] < p.threshold_samples or acc["v"] <= 0:
                continue
            means = [s / acc["v"] for s in acc["s"]]
            judged = [(c, m) for c, m in enumerate(means) if not math.isnan(m)]
            if not judged:
                continue
            c, m = max(judged, key=lambda cm: (abs(cm[1]), -cm[0]))
            worst = abs(m) if worst is None else max(worst, abs(m))
            if abs(m) > p.threshold_mean:
                off.append((name, c, m, acc["n"]))
        if worst is None:
            return state, None
        if not off:
            return state, Finding(False, value=worst, threshold=p.threshold_mean)
        name, c, m, n = max(off, key=lambda x: abs(x[2]))
        return state, Finding(
            True,
            value=worst,
            threshold=p.threshold_mean,
            tensors=tuple(o[0] for o in off),
            message=(
                f"{len(off)} image input(s) not normalised at step {record.step}: {name} channel {c} has "
                f"mean {m:.4g} over {n} images (|mean| > {p.threshold_mean:g})"
            ),
        )
