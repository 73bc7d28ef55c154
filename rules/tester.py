"""`RuleTester`: the checks every rule must pass, shipped for the authors of custom rules.

Like torchmetrics' MetricTester, it takes a rule and a sequence of records and checks what the
stream layer relies on without saying so in the types:

1. reference: the streaming result equals the rule's batch reference (`Rule.batch_reference`, a
   computation over the whole run at once) when the rule declares one;
2. round-trip: the rule's state passed through the state store's serialisation (msgpack, with
   `tensorpulse.stream.state.pack`/`unpack`; and JSON, which the rule contract promises) after
   every record gives identical findings, because a worker restart or a rebalance resumes a rule
   from its stored state at any record;
3. determinism and purity: two runs give identical findings, `update` does not change the state
   it is given and the rule keeps nothing on itself between records (the stream layer gives the
   same instance every job's and every rank's state in turn);
4. fresh start: `initialize()` again (a reset) starts from scratch, and other parameters get
   another state key (the store keys a slot by a digest of the rule's class and parameters, so a
   changed threshold never reads state made under the old one);
5. bounded state: over a long run (the records repeated with their steps moved on) the packed
   state stops growing once the rule's windows are full, and stays under the store's entry limit;
6. declared state: `initialize()` and the state after every record match the rule's declared
   `State` (a TypedDict, see tensorpulse.rules.base), strictly and with no undeclared field, as
   given and after the store's msgpack round-trip (the worker validates stored state against the
   declaration and starts a rule afresh when it does not match). A rule without a declaration
   gets an `UndeclaredStateWarning` instead.

A failed check raises `RuleCheckError` (an AssertionError, so pytest shows it) naming the rule,
the check, the record index and what differed. Usage (see README.md, "Custom rules"):

    RuleTester(GradNormSpike, factor=5.0, other_params={"factor": 3.0}).check(records)
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tensorpulse.wire import StepRecord

from .base import Finding, Rule, RuleKind, State, declares_state, state_mismatch

#: One streaming result: (index of the record in the sequence given, finding or None).
Result = list[tuple[int, Finding | None]]


class RuleCheckError(AssertionError):
    """A rule failed one of RuleTester's checks; the message names the rule, the check, the record
    index and what differed."""

    def __init__(self, rule: Rule, check: str, what: str) -> None:
        super().__init__(f"{rule!r} failed the {check} check: {what}")
        self.rule, self.check, self.what = rule, check, what


class UndeclaredStateWarning(UserWarning):
    """RuleTester checked a rule that does not declare its state's type (`State`)."""


def _codecs() -> dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]]:
    """Name -> (encode, decode) of the state serialisations checked (msgpack: the state store's)."""
    from tensorpulse.stream.state import pack, unpack

    return {"msgpack": (pack, unpack), "json": (json.dumps, json.loads)}


def _same(a: Any, b: Any, rel_tol: float = 0.0) -> bool:
    """Equal, with NaN equal to NaN and floats within `rel_tol` (relative; 0: exactly)."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return _same(float(a), float(b), rel_tol)
    return bool(a == b)


def _finding_diff(
    a: Finding | None, b: Finding | None, rel_tol: float = 0.0, message: bool = True
) -> str | None:
    """What differs between two findings (None: nothing), field by field."""
    if a is None or b is None:
        return None if a is b else f"{a!r} vs {b!r}"
    if type(a) is not type(b):
        return f"a {type(a).__name__} vs a {type(b).__name__}: {a!r} vs {b!r}"
    for f in dataclasses.fields(a):
        if f.name == "message" and not message:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not _same(x, y, rel_tol):
            return f"{f.name} {x!r} vs {y!r} (in {a!r} vs {b!r})"
    return None


def lengthen(records: Sequence[StepRecord], length: int) -> list[StepRecord]:
    """`records` repeated until there are at least `length`, each repetition's steps (per mode),
    publish times, sequence numbers and delta steps moved past the previous one's.

    A long run from a short one, for the bounded-state check: the rule sees new steps all along.
    """
    if not records:
        return []
    span: dict[str, int] = {}
    for r in records:
        span[r.mode] = max(span.get(r.mode, 0), r.step + 1)
    ts_span = max(r.ts for r in records) - min(r.ts for r in records) + 1.0
    seq_span = max(r.seq for r in records) + 1
    out = list(records)
    k = 1
    while len(out) < length:
        for r in records:
            shift = k * span[r.mode]
            tensors = tuple(
                t
                if t.delta is None
                else dataclasses.replace(
                    t, delta=dataclasses.replace(t.delta, prev_step=t.delta.prev_step + shift)
                )
                for t in r.tensors
            )
            out.append(
                dataclasses.replace(
                    r, step=r.step + shift, ts=r.ts + k * ts_span, seq=r.seq + k * seq_span, tensors=tensors
                )
            )
        k += 1
    return out


class RuleTester:
    """Checks a rule against records: batch reference, state round-trip, determinism and purity,
    fresh starts, bounded state, declared state (see the module docstring).

    `rule` is an instance, or a class with its parameters as keyword arguments. `other_params`
    (optional): a different parameter set, for the parameter-change check (skipped without it).
    `formats`: the state serialisations checked. `rel_tol`: the relative tolerance of values
    against the batch reference (the streaming run and its round-trips must agree exactly).
    `long_run`: records in the bounded-state run. `growth`: how much larger (a factor) the packed
    state may be in the second half of the long run than in the first, plus `slack` bytes.
    `ticks`: for clock rules, a `check_idle` tick before each record (see `stream`).
    """

    def __init__(
        self,
        rule: Rule | type[Rule],
        /,
        *,
        other_params: Mapping[str, Any] | None = None,
        formats: Sequence[str] = ("msgpack", "json"),
        rel_tol: float = 1e-9,
        long_run: int = 600,
        ticks: bool = True,
        growth: float = 1.25,
        slack: int = 256,
        **params: Any,
    ) -> None:
        if isinstance(rule, Rule):
            if params:
                raise TypeError(
                    f"RuleTester: parameters {sorted(params)} given with a rule instance; pass the class"
                )
            self.cls: type[Rule] = type(rule)
            self.params: dict[str, Any] = rule.params.model_dump()
            self.rule = rule
        else:
            self.cls, self.params = rule, dict(params)
            self.rule = rule(**params)
        unknown = set(formats) - set(_codecs())
        if unknown:
            raise ValueError(f"RuleTester: unknown formats {sorted(unknown)} (known: {sorted(_codecs())})")
        self.other_params = None if other_params is None else dict(other_params)
        self.formats = tuple(formats)
        self.rel_tol, self.long_run, self.growth, self.slack = rel_tol, long_run, growth, slack
        self.ticks = ticks

    # ------------------------------------------------------------------ driving
    def fresh(self, **params: Any) -> Rule:
        """A new instance of the rule class (with `params` over the tester's parameters)."""
        return self.cls(**{**self.params, **params})

    def seen(self, rule: Rule, records: Sequence[StepRecord]) -> list[int]:
        """Indices of the records the stream layer gives `rule` (step records of its modes)."""
        return [i for i, r in enumerate(records) if r.kind == "step" and r.mode in rule.modes]

    def stream(
        self,
        rule: Rule,
        records: Sequence[StepRecord],
        *,
        state: State | None = None,
        before: Callable[[int, State], None] | None = None,
        after: Callable[[int, State], State] | None = None,
        ticks: bool = True,
    ) -> tuple[State, Result]:
        """Drive `rule` as the stream layer does: (final state, [(record index, finding or None)]).

        Records of the rule's own job (the first record's) go to `update`; for a cross-run rule
        (`kind = RuleKind.CROSS_RUN`), records of other jobs go to `update_other`. For a clock rule
        (`RuleKind.CLOCK`), when the tester's `ticks` (and `ticks` here) are on, a clock tick comes
        before every record but the first: `check_idle(state, record.ts)`, the worker's last tick
        before that record arrives; its entry carries that record's index, before the record's.
        `before(i, state)` sees the state each call is given, `after(i, state)` may replace the
        state each call returns (the round-trip check passes it through a codec).
        """
        state = rule.initialize() if state is None else state
        ticking = ticks and self.ticks and rule.kind is RuleKind.CLOCK
        out: Result = []
        for n, i in enumerate(self.seen(rule, records)):
            for tick in (True, False) if ticking and n else (False,):
                if before is not None:
                    before(i, state)
                if tick:
                    state, finding = rule.check_idle(state, records[i].ts)
                else:
                    state, finding = self._one(rule, records, i, state)
                if after is not None:
                    state = after(i, state)
                out.append((i, finding))
        return state, out

    def _where(self, records: Sequence[StepRecord], i: int) -> str:
        r = records[i]
        return f"record {i} ({r.mode} step {r.step}, job {r.job!r}, rank {r.rank})"

    def _compare(
        self,
        check: str,
        records: Sequence[StepRecord],
        got: Result,
        want: Result,
        names: tuple[str, str],
        *,
        rel_tol: float = 0.0,
        message: bool = True,
    ) -> None:
        for n, ((i, a), (_, b)) in enumerate(zip(got, want, strict=True)):
            diff = _finding_diff(a, b, rel_tol, message)
            if diff is not None:
                tick = "the clock tick before " if n + 1 < len(got) and got[n + 1][0] == i else ""
                raise RuleCheckError(
                    self.rule,
                    check,
                    f"at {tick}{self._where(records, i)} {names[0]} vs {names[1]} differ: {diff}",
                )

    # ------------------------------------------------------------------ the checks
    def check_reference(self, records: Sequence[StepRecord]) -> bool:
        """The streaming findings equal the batch reference (values within rel_tol, messages not
        compared); False when the rule has no reference."""
        rule = self.fresh()
        seen = self.seen(rule, records)
        want = rule.batch_reference([records[i] for i in seen])
        if want is None:
            return False
        if len(want) != len(seen):
            raise RuleCheckError(
                rule,
                "reference",
                f"batch_reference gave {len(want)} findings for the {len(seen)} records it was given",
            )
        _, got = self.stream(rule, records, ticks=False)
        self._compare(
            "reference",
            records,
            got,
            list(zip(seen, want, strict=True)),
            ("the streaming finding", "the batch reference"),
            rel_tol=self.rel_tol,
            message=False,
        )
        return True

    def check_roundtrip(self, records: Sequence[StepRecord]) -> None:
        """Passing the state through each format after every record changes no finding."""
        _, want = self.stream(self.fresh(), records)
        codecs = _codecs()
        for fmt in self.formats:
            encode, decode = codecs[fmt]
            rule = self.fresh()

            def trip(
                i: int, state: State, encode: Any = encode, decode: Any = decode, fmt: str = fmt
            ) -> State:
                try:
                    return decode(encode(state))
                except Exception as exc:
                    raise RuleCheckError(
                        self.rule,
                        f"{fmt} round-trip",
                        f"the state after {self._where(records, i)} cannot be serialised: {exc!r} (state: {state!r:.300})",
                    ) from exc

            _, got = self.stream(rule, records, after=trip)
            self._compare(f"{fmt} round-trip", records, got, want, ("with the round-trip", "without"))

    def check_deterministic(self, records: Sequence[StepRecord]) -> None:
        """Two runs give the same findings; `update` leaves its input state as it was; the rule
        keeps nothing on itself."""
        encode = _codecs()["msgpack"][0] if "msgpack" in self.formats else json.dumps
        rule = self.fresh()
        before = {k: repr(v) for k, v in vars(rule).items()} if hasattr(rule, "__dict__") else {}

        given: list[Any] = []

        def keep(i: int, state: State) -> None:
            given[:] = [state, encode(state)]

        def same(i: int, new: State) -> State:
            if encode(given[0]) != given[1]:
                raise RuleCheckError(
                    rule, "purity", f"the rule changed the state it was given at {self._where(records, i)}"
                )
            return new

        _, first = self.stream(rule, records, before=keep, after=same)
        after = {k: repr(v) for k, v in vars(rule).items()} if hasattr(rule, "__dict__") else {}
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            raise RuleCheckError(
                rule, "purity", f"the rule changed its own attributes {changed} while running"
            )
        _, second = self.stream(self.fresh(), records)
        self._compare("determinism", records, second, first, ("the second run", "the first"))

    def _one(
        self, rule: Rule, records: Sequence[StepRecord], i: int, state: State
    ) -> tuple[State, Finding | None]:
        """One record through `rule` as `stream` would route it."""
        record = records[i]
        if rule.kind is RuleKind.CROSS_RUN and record.job != records[0].job:
            return rule.update_other(state, record)  # type: ignore[attr-defined,no-any-return]
        return rule.update(state, record)

    def check_reset(self, records: Sequence[StepRecord]) -> None:
        """`initialize()` again, on the same instance after a run, starts afresh: the same initial
        state and the same findings as the first run."""
        encode = _codecs()["msgpack"][0]
        rule = self.fresh()
        initial = encode(rule.initialize())
        _, first = self.stream(rule, records)
        again = rule.initialize()
        if encode(again) != initial:
            raise RuleCheckError(
                rule,
                "reset",
                f"initialize() after a run gave {again!r:.300}, not the initial state it gave before",
            )
        _, second = self.stream(rule, records, state=again)
        self._compare("reset", records, second, first, ("the run after initialize()", "the first run"))

    def check_params_change(self, records: Sequence[StepRecord]) -> bool:
        """Other parameters get another state key in the store, so they start fresh; the same
        parameters keep theirs. False when the tester has no `other_params`."""
        if self.other_params is None:
            return False
        from tensorpulse.rules.config import spec_for
        from tensorpulse.stream.evaluator import JOB_SLOT
        from tensorpulse.stream.state import JobStore, MemoryStore

        if all(k in self.params and self.params[k] == v for k, v in self.other_params.items()):
            raise ValueError(f"RuleTester: other_params {self.other_params} change none of {self.params}")
        rule, other = self.fresh(), self.fresh(**self.other_params)
        state, _ = self.stream(rule, records)
        store = MemoryStore()
        spec = spec_for(rule)
        slot = f"{spec.name}|{JOB_SLOT if rule.kind is RuleKind.CROSS_RANK else 0}"
        JobStore(store, [spec]).save({"r": {slot: {"s": state, "f": False}}}, [0])
        kept = JobStore(store, [spec_for(self.fresh())]).load([0])["r"]
        if slot not in kept:
            raise RuleCheckError(
                rule, "parameter change", "the same parameters do not find their stored state again"
            )
        mixed = JobStore(store, [spec_for(other)]).load([0])["r"]
        if slot in mixed:
            raise RuleCheckError(
                rule,
                "parameter change",
                f"{other!r} reads the state stored under {rule!r}: the state key does not depend on the "
                "parameters (keep every parameter in Params)",
            )
        _, fresh = self.stream(self.fresh(**self.other_params), records)
        _, again = self.stream(other, records)
        self._compare("parameter change", records, again, fresh, ("the changed rule", "a new one"))
        return True

    def check_bounded(self, records: Sequence[StepRecord]) -> None:
        """Over `long_run` records (`lengthen`), the packed state of the second half is at most
        `growth` times the first half's largest plus `slack` bytes, and under the store's limit."""
        from tensorpulse.stream.state import MAX_ENTRY_BYTES, pack

        long = lengthen(records, self.long_run)
        rule = self.fresh()
        sizes: list[tuple[int, int]] = []

        def measure(i: int, state: State) -> State:
            size = len(pack(state))
            if size > MAX_ENTRY_BYTES:
                raise RuleCheckError(
                    rule,
                    "bounded state",
                    f"the state after {self._where(long, i)} is {size} bytes, over the "
                    f"store's entry limit of {MAX_ENTRY_BYTES}",
                )
            sizes.append((i, size))
            return state

        self.stream(rule, long, after=measure)
        if len(sizes) < 4:
            return
        half = len(sizes) // 2
        early = max(s for _, s in sizes[:half])
        i, late = max(sizes[half:], key=lambda x: x[1])
        if late > early * self.growth + self.slack:
            raise RuleCheckError(
                rule,
                "bounded state",
                f"the state grows with the run: {late} bytes after {self._where(long, i)}, at most {early} in the "
                f"first {sizes[half][0]} records (allowed: x{self.growth:g} + {self.slack} bytes); keep a bounded window",
            )

    def check_state(self, records: Sequence[StepRecord]) -> bool:
        """`initialize()` and every state the rule returns (and that state after a msgpack
        round-trip, as the worker reads it back) match the declared `State`: strictly, with no
        undeclared field. False, with an UndeclaredStateWarning, when the rule declares none."""
        rule = self.fresh()
        if not declares_state(rule):
            warnings.warn(
                f"{rule!r} does not declare its state's type: add a `State` TypedDict (from "
                "typing_extensions) naming the fields initialize() returns, so the worker can tell a "
                "stored state of another layout from its own (see README.md, 'Custom rules')",
                UndeclaredStateWarning,
                stacklevel=2,
            )
            return False
        pack, unpack = _codecs()["msgpack"]

        def match(state: State, where: str) -> None:
            for form, value in (("", state), (" after a msgpack round-trip", unpack(pack(state)))):
                problem = state_mismatch(rule, value, strict=True, extra_fields=False)
                if problem is not None:
                    raise RuleCheckError(
                        rule,
                        "declared state",
                        f"{where}{form} does not match {type(rule).__name__}.State at {problem}",
                    )

        match(rule.initialize(), "the state initialize() returns")

        def each(i: int, state: State) -> State:
            match(state, f"the state after {self._where(records, i)}")
            return state

        self.stream(rule, records, after=each)
        return True

    def check(self, records: Sequence[StepRecord]) -> Result:
        """Every check on `records`; returns the streaming findings [(record index, finding or None)],
        for the caller's own assertions (e.g. that a faulty run fires)."""
        records = list(records)
        self.check_reference(records)
        self.check_roundtrip(records)
        self.check_deterministic(records)
        self.check_reset(records)
        self.check_params_change(records)
        self.check_bounded(records)
        self.check_state(records)
        return self.stream(self.fresh(), records)[1]


__all__ = ["Result", "RuleCheckError", "RuleTester", "UndeclaredStateWarning", "lengthen"]
