"""EarlyStopping: a monitored scalar stopped improving (Keras / Lightning EarlyStopping semantics)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, Rule, RuleKind, RuleParams, State


class EarlyStoppingParams(RuleParams):
    monitor: str = Field("loss", min_length=1, description="scalar name")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher is better")
    min_delta: float = Field(0.0, ge=0.0, description="improvement must exceed this (absolute)")
    patience: int = Field(3, ge=0, description="checks without improvement before firing")
    baseline: float | None = Field(None, description="the value must also beat this to reset the count")
    record_mode: Literal["train", "eval", "predict", "global"] = Field("eval", description="records to watch")


class EarlyStopping(Rule):
    """Fires while the monitored scalar has not improved for `patience` checks (as Keras counts "wait").

    Our definition (beyond SageMaker; Keras' and Lightning's EarlyStopping): a check is a record
    of mode `record_mode` (default "eval": a validation loss is what early stopping watches) that
    carries scalar `monitor` (default "loss") and whose step is newer than the last checked one
    (repeated or older steps, another rank or a redelivery, are skipped). As in Keras, every check
    adds one to `wait`; a check improves when its value is below the best so far by more than
    min_delta (mode "min"; above it by more than min_delta for "max"; the first finite value always
    improves), and then becomes the best; when it also beats `baseline` by more than min_delta
    (or no baseline is set) wait goes back to 0. NaN and ±inf never improve (they count as a check
    without improvement; ExplodingTensor reports them). The rule fires when wait > 0 and wait >=
    patience (with patience 0: at every check that does not reset wait). Unlike Keras, which
    stops only at an epoch that does not improve on the best, a value that improves on the best
    but not on the baseline can fire too: it is still not good enough.
    value: wait; threshold: patience; tensors: (monitor,) when firing. It resolves at the next
    check that resets wait, and returns None on records without the scalar or of older steps.
    With action "stop" in the rules file it stops the job, like the callbacks it is named after.
    State: the last step, the best value and wait.
    The hook must send scalar `monitor` on records of mode `record_mode`.
    """

    name: ClassVar[str] = "EarlyStopping"
    kind: ClassVar[RuleKind] = RuleKind.SCALAR
    Params: ClassVar[type[RuleParams]] = EarlyStoppingParams

    class State(TypedDict):
        step: int | None  # the last step judged
        best: float | None  # the best value so far
        wait: int  # checks since the last improvement

    modes: ClassVar[frozenset[str]] = frozenset({"eval"})
    severity: ClassVar[str] = "info"
    needs: ClassVar[str] = 'the monitored scalar (default "loss") on records of `record_mode` (default eval)'

    def _check(self) -> None:
        # The instance watches only its own mode; the stream layer reads `rule.modes`.
        self.modes = frozenset({self.params.record_mode})  # type: ignore[misc]

    def initialize(self) -> State:
        return {"step": None, "best": None, "wait": 0}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        value = record.scalars.get(p.monitor)
        if record.mode != p.record_mode or value is None or not F.is_new_step(state["step"], record.step):
            return state, None
        value = float(value)
        maximize = p.mode == "max"
        best, wait = state["best"], state["wait"] + 1
        if math.isfinite(value) and F.keras_improvement(value, best, p.min_delta, maximize):
            best = value
            if p.baseline is None or F.keras_improvement(value, p.baseline, p.min_delta, maximize):
                wait = 0
        state = {"step": record.step, "best": best, "wait": wait}
        if wait == 0 or wait < p.patience:
            return state, Finding(False, value=float(wait), threshold=float(p.patience))
        best_text = "none yet" if best is None else f"{best:.4g}"
        return state, Finding(
            True,
            value=float(wait),
            threshold=float(p.patience),
            tensors=(p.monitor,),
            message=(
                f"{p.record_mode} {p.monitor} has not improved by more than {p.min_delta:g} for {wait} "
                f"check(s) (patience {p.patience}; best {best_text}, now {value:.4g}) at step {record.step}"
            ),
        )
