"""Threshold: a rule written in the rules file instead of Python — a statistic, a comparison, a patience.

```yaml
- rule: Threshold
  name: BigGradients
  params:
    collection_names: [gradients]
    tensor_regex: "\\.weight$"
    statistic: l2
    op: ">"
    value: 100.0
    patience: 3
```

Nothing the user writes is evaluated as code: the statistic and the operator are names from a
closed list (pydantic Literals), mapped here to attribute reads and `operator` functions.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, get_args

import numpy as np
from pydantic import Field, StrictStr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from tensorpulse.wire import MODES, StepRecord

from . import functional as F
from .base import Finding, Regex, Rule, RuleKind, RuleParams, State, compile_regex

Statistic = Literal[
    "mean", "std", "min", "max", "abs_mean", "l2", "variance", "zero_frac", "nan", "inf", "nonfinite"
]
Op = Literal[">", ">=", "<", "<=", "==", "!="]

STATISTICS: tuple[str, ...] = get_args(Statistic)
OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
#: The largest `num_steps` window: the window is kept in the rule state, one character per step.
MAX_WINDOW = 10_000


# --- pure helpers (table-tested) --------------------------------------------------------------


def holds(values: Sequence[float], op: str, value: float, reduce: str) -> bool:
    """Whether `values <op> value` holds for any (or all) values; NaNs are ignored, none left: False."""
    seen = [v for v in values if not math.isnan(v)]
    if not seen:
        return False
    hits = [OPS[op](v, value) for v in seen]
    return any(hits) if reduce == "any" else all(hits)


def deciding(values: Sequence[float], op: str, reduce: str) -> int:
    """Index of the value that decides the condition: for `any` the most extreme one in the
    operator's direction (largest for > and >=), for `all` the least extreme; the first for == and !=."""
    order = range(len(values))
    if op in (">", ">="):
        return (max if reduce == "any" else min)(order, key=lambda i: values[i])
    if op in ("<", "<="):
        return (min if reduce == "any" else max)(order, key=lambda i: values[i])
    return 0


def push_held(window: str, held: bool, size: int) -> str:
    """The window string ('1' held, '0' not, oldest first) with this step appended, at most `size` long."""
    return (window + ("1" if held else "0"))[-size:]


# --- the rule ---------------------------------------------------------------------------------


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as written (no "Value error, " prefix)."""
    return PydanticCustomError("threshold_params", message)


class ThresholdParams(RuleParams):
    scalar: StrictStr | None = None
    collection_names: list[StrictStr] | None = None
    tensor_regex: StrictStr | None = None
    statistic: Statistic | None = None
    op: Op
    value: float
    reduce: Literal["any", "all"] = "any"
    patience: int = Field(1, ge=1)
    num_steps: int | None = Field(None, ge=1, le=MAX_WINDOW)
    mode: Literal["train", "eval", "predict", "global"] = "train"

    @field_validator("collection_names", "tensor_regex", "statistic")
    @classmethod
    def _not_with_scalar(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("scalar") is not None:
            raise _invalid(
                f"'{info.field_name}' selects tensors but 'scalar' is set; use either 'scalar: NAME' "
                "or tensors with 'statistic'"
            )
        return v

    @field_validator("value")
    @classmethod
    def _not_nan(cls, v: float) -> float:
        if math.isnan(v):
            raise _invalid("must be a number, not NaN (use statistic nan or nonfinite to catch NaNs)")
        return v

    @field_validator("num_steps")
    @classmethod
    def _window_fits_patience(cls, v: int | None, info: ValidationInfo) -> int | None:
        patience = info.data.get("patience")
        if v is not None and patience is not None and v < patience:
            raise _invalid(f"must be at least patience ({patience}): the condition must fit in the window")
        return v

    @model_validator(mode="after")
    def _something_to_compare(self) -> ThresholdParams:
        if self.scalar is None and self.statistic is None:
            raise _invalid(
                f"expected 'statistic' (one of {', '.join(STATISTICS)}) to compare tensors, "
                "or 'scalar: NAME' to compare a scalar such as the loss"
            )
        return self


class Threshold(Rule):
    """Fires while a statistic of selected tensors, or a scalar, meets a comparison for `patience` steps.

    Our definition (declarative, for rules files): at each step of `mode` (default train; each mode
    has its own steps), the rule reads either the scalar named `scalar` (exact name) or, for every
    non-empty tensor of `collection_names` whose name matches `tensor_regex` (re.search; neither
    given: every tensor), the statistic `statistic` (mean, std, min, max, abs_mean, l2, variance =
    std², zero_frac = zeros / n, or the nan / inf / nonfinite counts). NaN values are ignored. The
    condition holds at the step if `value <op> threshold` holds for any (`reduce: any`) or all
    (`reduce: all`) of the values read. Steps without a value to read (and repeated or older steps)
    are not checked and return None. Without `num_steps` the rule fires once the condition has held at
    `patience` consecutive checked steps and resolves at the first checked step where it does not;
    with `num_steps` it fires while the condition held at >= `patience` of the last `num_steps`
    checked steps (fewer while the window fills up). value: the deciding value (for `any` the most
    extreme one in the operator's direction, for `all` the least extreme); threshold: `value`;
    tensors: the tensors (or the scalar) that met the condition at this step. State: the last
    step, plus the run length or the window (at most MAX_WINDOW characters).
    """

    name: ClassVar[str] = "Threshold"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = ThresholdParams

    class State(TypedDict, total=False):
        #: (every field may be absent: a state stored under other parameters still reads)
        last: int | None  # the last checked step
        run: int  # without num_steps: checked steps in a row that held
        w: str  # with num_steps: '1' held, '0' not, per checked step of the window, oldest first

    modes: ClassVar[frozenset[str]] = frozenset(MODES)
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "the chosen statistic of the selected tensors, or the named scalar"

    def _check(self) -> None:
        p = self.params
        self._regex: Regex | None = compile_regex(p.tensor_regex, "tensor_regex")
        self._collections = None if p.collection_names is None else frozenset(p.collection_names)
        # The instance watches only its own mode; the stream layer reads `rule.modes`.
        self.modes = frozenset({p.mode})  # type: ignore[misc]

    def initialize(self) -> State:
        return {"last": None, "run": 0} if self.params.num_steps is None else {"last": None, "w": ""}

    def _values(self, record: StepRecord) -> list[tuple[str, float]]:
        p = self.params
        if p.scalar is not None:
            v = record.scalars.get(p.scalar)
            return [] if v is None or math.isnan(v) else [(p.scalar, float(v))]
        out = []
        for t in record.select(self._collections, self._regex):
            if t.n > 0:
                v = float(getattr(t, p.statistic))
                if not math.isnan(v):
                    out.append((t.name, v))
        return out

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        # .get: a state saved under other parameters (num_steps added or removed) still reads.
        p = self.params
        if record.mode != p.mode or not F.is_new_step(state.get("last"), record.step):
            return state, None
        values = self._values(record)
        if not values:
            return state, None
        numbers = [v for _, v in values]
        held = holds(numbers, p.op, p.value, p.reduce)
        if p.num_steps is None:
            run = F.consecutive(state.get("run", 0), held)
            new: State = {"last": record.step, "run": run}
            firing = run >= p.patience
            span = f"for {run} consecutive checked step(s)"
        else:
            window = push_held(state.get("w", ""), held, p.num_steps)
            new = {"last": record.step, "w": window}
            count = window.count("1")
            firing = count >= p.patience
            span = f"at {count} of the last {len(window)} checked step(s)"
        name, value = values[deciding(numbers, p.op, p.reduce)]
        if not firing:
            return new, Finding(False, value=value, threshold=p.value)
        if p.scalar is not None:
            subject = p.scalar
        else:
            subject = f"{p.statistic} of {'any' if p.reduce == 'any' else 'every'} selected tensor"
        return new, Finding(
            True,
            value=value,
            threshold=p.value,
            tensors=tuple(n for n, v in values if OPS[p.op](v, p.value)),
            message=(
                f"{subject} {p.op} {p.value:g} {span}; at {p.mode} step {record.step}: {name} = {value:.4g}"
            ),
        )

    def batch_reference(self, records: Sequence[StepRecord]) -> list[Finding | None]:
        """The whole run at once: the checked records (of `mode`, with values, steps rising), whether
        the condition held at each, then the run lengths (or window counts) over that array."""
        p = self.params
        checked: list[int] = []  # indices into records
        values: list[list[tuple[str, float]]] = []
        last: int | None = None
        for i, r in enumerate(records):
            vals = self._values(r) if r.mode == p.mode and (last is None or r.step > last) else []
            if vals:
                checked.append(i)
                values.append(vals)
                last = r.step
        out: list[Finding | None] = [None] * len(records)
        if not checked:
            return out
        held = np.array([holds([v for _, v in vals], p.op, p.value, p.reduce) for vals in values])
        n = np.arange(len(held))
        if p.num_steps is None:  # run length: distance to the last check that did not hold
            count = n - np.maximum.accumulate(np.where(held, -1, n))
        else:  # checks that held among the last num_steps
            total = np.concatenate([[0], np.cumsum(held)])
            count = total[n + 1] - total[np.maximum(n + 1 - p.num_steps, 0)]
        for k, (i, vals) in enumerate(zip(checked, values, strict=True)):
            value = vals[deciding([v for _, v in vals], p.op, p.reduce)][1]
            firing = bool(count[k] >= p.patience)
            hits = tuple(name for name, v in vals if OPS[p.op](v, p.value)) if firing else ()
            out[i] = Finding(firing, value, p.value, hits)
        return out


__all__ = [
    "MAX_WINDOW",
    "OPS",
    "STATISTICS",
    "Threshold",
    "ThresholdParams",
    "deciding",
    "holds",
    "push_held",
]
