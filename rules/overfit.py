"""Overfit: the validation loss is well above the training loss and no longer improving."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field
from typing_extensions import NotRequired, TypedDict

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import (
    Finding,
    HoldState,
    Regex,
    Rule,
    RuleKind,
    RuleParams,
    State,
    WindowedParams,
    compile_regex,
    hold,
)


class OverfitParams(WindowedParams):
    tensor_regex: str | None = None
    start_step: int = Field(0, ge=0)
    patience: int = Field(3, ge=1)
    ratio_threshold: float = Field(0.1, ge=0.0)
    min_delta: float = Field(0.0, ge=0.0)
    min_rise_percent: float = Field(5.0, ge=0.0)
    eval_window: int = Field(3, ge=1)
    num_steps: int = Field(10, ge=1)


class _Check(TypedDict):
    """Overfit's open check (an evaluation step being summed)."""

    step: int
    sum: float
    count: int
    held: int
    train: NotRequired[float]
    smooth: NotRequired[float]


class Overfit(Rule):
    """Fires when eval loss exceeds train loss by `ratio_threshold` and stopped improving.

    Our definition (a generalisation gap alone is normal and must not fire): the loss of a
    record is scalar "loss" (or the sum of the scalars matching `tensor_regex`); NaN/inf losses
    are ignored. The train losses of the last `num_steps` new train steps form a window with
    mean T. Eval records with step >= start_step make checks; all eval records with the same
    step form one check whose eval loss E is the mean of their losses: the check is evaluated
    at each of them on the running mean (a later record of the same step revises it rather than
    counting as a new check), and is committed when an eval record of another step arrives. A
    check holds when (E − T)/|T| > ratio_threshold AND E >= best·(1 + min_rise_percent/100) − min_delta
    (the validation loss rose above its best: on healthy runs it wobbles by a few percent around
    its plateau, which is where early stopping would stop, not overfitting) AND T is below the
    train mean measured at the check that set best (validation stopped improving while training
    still improves), with best the lowest E of the committed checks (the first check never
    holds: nothing to compare). A run whose train loss stalls too is not overfitting (it has
    converged or diverged; LossNotDecreasing speaks to that). The rule
    fires when `patience` consecutive checks held (see Hysteresis below for when it resolves).
    E is smoothed: the mean eval loss of the last `eval_window` checks (default 3), and best is
    the lowest smoothed E so far. patience defaults to 3, not SageMaker's 1. Both because one
    noisy uptick of the validation loss while a normal generalisation gap exists is not
    overfitting: on healthy 1000-step MLP runs here the unsmoothed check fired on wobble.
    value = (E − T)/|T|, threshold = ratio_threshold. It returns None on train records and on
    eval records it cannot check (no loss, before start_step, no train loss seen yet, or a
    step older than the open check's).
    Hysteresis: once firing, the alert resolves at the `resolve_after`-th check in a row that does
    not hold (WindowedParams), not at the first one.
    The hook must send scalar "loss" on train steps and on eval records (mode "eval").
    """

    name: ClassVar[str] = "Overfit"
    kind: ClassVar[RuleKind] = RuleKind.SCALAR
    Params: ClassVar[type[RuleParams]] = OverfitParams

    class State(HoldState):
        train_step: int | None
        train: list[float]
        best: float | None
        train_at_best: float | None
        evals: NotRequired[list[float]]  # absent in states stored before it existed
        held: int
        check: _Check | None

    modes: ClassVar[frozenset[str]] = frozenset({"train", "eval"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = 'scalar "loss" on train steps and on eval records'

    def _check(self) -> None:
        self._regex: Regex | None = compile_regex(self.params.tensor_regex, "tensor_regex")

    def initialize(self) -> State:
        return {
            "train_step": None,  # last train step taken into the window
            "train": [],  # window of the last num_steps train losses
            "best": None,  # lowest eval loss of the committed checks
            "train_at_best": None,  # train window mean when that best eval loss was measured
            "evals": [],  # eval losses of the last committed checks (for the smoothed E)
            "held": 0,  # consecutive committed checks that held
            "check": None,  # the open check: {"step", "sum", "count", "held"}
        }

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        loss = F.loss_value(record.scalars, self._regex)
        if loss is None or not math.isfinite(loss):
            return state, None
        if record.mode == "train":
            if not F.is_new_step(state["train_step"], record.step):
                return state, None
            window = F.push_window(state["train"], loss, p.num_steps)
            return {**state, "train_step": record.step, "train": window}, None
        if record.step < p.start_step or not state["train"]:
            return state, None

        state = dict(state)
        check = state["check"]
        if check is not None and record.step < check["step"]:
            return state, None  # an older evaluation delivered again
        if check is not None and check["step"] != record.step:
            e_prev = check["sum"] / check["count"]
            state["evals"] = F.push_window(state.get("evals", []), e_prev, max(p.eval_window - 1, 0))
            e_smooth = check.get("smooth", e_prev)
            if state["best"] is None or e_smooth < state["best"]:
                state["best"], state["train_at_best"] = e_smooth, check.get("train")
            state["held"] = check["held"]
            check = None
        if check is None:
            check = {"step": record.step, "sum": 0.0, "count": 0, "held": 0}
        total, count = check["sum"] + loss, check["count"] + 1
        e = F.mean([*state.get("evals", []), total / count][-p.eval_window :])
        t = F.mean(state["train"])
        gap = F.relative_gap(e, t)
        best = state["best"]
        stalled = best is not None and e >= best * (1 + p.min_rise_percent / 100) - p.min_delta
        train_at_best = state.get("train_at_best")
        train_improving = train_at_best is None or t < train_at_best
        held = F.consecutive(state["held"], gap > p.ratio_threshold and stalled and train_improving)
        state["check"] = {
            "step": record.step,
            "sum": total,
            "count": count,
            "held": held,
            "train": t,
            "smooth": e,
        }
        if held < p.patience:
            return hold(state, Finding(False, value=gap, threshold=p.ratio_threshold), p.resolve_after)
        return hold(
            state,
            Finding(
                True,
                value=gap,
                threshold=p.ratio_threshold,
                message=(
                    f"eval loss {e:.4g} at step {record.step} is {gap:.1%} above the train loss {t:.4g} "
                    f"and not improving on its best {best:.4g} for {held} evaluation(s)"
                ),
            ),
            p.resolve_after,
        )
