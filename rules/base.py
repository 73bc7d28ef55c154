"""The rule contract: declared parameters, declared state, a pure `update`.

A rule never does I/O and never stores anything on itself between steps: the stream layer
keeps the state (JSON-serialisable, so it can live in a changelog-backed store) and feeds
records in. That makes every rule testable with `run_rule(rule, records)` and no Kafka.

A rule declares its state's type as `State`, a `TypedDict` (from typing_extensions: pydantic
validates those on Python 3.11), beside its `Params`. Why a TypedDict and not a pydantic model or a
dataclass: the state stays the plain dict of lists, numbers and strings that msgpack and JSON
store as they are, so `update(state, record) -> (state, finding)` stays a pure function of plain
values (the `{**state, "x": ...}` idiom included), and the worker converts nothing per record (a
model would cost a dump and a validation on every record of every rule). The declaration is
checked where it earns it: `RuleTester` validates `initialize()` and every state `update`
returns against it, strictly (`state_mismatch`); the stream layer validates a state read from the
store once, so a state stored in another layout (a worker upgraded to a version whose rule keeps
other fields) starts fresh instead of breaking the rule (stream/state.py). A rule without a
declaration inherits `Rule.State`, any dict: it works, and RuleTester asks for one.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from tensorpulse.errors import ConfigError
from tensorpulse.wire import StepRecord

from . import functional as F

#: A rule's state as the stream layer handles it: a dict (see the rule's own `State` for its fields).
State = dict[str, Any]
#: The state type of a rule that declares none (`Rule.State`): any dict.
AnyState = dict[str, Any]

SEVERITIES = ("info", "warning", "critical")


class RuleParams(BaseModel):
    """Base for a rule's parameters: typed, validated, immutable; unknown names are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: Healthy checks in a row before a windowed rule's alert resolves (WindowedParams.resolve_after).
RESOLVE_AFTER = 10


class WindowedParams(RuleParams):
    """Parameters of a rule judged over windows of steps, which gets hysteresis (`hold`).

    `resolve_after`: healthy checks in a row before a firing alert resolves. A check is one
    finding: every `num_steps` saved steps for LossNotDecreasing (10 checks = 100 steps with the
    defaults), every evaluation for Overfit, every saved train step for UnchangedTensor. 10: on the
    held-out corpus (tests/heldout.py) 5 still let UnchangedTensor flap on a converged bias, and
    LossNotDecreasing fire twice on one frozen learning rate.
    """

    resolve_after: int = Field(
        RESOLVE_AFTER,
        ge=1,
        description="healthy checks in a row before a firing alert resolves (hysteresis)",
    )


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


class NoState(TypedDict):
    """The state of a rule that keeps nothing between records (`initialize()` returns {})."""


class HoldState(TypedDict, total=False):
    """The field `hold` keeps in a windowed rule's state: base its `State` on this one."""

    #: [firing, healthy checks in a row] (absent before the first check).
    hold: list[bool | int]


def hold(state: State, finding: Finding | None, resolve_after: int) -> tuple[State, Finding | None]:
    """Hysteresis for a windowed rule: its alert resolves only after `resolve_after` healthy checks in a row.

    A window that straddles the noise of a healthy loss can pass one check and fail the next, and
    without hysteresis each pass resolves the alert and each failure raises it again (an alert
    that flaps gets muted). The count lives in the rule's state under "hold" ([firing, healthy
    checks]); a healthy finding that does not resolve yet becomes None (nothing new: the alert
    stays as it was). A check is a finding; None (nothing checked) changes nothing.
    """
    if finding is None:
        return state, None
    firing, good = state.get("hold") or (False, 0)
    firing, good = F.hysteresis(bool(firing), int(good), finding.firing, resolve_after)
    state = {**state, "hold": [firing, good]}
    if firing and not finding.firing:
        return state, None
    return state, finding


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
    above, under = F.out_of_range(values, low, high)
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


class RuleKind(StrEnum):
    """What a rule reads and how the stream layer drives it: every rule declares one (`Rule.kind`).

    PER_TENSOR and SCALAR rules are driven alike (one state per rank, `update` on each record);
    the kind says what they read, for the docs and the checks. The other three change the routing.
    """

    #: Statistics of the record's tensors (VanishingGradient); the default.
    PER_TENSOR = "per_tensor"
    #: Scalars of each step, such as the loss (LossNotDecreasing); tensors are not read.
    SCALAR = "scalar"
    #: Compares the ranks of a job (RankDivergence): one job-level state fed by every rank.
    CROSS_RANK = "cross_rank"
    #: Compares jobs (SimilarAcrossRuns): other jobs' records go to `update_other(state, record)`,
    #: for the jobs `watches(job)` accepts.
    CROSS_RUN = "cross_run"
    #: Can fire without a new record (StalledTrainingRule): `check_idle(state, now)` is called on ticks.
    CLOCK = "clock"


def _kind_from_flags(cls: type[Rule]) -> RuleKind | None:
    """The kind that a class's older flags (`clock`, `per_rank`, `cross_run`) declare; None: none set.

    Before `kind`, a rule declared how it is driven with those flags, and rules written then still
    work: a class that sets any of them in its own body (and not `kind`) gets the kind they mean.
    """
    own = cls.__dict__
    if not any(flag in own for flag in ("clock", "per_rank", "cross_run")):
        return None
    clock = bool(getattr(cls, "clock", False))
    cross_rank = not bool(getattr(cls, "per_rank", True))
    cross_run = bool(getattr(cls, "cross_run", False))
    flags = ((RuleKind.CLOCK, clock), (RuleKind.CROSS_RANK, cross_rank), (RuleKind.CROSS_RUN, cross_run))
    chosen = [k for k, on in flags if on]
    if len(chosen) > 1:
        raise TypeError(
            f"rule class {cls.__qualname__}: its flags make it a {' and a '.join(k.value for k in chosen)} "
            "rule; a rule has one kind (a cross-rank rule cannot also be a clock or cross-run rule)"
        )
    if chosen:
        return chosen[0]
    base = getattr(cls, "kind", RuleKind.PER_TENSOR)
    # Flags that say "none of those" keep a per-tensor or scalar kind inherited from a base class.
    return base if base in (RuleKind.PER_TENSOR, RuleKind.SCALAR) else RuleKind.PER_TENSOR


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
    #: What the rule reads and how the stream layer drives it (see RuleKind): the stream layer and
    #: RuleTester ask only this. CLOCK: `check_idle` is also called periodically with the current
    #: wall-clock time; CROSS_RANK: one job-level slot sees every rank's records; CROSS_RUN: other
    #: jobs' records go to `update_other`.
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    #: Older flags, kept in step with `kind` for code that reads them. A subclass that sets one of
    #: them (and not `kind`) gets the kind it means: `clock = True` is CLOCK, `per_rank = False`
    #: CROSS_RANK, `cross_run = True` CROSS_RUN.
    clock: ClassVar[bool] = False
    per_rank: ClassVar[bool] = True
    cross_run: ClassVar[bool] = False
    #: The type of the rule's state: a `TypedDict` (from typing_extensions) naming each field
    #: `initialize` and `update` keep, in the types the store gives back (lists, not tuples). The
    #: default, any dict, works but checks nothing (RuleTester asks for a declaration).
    State: ClassVar[Any] = AnyState

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Settle the subclass's `kind` (declared, from the older flags, or inherited) and the flags with it."""
        super().__init_subclass__(**kwargs)
        legacy = _kind_from_flags(cls)
        if "kind" in cls.__dict__:
            kind = RuleKind(cls.__dict__["kind"])
            if legacy not in (None, kind, RuleKind.PER_TENSOR, RuleKind.SCALAR):
                raise TypeError(
                    f"rule class {cls.__qualname__}: kind = {kind.value!r} but its flags say {legacy.value!r}"
                )
        else:
            kind = legacy if legacy is not None else cls.kind
        cls.kind = kind
        cls.clock = kind is RuleKind.CLOCK
        cls.per_rank = kind is not RuleKind.CROSS_RANK
        cls.cross_run = kind is RuleKind.CROSS_RUN

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"rule {self.name}: invalid parameters ({problems})") from exc
        try:
            self._check()
        except RegexError as exc:
            raise ConfigError(f"rule {self.name or type(self).__name__}: parameter {exc}") from exc

    def _check(self) -> None:
        """Cross-parameter validation; raise ConfigError with a clear message."""

    def initialize(self) -> State:
        """A fresh state (JSON-serialisable)."""
        return {}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        raise NotImplementedError(f"{type(self).__name__}.update")

    def check_idle(self, state: State, now: float) -> tuple[State, Finding | None]:
        """Called between records for CLOCK rules (now = Unix time); None: nothing to say."""
        return state, None

    def batch_reference(self, records: Sequence[StepRecord]) -> list[Finding | None] | None:
        """The rule's findings computed over the whole run at once, without state: one Finding or
        None per record of `records` (the step records of the rule's modes, in order).

        Optional. A rule whose definition can be written as a batch computation over the run
        returns it here, written independently of `update`, and `RuleTester` checks the streaming
        `update` against it (messages excepted). None (the default): the rule has no reference.
        """
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


@functools.cache
def _adapter(state_type: Any) -> TypeAdapter[Any]:
    return TypeAdapter(state_type)


def declares_state(rule: Rule | type[Rule]) -> bool:
    """True if the rule (class or instance) declares its state's type (a `State` of its own)."""
    return rule.State is not AnyState


def state_mismatch(
    rule: Rule | type[Rule], state: Any, *, strict: bool = False, extra_fields: bool = True
) -> str | None:
    """Where `state` differs from the rule's declared `State` (None: it matches).

    The text names the field's path ("tensors.fc.weight.run") and what is wrong with it, then
    how many other fields differ. `strict`: no conversions (no "3" for an int, no list for a
    tuple), as RuleTester checks; the stream layer reads stored state leniently. `extra_fields`:
    top-level fields the declaration does not name are allowed (False: the first is a difference).
    """
    try:
        _adapter(rule.State).validate_python(state, strict=strict)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "the state"
        more = f" (and {len(errors) - 1} other field(s))" if len(errors) > 1 else ""
        return f"{where}: {first['msg']} (got {first['input']!r:.80}){more}"
    declared = getattr(rule.State, "__required_keys__", None)
    if not extra_fields and declared is not None:
        known = declared | rule.State.__optional_keys__
        extra = sorted(str(k) for k in state if k not in known)
        if extra:
            return f"{extra[0]}: a field the declared State does not name (got {state[extra[0]]!r:.80})"
    return None


class Regex(Protocol):
    """What rules need of a compiled regex: RE2's patterns and Python's both fit."""

    @property
    def pattern(self) -> str: ...

    def search(self, string: str) -> Any: ...


#: Where the RE2 binding comes from, for the message when it is missing.
RE2_EXTRA = "pip install 'tensorpulse[stream]' (or pip install google-re2)"


class RegexError(ConfigError):
    """A rule parameter's regex that RE2 cannot compile; `Rule.__init__` adds the rule's name."""

    def __init__(self, message: str, parameter: str, pattern: str) -> None:
        super().__init__(message)
        #: The parameter (or rules-file key) that holds the pattern, and the pattern itself.
        self.parameter = parameter
        self.pattern = pattern


def compile_regex(pattern: str | None, what: str) -> Regex | None:
    """Compile a user regex with RE2, or raise ConfigError naming the parameter and the pattern.

    Rule regexes run against tensor, scalar and job names that arrive over Kafka, so anyone who
    can write a job's records chooses the text. With Python's backtracking `re`, a pattern such
    as `^(a+)+$` takes exponential time on `aaa...a!` and one record stalls the worker for every
    job. RE2 matches in time linear in the name, for every pattern it accepts; it has no
    backreferences or lookarounds, and those patterns are refused here, when the rules load.
    """
    if pattern is None:
        return None
    try:
        import re2
    except ImportError as exc:
        raise RegexError(
            f"{what}: regex {pattern!r} needs the google-re2 package, which runs rule regexes in "
            f"linear time (Python's re can take exponential time on a hostile tensor name): {RE2_EXTRA}",
            what,
            pattern,
        ) from exc
    options = re2.Options()
    options.log_errors = False  # the error comes back as an exception; RE2's own stderr line is noise
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        )
        try:
            re.compile(pattern)
        except re.error:
            raise RegexError(
                f"{what}: invalid regular expression {pattern!r}: {reason}", what, pattern
            ) from exc
        raise RegexError(
            f"{what}: regular expression {pattern!r} uses syntax RE2 cannot run ({reason}); rule "
            "regexes run in linear time with RE2, which has no backreferences, lookarounds or "
            "possessive quantifiers: rewrite it without them",
            what,
            pattern,
        ) from exc


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
