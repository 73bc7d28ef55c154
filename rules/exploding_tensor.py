"""ExplodingTensor: NaN or infinite values in a tensor or a scalar (loss, metric)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from typing_extensions import TypedDict

from tensorpulse.wire import MODES, StepRecord, Tensors

from . import functional as F
from .base import Finding, Regex, Rule, RuleKind, RuleParams, State, compile_regex

#: Collection names that select the scalars of a record (scalars carry no collection on the wire).
SCALAR_COLLECTIONS = frozenset({"losses", "metrics"})
#: Collections of a model's parameters (for the order of ranks' first non-finite values).
_PARAMETERS = frozenset({"weights", "biases"})


class ExplodingTensorParams(RuleParams):
    collection_names: list[str] | None = None
    tensor_regex: str | None = None
    only_nan: bool = False


class ExplodingTensor(Rule):
    """Fires while a selected tensor or scalar holds NaN (or ±inf unless `only_nan`).

    Our definition: at every step of every mode, tensors are those in `collection_names` (all
    collections when None) whose name matches `tensor_regex` (re.search; all when None); a
    tensor is non-finite when its exact NaN count (or NaN + inf count) is > 0. A NaN min or max
    with a zero NaN count also counts as one NaN (min/max propagate NaN; a finite tensor cannot
    produce one). Sum, mean and l2 are never used: they overflow on finite tensors. Scalars are
    checked when `collection_names` is None or names "losses" or "metrics", restricted by
    `tensor_regex` when given; a scalar is non-finite when NaN (or ±inf unless only_nan).
    value = number of non-finite elements (one per scalar), tensors = offending names (tensors in
    record order, then scalars), and the message names the first. It resolves (firing=False) at
    the first step of a mode it sees with nothing non-finite.
    Which offender is first within a record: where the producer sends the order in which the
    step's non-finite values appeared (`StepRecord.nonfinite_order`, wire `t.nfo`), the earliest
    offender in it; offenders it leaves out follow in record order, then scalars. Why: a NaN
    spreads within one step, so record order would name a tensor it spread to (TorchHook sends
    weights first, and a NaN gradient is in every weight once the optimizer has applied it).
    First non-finite: per mode, the state keeps the earliest offender this rank has produced,
    ordered by (step, record ts, position among the checked tensors and scalars, in that
    within-record order), as [step, ts, position, name, phase]: one entry per mode, never more.
    `job_summary` picks the earliest of all ranks by (step, phase, ts, position, rank), where
    phase is 0 when the rank's first offender is a weight or bias, else 1: every rank's forward
    pass of a step computes from the same parameters (DDP keeps copies in step, FSDP2 gathers
    each rank's shard), so a parameter that was its rank's first non-finite tensor of a step came
    before another rank's activations or gradients of that step, whichever record came first
    (FSDP2: the rank whose shard of the parameter holds the NaN). The stream layer adds it to the alert's message
    ("first non-finite: rank 1, gradient/fc1.weight, step 161") and details. A record that
    arrives late with an earlier step moves it back; an alert already sent is not re-sent.
    The gradients of a step that the producer marks skipped (`StepRecord.skipped`: a mixed-precision
    GradScaler found inf/NaN gradients and did not apply the step) are not checked: the scaler
    produces them on purpose and lowers its scale; weights, other tensors and scalars still are.
    The hook must capture exact NaN and inf counts per tensor, and send losses/metrics as scalars.
    """

    name: ClassVar[str] = "ExplodingTensor"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = ExplodingTensorParams

    class State(TypedDict, total=False):
        #: mode -> [step, publish time, position in the record, tensor name, 0 for a weight else 1]
        #: of the earliest non-finite tensor of this rank (absent until there is one).
        first: dict[str, list[int | float | str]]

    modes: ClassVar[frozenset[str]] = frozenset(MODES)
    severity: ClassVar[str] = "critical"
    needs: ClassVar[str] = "exact nan and inf counts of the selected tensors; losses and metrics as scalars"

    def _check(self) -> None:
        self._regex: Regex | None = compile_regex(self.params.tensor_regex, "tensor_regex")
        names = self.params.collection_names
        self._collections = None if names is None else frozenset(names)
        self._scalars = names is None or bool(SCALAR_COLLECTIONS & frozenset(names))

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        only_nan = self.params.only_nan
        offenders: list[str] = []
        details: list[str] = []
        count = 0
        first_pos = -1  # position of the first offender among the checked tensors and scalars
        checked = 0
        skipped = record.skipped  # a GradScaler skipped the step for inf/NaN gradients, on purpose
        # Within-record position of each tensor the producer ordered (only records with non-finite
        # tensors carry an order): the earliest offender in it comes first.
        order = {id(record.tensors[i]): k for k, i in enumerate(record.nonfinite_order)}
        unordered = len(order)  # positions of the tensors it leaves out start here
        first = 0  # index of the first offender in `offenders`
        first_weight = False  # whether it is a weight or bias (see job_summary)
        selected = record.select(self._collections, self._regex)
        if type(record.tensors) is Tensors and record.tensors.finite:
            # The decoder saw no NaN or inf count and only finite statistics: nonfinite_count is 0
            # for every tensor, so only the count of tensors checked is needed (for positions).
            checked = sum(1 for t in selected if t.collection != "gradients") if skipped else len(selected)
            selected = []
        for t in selected:
            if skipped and t.collection == "gradients":
                continue
            bad = F.nonfinite_count(t, only_nan)
            checked += 1
            if bad:
                pos = order.get(id(t), unordered + checked - 1)
                if first_pos < 0 or pos < first_pos:
                    first_pos, first = pos, len(offenders)
                    first_weight = t.collection in _PARAMETERS
                count += bad
                offenders.append(t.name)
                details.append(
                    f"tensor {t.name} has {bad} non-finite of {t.n} elements ({t.nan} NaN, {t.inf} inf; "
                    f"min {t.min}, max {t.max})"
                )
        if self._scalars:
            for key, value in F.select_scalars(record.scalars, self._regex).items():
                checked += 1
                if F.scalar_nonfinite(value, only_nan):
                    if first_pos < 0:
                        first_pos, first = unordered + checked - 1, len(offenders)
                        first_weight = False
                    count += 1
                    offenders.append(key)
                    details.append(f"scalar {key} = {value}")
        if not count:
            return state, Finding(False, value=0.0, threshold=0.0)
        more = f" (and {len(offenders) - 1} more)" if len(offenders) > 1 else ""
        state = _remember_first(state, record, first_pos, offenders[first], first_weight)
        return state, Finding(
            True,
            value=float(count),
            threshold=0.0,
            tensors=tuple(offenders),
            message=f"non-finite values at {record.mode} step {record.step}: {details[first]}{more}",
        )

    def job_summary(self, rank_states: Mapping[int, State], mode: str) -> tuple[dict[str, Any], str] | None:
        """The job's first non-finite value of `mode` over all ranks: (alert details, message text).

        None when no rank has recorded one. Pure: reads the per-rank states the stream layer keeps.
        """
        best: tuple[Any, ...] | None = None
        for rank, state in rank_states.items():
            entry = (state or {}).get("first", {}).get(mode)
            if entry is None:
                continue
            step, ts, pos, name, *rest = entry  # entries stored before the phase have 4 items
            key = (step, rest[0] if rest else 1, ts, pos, rank, name)
            if best is None or key[:5] < best[:5]:
                best = key
        if best is None:
            return None
        step, _, ts, _, rank, name = best
        details = {"rank": rank, "tensor": name, "step": step, "mode": mode, "ts": ts}
        return {"first_nonfinite": details}, f"first non-finite: rank {rank}, {name}, step {step}"


def _remember_first(state: State, record: StepRecord, pos: int, name: str, weight: bool) -> State:
    """A new state whose `first[mode]` is the earlier of the stored entry and this record's (not mutating)."""
    first = state.get("first", {})
    old = first.get(record.mode)
    new = [record.step, record.ts, pos, name, 0 if weight else 1]
    if old is not None and tuple(old[:3]) <= tuple(new[:3]):
        return state
    return {**state, "first": {**first, record.mode: new}}
