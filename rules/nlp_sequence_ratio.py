"""NLPSequenceRatio: too large a share of the input tokens is one value (padding, unknown, EOS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.errors import ConfigError
from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, Regex, Rule, RuleKind, RuleParams, State, compile_regex

#: Largest window (counted records) the rule keeps.
MAX_STEPS = 10_000


class NLPSequenceRatioParams(RuleParams):
    tensor_regex: str | None = Field(None, description="names of the token inputs (None: all)")
    token_values: str | int | list[int] = Field("0", description='comma-separated token ids, e.g. "0,102"')
    token_thresholds_percent: str | float | list[float] = Field(
        "50", description="comma-separated percentages, one per token value"
    )
    num_steps: int = Field(10, ge=1, le=MAX_STEPS, description="counted records per window (1: per step)")


def _split(value: str | float | Sequence[float], what: str) -> list[str]:
    """The items of a comma-separated string (or a number, or a list) as stripped strings."""
    if isinstance(value, str):
        items = [x.strip() for x in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(x).strip() for x in value]
    else:
        items = [str(value)]
    if not items or any(not x for x in items):
        raise ConfigError(
            f"rule NLPSequenceRatio: Expected argument `{what}` to be a comma-separated list of numbers "
            f"but got {value!r}"
        )
    return items


def parse_token_values(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """Token ids from "0,102" (or 0, or [0, 102]); ConfigError for non-integers or repeats."""
    items = _split(value, "token_values")
    try:
        out = tuple(int(x) for x in items)
    except ValueError as exc:
        raise ConfigError(
            f"rule NLPSequenceRatio: Expected argument `token_values` to be comma-separated integer token "
            f"ids but got {value!r}"
        ) from exc
    if len(set(out)) != len(out):
        raise ConfigError(f"rule NLPSequenceRatio: token_values {value!r} repeats a token id")
    return out


def parse_thresholds(value: str | float | Sequence[float]) -> tuple[float, ...]:
    """Percentages from "50,10" (or 50, or [50, 10]); ConfigError outside [0, 100]."""
    items = _split(value, "token_thresholds_percent")
    try:
        out = tuple(float(x) for x in items)
    except ValueError as exc:
        raise ConfigError(
            f"rule NLPSequenceRatio: Expected argument `token_thresholds_percent` to be comma-separated "
            f"percentages but got {value!r}"
        ) from exc
    if not all(0.0 <= x <= 100.0 for x in out):
        raise ConfigError(
            f"rule NLPSequenceRatio: Expected argument `token_thresholds_percent` to hold percentages in "
            f"[0, 100] but got {value!r}"
        )
    return out


class NLPSequenceRatio(Rule):
    """Fires while more than a threshold percentage of the input tokens equal a watched token value.

    Our definition: `token_values` and `token_thresholds_percent` are comma-separated strings
    (as in SageMaker; a number or a list is accepted too) of equal length: token id i is watched
    with threshold i, in percent. The hook's `record_inputs(ids, kind="tokens",
    token_values=...)` sends per step and input name the token count and how many tokens equal
    each of its token values (StepRecord.tokens). At every train record with a matching input
    (name matches `tensor_regex`, re.search; None: every input) whose step is newer than the last
    counted one, the rule adds the record's totals (summed over the matching inputs) to a sliding
    window of the last `num_steps` counted records (ours: per-batch padding shares vary a lot
    with dynamic padding, and a per-step test flaps around the threshold; num_steps=1 is the
    per-step test). A value's percentage is 100 × its count / the token total, over the window's
    records whose inputs counted that value (a value the hook did not count is not judged; a
    value absent from every record of the window is not judged at all). The rule fires when any
    judged value's percentage > its threshold.
    value/threshold: the percentage and threshold of the value furthest above (firing) or closest
    to (healthy) its threshold; tensors: "token <id>" of the values over their thresholds. It
    resolves when the window's percentages fall back, and returns None on records without a
    matching input and when no value can be judged. State: the last counted step and the window
    (num_steps entries of a total and one count per watched value).
    The hook must call record_inputs(token_ids, kind="tokens", token_values=<the same ids>) on
    train steps.
    """

    name: ClassVar[str] = "NLPSequenceRatio"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = NLPSequenceRatioParams

    class State(TypedDict):
        step: int | None  # the last counted step
        #: per step of the window: [total, count] or None per watched token value
        w: list[list[list[int] | None]]

    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "token counts per watched token value (record_inputs kind tokens) on train steps"

    def _check(self) -> None:
        p = self.params
        self._values = parse_token_values(p.token_values)
        self._thresholds = parse_thresholds(p.token_thresholds_percent)
        if len(self._values) != len(self._thresholds):
            raise ConfigError(
                f"rule {self.name}: token_values has {len(self._values)} entries but token_thresholds_percent "
                f"{len(self._thresholds)}; give one threshold per token value"
            )
        self._regex: Regex | None = compile_regex(p.tensor_regex, "tensor_regex")

    def initialize(self) -> State:
        return {"step": None, "w": []}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        blocks = [tc for n, tc in record.tokens.items() if self._regex is None or self._regex.search(n)]
        if not blocks or not F.is_new_step(state["step"], record.step):
            return state, None
        # One window entry: [[total, count] or None per watched value]; None: not counted by the hook.
        entry: list[list[int] | None] = []
        for v in self._values:
            counted = [tc for tc in blocks if v in tc.counts]
            entry.append(
                [sum(tc.total for tc in counted), sum(tc.counts[v] for tc in counted)] if counted else None
            )
        window = [*state["w"], entry][-self.params.num_steps :]
        state = {"step": record.step, "w": window}

        judged: list[tuple[int, float, float]] = []  # (token value, percent, threshold)
        for i, (v, limit) in enumerate(zip(self._values, self._thresholds, strict=True)):
            parts = [e[i] for e in window if e[i] is not None]
            total = sum(t for t, _ in parts)
            if total > 0:
                judged.append((v, 100.0 * sum(c for _, c in parts) / total, limit))
        if not judged:
            return state, None
        over = [j for j in judged if j[1] > j[2]]
        v, percent, limit = max(judged, key=lambda j: j[1] - j[2])
        if not over:
            return state, Finding(False, value=percent, threshold=limit)
        return state, Finding(
            True,
            value=percent,
            threshold=limit,
            tensors=tuple(f"token {j[0]}" for j in over),
            message=(
                f"{len(over)} token value(s) over their share at step {record.step}: token {v} is "
                f"{percent:.1f} % of the tokens of the last {len(window)} step(s) (> {limit:g} %)"
            ),
        )
