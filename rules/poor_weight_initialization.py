"""PoorWeightInitialization: signs of a bad initialisation in the first steps of training."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, Regex, Rule, RuleKind, RuleParams, State, compile_regex

#: Normalisation-layer scales start as all ones on purpose; their constancy is not a bad init.
NORM_WEIGHTS_REGEX = r"(?i)norm|(^|[./_])(bn|ln|gn)\d*([./_]|$)"


class PoorWeightInitializationParams(RuleParams):
    activation_inputs_regex: str = ".*relu_input"
    threshold: float = Field(10.0, gt=0.0)
    distribution_range: float = Field(0.001, ge=0.0)
    patience: int | None = Field(None, ge=1)
    steps: int = Field(10, ge=1)
    constant_weights_exclude_regex: str | None = NORM_WEIGHTS_REGEX


class PoorWeightInitialization(Rule):
    """Fires when the first `steps` train steps show a poor initialisation.

    Our definition: counting from the first train step seen (index i = step − first step), at
    each new train step with i < `steps` the rule evaluates what the record carries:
    (a) over tensors of collection "activation_inputs" matching `activation_inputs_regex`
        (re.search), in capture order, the largest variance ratio between neighbouring layers
        > `threshold` (skipped with fewer than two such tensors; a zero variance next to a
        non-zero one is an infinite ratio). Neighbours, not max/min over the whole network:
        PyTorch's default init shrinks ReLU pre-activation variance ~6x per layer by design,
        so a global ratio fires on every healthy default-initialised net deeper than 2 layers;
    (b) over gradient tensors of more than one element carrying quantiles, min of the *relative* spread
        (p95 − p5) / max(|p5|, |p95|) < `distribution_range`: gradient values (nearly) all
        equal, the symmetry a constant initialisation causes. The absolute spread SageMaker
        describes depends on the loss scale and fired on healthy 6-layer nets here;
    (w) [ours] on the first record with weights (the initial ones, logged before the forward
        pass), a tensor of collection "weights" with n > 1 that is constant (min == max or
        std == 0), except names matching `constant_weights_exclude_regex` (norm-layer scales,
        which start at 1 by design; set it to null to check every weight);
    (c) the loss (scalar "loss") of the first step it was seen is not beaten by a later loss
        once `patience` steps have passed since then. Off by default (patience=None; SageMaker's
        default is 5): healthy runs here, default-initialised 4-6 layer ReLU nets and 2-layer
        MLPs at small learning rates, often had not beaten a noisy first minibatch loss after
        5-8 steps. Set patience to enable it.
    A verdict of (a) or (b) stands until a later record carries that data again; (w) is decided
    once. The rule fires if any verdict holds (the message says which; tensors = the constant
    weights, then the extreme-variance inputs, then the narrowest gradient) and resolves when
    none does. At steps >= `steps` it returns None forever, so the firing state stays as it
    was at the end of the window. It also returns None before any verdict exists.
    The hook must capture, in early steps: activation inputs ("activation_inputs"), gradient
    quantiles (p5, p95), weights before the first forward pass, and the loss.
    """

    name: ClassVar[str] = "PoorWeightInitialization"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = PoorWeightInitializationParams

    class State(TypedDict):
        first_step: int | None
        last_step: int | None
        done: bool
        var: list[float | str] | None  # [ratio, name of max, name of min]
        spread: list[float | str] | None  # [min p95 - p5, tensor]
        constant: list[str] | None
        loss0: list[float] | None  # [index, loss]
        decreased: bool

    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "early steps: activation_inputs variance, gradient p5/p95, initial weights, loss"

    def _check(self) -> None:
        p = self.params
        self._inputs: Regex | None = compile_regex(
            p.activation_inputs_regex, "activation_inputs_regex"
        )
        self._exclude: Regex | None = compile_regex(
            p.constant_weights_exclude_regex, "constant_weights_exclude_regex"
        )

    def initialize(self) -> State:
        return {
            "first_step": None,
            "last_step": None,
            "done": False,
            "var": None,  # [ratio, name of max, name of min] of the latest record with inputs
            "spread": None,  # [min p95 - p5, tensor] of the latest record with gradient quantiles
            "constant": None,  # names of constant initial weights, once decided
            "loss0": None,  # [index, loss] of the first loss seen
            "decreased": False,
        }

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        if state["done"] or not F.is_new_step(state["last_step"], record.step):
            return state, None
        first = record.step if state["first_step"] is None else state["first_step"]
        i = record.step - first
        state = {**state, "first_step": first, "last_step": record.step}
        if i >= p.steps:
            state["done"] = True
            return state, None

        inputs = record.select(["activation_inputs"], self._inputs)
        adjacent = F.adjacent_variance_ratio([t.variance for t in inputs])
        if adjacent is not None:
            ratio, k = adjacent
            state["var"] = [ratio, inputs[k].name, inputs[k + 1].name]
        spreads = [
            (F.relative_spread(t.quantiles), t.name)
            for t in record.select(["gradients"])
            if t.quantiles and t.n > 1  # one value has no spread (e.g. an FSDP2 shard of one element)
        ]
        spreads = [s for s in spreads if math.isfinite(s[0])]
        if spreads:
            state["spread"] = list(min(spreads))
        weights = record.select(["weights"])
        if state["constant"] is None and weights:
            state["constant"] = [
                t.name
                for t in weights
                if F.is_constant(t) and (self._exclude is None or not self._exclude.search(t.name))
            ]
        loss = record.scalars.get("loss")
        if loss is not None and math.isfinite(loss):
            if state["loss0"] is None:
                state["loss0"] = [i, float(loss)]
            elif loss < state["loss0"][1]:
                state["decreased"] = True
        return state, self._verdict(state, i)

    def _verdict(self, state: dict[str, Any], i: int) -> Finding | None:
        p = self.params
        var, spread, constant, loss0 = state["var"], state["spread"], state["constant"], state["loss0"]
        if var is None and spread is None and constant is None and loss0 is None:
            return None
        reasons: list[str] = []
        tensors: list[str] = []
        value: float | None = None
        threshold: float | None = None

        def hit(reason: str, names: list[str], v: float, th: float) -> None:
            nonlocal value, threshold
            reasons.append(reason)
            tensors.extend(n for n in names if n not in tensors)
            if value is None:
                value, threshold = v, th

        if constant:
            hit(f"constant initial weights: {', '.join(constant[:5])}", constant, len(constant), 0.0)
        if var is not None and var[0] > p.threshold:
            hit(
                f"activation input variance changes {var[0]:.3g}x between neighbouring layers "
                f"(> {p.threshold:g}: {var[1]} vs {var[2]})",
                [var[1], var[2]],
                var[0],
                p.threshold,
            )
        if spread is not None and spread[0] < p.distribution_range:
            hit(
                f"gradient values of {spread[1]} are nearly identical: (p95 - p5) / max(|p5|, |p95|) = "
                f"{spread[0]:.3g} < {p.distribution_range:g}",
                [spread[1]],
                spread[0],
                p.distribution_range,
            )
        if (
            p.patience is not None
            and loss0 is not None
            and not state["decreased"]
            and i - loss0[0] >= p.patience
        ):
            hit(
                f"loss did not decrease below its first value {loss0[1]:.4g} within {p.patience} steps",
                [],
                loss0[1],
                loss0[1],
            )
        if not reasons:
            return Finding(False, value=None if var is None else var[0], threshold=p.threshold)
        return Finding(
            True,
            value=float(value) if value is not None else None,
            threshold=threshold,
            tensors=tuple(tensors),
            message="poor weight initialisation: " + "; ".join(reasons),
        )
