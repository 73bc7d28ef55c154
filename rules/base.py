"""The rule contract: declared parameters, explicit state, a pure `update`.

A rule never does I/O and never stores anything on itself between steps: the stream layer
keeps the state (JSON-serialisable, so it can live in a changelog-backed store) and feeds
records in. That makes every rule testable with `run_rule(rule, records)` and no Kafka.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tensorpulse.errors import ConfigError
from tensorpulse.wire import StepRecord

State = dict[str, Any]

SEVERITIES = ("info", "warning", "critical")


class RuleParams(BaseModel):
    """Base for a rule's parameters: typed, validated, immutable; unknown names are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Finding:
    """What a rule concluded at one step.

    `firing=True` means the condition holds now; `firing=False` means it was checked and is
    healthy. A rule returns None from `update` when it checked nothing at this step (not enough
    data yet, not a check step): the firing state then stays as it was.
    """

    firing: bool
    value: float | None = None
    threshold: float | None = None
    tensors: tuple[str, ...] = ()
    message: str = ""


def range_finding(
    values: list[tuple[str, float]],
    low: float | None,
    high: float | None,
    message: Callable[[list[tuple[str, float]], list[tuple[str, float]], str, float, str, float], str],
) -> Finding:
    """The Finding of rules that fire while some (tensor, value) lies outside [low, high].

    Firing: value/threshold of the worst one (above `high` first), every offender in `tensors`
    (above first, worst first), and `message(above, under, worst, value, side, threshold)`.
    Healthy: the largest value and `high`, or the smallest and `low` when `high` is None.
    NaN is never out of range.
    """
    from .functional import out_of_range

    above, under = out_of_range(values, low, high)
    if not above and not under:
        seen = [v for _, v in values if not math.isnan(v)]
        if high is not None:
            return Finding(False, value=max(seen) if seen else None, threshold=high)
        return Finding(False, value=min(seen) if seen else None, threshold=low)
    worst, value = (above or under)[0]
    threshold, side = (high, ">") if above else (low, "<")
    return Finding(
        True,
        value=value,
        threshold=threshold,
        tensors=tuple(n for n, _ in above + under),
        message=message(above, under, worst, value, side, threshold),  # type: ignore[arg-type]
    )


class Rule:
    """Base class of every rule. Subclasses set `name`, `Params`, and implement `update`."""

    #: The rule's name in the catalogue (SageMaker Debugger's name where one exists).
    name: ClassVar[str] = ""
    #: The pydantic model of the parameters.
    Params: ClassVar[type[RuleParams]] = RuleParams
    #: Modes whose records the rule sees (others are not passed to `update`).
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    #: Default severity of the alerts it raises.
    severity: ClassVar[str] = "warning"
    #: For the docs: what the hook must capture for the rule to work.
    needs: ClassVar[str] = ""
    #: True for rules that can fire without a new record (StalledTrainingRule): the stream
    #: layer then also calls `check_idle` periodically with the current wall-clock time.
    clock: ClassVar[bool] = False
    #: False for cross-rank rules (RankDivergence): the evaluator gives them one job-level slot
    #: that sees every rank's records, instead of one slot per rank.
    per_rank: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"rule {self.name}: invalid parameters ({problems})") from exc
        self._check()

    def _check(self) -> None:
        """Cross-parameter validation; raise ConfigError with a clear message."""

    def initialize(self) -> State:
        """A fresh state (JSON-serialisable)."""
        return {}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        raise NotImplementedError(f"{type(self).__name__}.update")

    def check_idle(self, state: State, now: float) -> tuple[State, Finding | None]:
        """Called between records for `clock` rules (now = Unix time); None: nothing to say."""
        return state, None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


def compile_regex(pattern: str | None, what: str) -> re.Pattern[str] | None:
    """Compile a user regex or raise ConfigError naming the parameter."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what}: invalid regular expression {pattern!r}: {exc}") from exc


def run_rule(
    rule: Rule, records: Iterable[StepRecord], state: State | None = None
) -> list[tuple[int, Finding]]:
    """Drive one rule over records (as the stream layer would) and return (step, finding) pairs.

    Records of modes the rule does not watch are skipped. Meant for tests and back-testing.
    """
    state = rule.initialize() if state is None else state
    out: list[tuple[int, Finding]] = []
    for record in records:
        if record.kind != "step" or record.mode not in rule.modes:
            continue
        state, finding = rule.update(state, record)
        if finding is not None:
            out.append((record.step, finding))
    return out
