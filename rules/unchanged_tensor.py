"""UnchangedTensor: a tensor that stays the same over several saved steps."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field
from typing_extensions import TypedDict

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

DEFAULT_COLLECTIONS = ("weights", "biases")


class UnchangedTensorParams(WindowedParams):
    collection_names: list[str] | None = None
    tensor_regex: str | None = None
    num_steps: int = Field(3, ge=2)
    rtol: float = Field(1e-5, ge=0.0)
    atol: float = Field(1e-8, ge=0.0)
    equal_nan: bool = False
    ignore_frozen: bool = True


class _Seen(TypedDict):
    """A tensor's last fingerprint and how many comparisons in a row found it unchanged."""

    fp: list[float]
    run: int


class UnchangedTensor(Rule):
    """Fires while a selected tensor has been equal over the last `num_steps` saved train steps.

    Our definition compares each tensor's fingerprint (mean, std, min, max, abs_mean): two
    consecutive saved steps of a tensor are equal when every component satisfies
    |a − b| <= atol + rtol·|b| (b the older value; NaN equals NaN only if equal_nan). The rule
    fires while some tensor has num_steps − 1 consecutive equal pairs (with num_steps=3: at the
    3rd equal step, not the 2nd) and resolves once none has (see Hysteresis below). Tensors are
    those of `collection_names` (default "weights" and "biases" when neither collection_names
    nor tensor_regex is given) matching `tensor_regex` (re.search); tensors = the unchanged ones
    (record order); value = the longest run of equal steps, threshold = num_steps. Repeated or
    older steps are ignored; the state keeps per tensor only its last fingerprint and run length.
    It returns None until some tensor has a previous fingerprint to compare with.
    A fingerprint can miss a change that preserves all five statistics (e.g. a permutation);
    issue 3 will add an exact on-device allclose of consecutive saved tensors.
    With `ignore_frozen` (default true; ours), a parameter that gets no gradient in a record that
    carries gradients (the hook sends none for requires_grad off) is frozen on purpose and not
    judged: fine-tuning a head over a frozen backbone fired on every frozen layer. A parameter that
    gets gradients and still does not change (left out of the optimizer, a learning rate of 0) fires.
    Hysteresis: once firing, the alert resolves at the `resolve_after`-th saved step in a row with no
    unchanged tensor (WindowedParams; a converged tensor that moves now and then flapped).
    The hook must capture mean, std, min, max and abs_mean of the selected tensors.
    """

    name: ClassVar[str] = "UnchangedTensor"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = UnchangedTensorParams

    class State(HoldState):
        last_step: int | None
        tensors: dict[str, _Seen]

    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = "mean, std, min, max and abs_mean of the selected tensors (weights, biases)"

    def _check(self) -> None:
        p = self.params
        self._regex: Regex | None = compile_regex(p.tensor_regex, "tensor_regex")
        names = p.collection_names
        if names is None and p.tensor_regex is None:
            names = list(DEFAULT_COLLECTIONS)
        self._collections = None if names is None else frozenset(names)

    def initialize(self) -> State:
        return {"last_step": None, "tensors": {}}

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        if not F.is_new_step(state["last_step"], record.step):
            return state, None
        skip = F.frozen(record.tensors) if p.ignore_frozen else frozenset()
        tensors: dict[str, Any] = dict(state["tensors"])
        compared = False
        longest = 0
        unchanged: list[str] = []
        # Every weight and bias of every record goes through this loop: parameters and functions
        # are looked up once, and the run length (F.consecutive) is worked out inline.
        rtol, atol, equal_nan, need = p.rtol, p.atol, p.equal_nan, p.num_steps - 1
        fingerprint, close = F.fingerprint, F.fingerprints_close
        for t in record.select(self._collections, self._regex):
            name = t.name
            if not t.n > 0 or name in skip:
                continue
            fp = fingerprint(t)
            prev = tensors.get(name)
            run = 0
            if prev is not None:
                compared = True
                if close(fp, prev["fp"], rtol, atol, equal_nan):
                    run = prev["run"] + 1
            tensors[name] = {"fp": fp, "run": run}
            if run >= longest:
                longest = run + 1
            if run >= need:
                unchanged.append(name)
        state = {**state, "last_step": record.step, "tensors": tensors}
        if not compared:
            return state, None
        if not unchanged:
            return hold(
                state, Finding(False, value=float(longest), threshold=float(p.num_steps)), p.resolve_after
            )
        return hold(
            state,
            Finding(
                True,
                value=float(longest),
                threshold=float(p.num_steps),
                tensors=tuple(unchanged),
                message=(
                    f"{len(unchanged)} tensor(s) unchanged over the last {p.num_steps} saved steps at step "
                    f"{record.step}, e.g. {unchanged[0]}"
                ),
            ),
            p.resolve_after,
        )
