"""LossNotDecreasing: the windowed mean of the loss stopped improving, or rose."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field
from typing_extensions import NotRequired

from tensorpulse.errors import ConfigError
from tensorpulse.wire import MODES, StepRecord

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


class LossNotDecreasingParams(WindowedParams):
    collection_names: list[str] | None = None
    tensor_regex: str | None = None
    use_losses_collection: bool = True
    num_steps: int = Field(10, ge=1)
    diff_percent: float = Field(0.1, ge=0.0, le=100.0)
    increase_threshold_percent: float = Field(5.0, ge=0.0)
    mode: Literal["train", "eval", "predict", "global"] = "train"
    window: int | None = Field(None, ge=1)
    patience: int = Field(3, ge=1)
    converged_percent: float | None = Field(90.0, gt=0.0, le=100.0)


class LossNotDecreasing(Rule):
    """Fires when the loss has stopped decreasing (or rises), judged on two adjacent window means.

    Our definition. SageMaker compares the loss every `num_steps` steps with the loss `num_steps`
    earlier; on noisy minibatch losses that fires again and again on healthy runs (so does a
    "best window so far" comparison: one lucky window sets a bar the next ones cannot reach).
    Instead, every `num_steps` saved steps of mode `mode` (a check), the rule compares the mean
    R of the last `window` losses with the mean E of the `window` losses before them
    (`window` defaults to 3 x num_steps; the first check needs 2 x window losses). A check is
    stalled when R > E·(1 − diff_percent/100) and rising when R > E·(1 + increase_threshold_percent/100)
    (|E| for negative losses). The rule fires when `patience` consecutive checks were stalled or
    rising and, with hysteresis, resolves only at the `resolve_after`-th improving check in a row
    (default 10 checks = 100 steps; see WindowedParams: a noisy healthy loss passes and fails
    single checks, and each pass used to resolve the alert only for the next failure to raise it
    again). It returns None between checks.
    Convergence is not a stall: while R is at or below `converged_percent` % of the first window
    mean of the run (default 90, SageMaker has no such test; None disables), checks count as
    healthy. The default was 50: a loss had to halve before its plateau counted as convergence,
    so a cosine schedule flattening a loss at ~70 % of its start fired (the held-out corpus,
    tests/heldout.py, and issue 19's GPT-style run at 62 %). A loss that has come down 10 % and
    then levels off has learnt something; a run that stalls later is UnchangedTensor's and
    WeightUpdateRatio's to catch (frozen weights), and a loss that climbs back above the level is
    judged again. What stays for this rule: a loss that never moved from its start (a learning
    rate of 0, a disconnected graph, labels that carry no signal) and a rising loss.
    The loss of a record is scalar "loss" (or the sum of the scalars matching `tensor_regex`);
    NaN/inf losses (ExplodingTensor's business) and repeated or older steps are ignored.
    value = decrease of R against E in percent (negative when it rose), threshold = diff_percent.
    Simulated with 20 % Gaussian minibatch noise on exp(-step/200), the defaults stayed quiet in
    200 of 200 seeded 1000-step runs and caught a frozen learning rate (constant loss, same noise)
    after a median of 119 steps (90th percentile 169); tests/unit/test_rules_loss_not_decreasing.py
    checks both on fixed seeds; on real runs, see the held-out figures at the top of docs/rules.md.
    `modes` lists every mode so that eval losses can be watched; other modes are ignored.
    collection_names may only name "losses" (scalars carry no collection on the wire).
    The hook must send the loss as scalar "loss" at every saved step of the watched mode.
    """

    name: ClassVar[str] = "LossNotDecreasing"
    kind: ClassVar[RuleKind] = RuleKind.SCALAR
    Params: ClassVar[type[RuleParams]] = LossNotDecreasingParams

    class State(HoldState):
        last_step: int | None  # the last step taken
        losses: list[float]  # the last 2 x window losses
        since: int  # steps since the last check
        bad: int  # checks in a row that found no decrease
        first: NotRequired[float | None]  # the mean loss of the first full window

    modes: ClassVar[frozenset[str]] = frozenset(MODES)
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = 'the loss as scalar "loss" at every saved step of the watched mode'

    def _check(self) -> None:
        p = self.params
        self._regex: Regex | None = compile_regex(p.tensor_regex, "tensor_regex")
        others = sorted(set(p.collection_names or ()) - {"losses"})
        if others:
            raise ConfigError(
                f"rule {self.name}: collection_names {others} are not supported; losses are scalars, "
                "use collection_names=['losses'] or tensor_regex to select scalars by name"
            )
        uses_losses = p.use_losses_collection or "losses" in (p.collection_names or ())
        if self._regex is None and not uses_losses:
            raise ConfigError(
                f"rule {self.name}: nothing to watch: set tensor_regex or use_losses_collection=true"
            )

    def initialize(self) -> State:
        return {"last_step": None, "losses": [], "since": 0, "bad": 0, "first": None}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        if record.mode != p.mode or not F.is_new_step(state["last_step"], record.step):
            return state, None
        loss = F.loss_value(record.scalars, self._regex)
        if loss is None or not math.isfinite(loss):
            return state, None
        w = p.window or 3 * p.num_steps
        losses = F.push_window(state["losses"], loss, 2 * w)
        since = state["since"] + 1
        state = {**state, "last_step": record.step, "losses": losses, "since": since}
        if since < p.num_steps or len(losses) < 2 * w:
            return state, None
        state["since"] = 0
        earlier, recent = F.mean(losses[:w]), F.mean(losses[w:])
        first = state.get("first")
        if first is None:
            first = state["first"] = earlier
        if p.converged_percent is not None and first > 0 and recent <= first * p.converged_percent / 100:
            state["bad"] = 0  # converged: a plateau this far below the start is not a stall
            return hold(
                state,
                Finding(False, value=100.0 * (earlier - recent) / abs(earlier), threshold=p.diff_percent),
                p.resolve_after,
            )
        stalled = not F.improved(recent, earlier, p.diff_percent)
        rising = F.rose(recent, earlier, p.increase_threshold_percent)
        bad = F.consecutive(state["bad"], stalled or rising)
        state["bad"] = bad
        gain = 100.0 * (earlier - recent) / abs(earlier) if earlier else 0.0
        if bad < p.patience:
            return hold(state, Finding(False, value=gain, threshold=p.diff_percent), p.resolve_after)
        why = "rose" if rising else "did not decrease"
        return hold(
            state,
            Finding(
                True,
                value=gain,
                threshold=p.diff_percent,
                message=(
                    f"{p.mode} loss {why} over {bad} checks: mean of the last {w} steps {recent:.4g} at step "
                    f"{record.step} vs {earlier:.4g} for the {w} before (need -{p.diff_percent:g} %)"
                ),
            ),
            p.resolve_after,
        )
