"""RankDivergence: at the same step, one rank's statistic of a tensor is far from the other ranks'.

Under data-parallel training (DDP, Horovod, FSDP's replicas) every rank runs the same model on
its own shard of the batch. Gradients are all-reduced, so they are identical across ranks after
backward, and so are the weights; what stays local is what each rank computed from its own data:
activations and the loss. A rank whose data is corrupted (wrong normalisation, a bad shard, a
broken augmentation) or whose device misbehaves shows up there, and nowhere else until it has
poisoned the shared gradients.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, ClassVar, Literal

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.wire import StepRecord, TensorStats

from .base import Finding, RuleKind, RuleParams, State, compile_regex
from .cross_rank import (
    AssembledStep,
    CrossRankParams,
    CrossRankRule,
    CrossRankState,
    Extremes,
    RankedFinding,
    SummarisedStep,
)

#: Collection names that select scalars (scalars carry no collection on the wire).
SCALAR_COLLECTIONS = frozenset({"losses", "metrics"})
#: Statistics a tensor can be compared by (scalars: always their absolute value).
STATISTICS = ("abs_mean", "l2", "std", "mean")
#: Prefix that keeps scalar names apart from tensor names in the compared values.
SCALAR_PREFIX = "scalar:"


class RankDivergenceParams(CrossRankParams):
    statistic: Literal["abs_mean", "l2", "std", "mean"] = Field(
        "abs_mean", description="the tensor statistic compared (its absolute value)"
    )
    collection_names: list[str] | None = Field(
        ["activations", "losses"],
        description='collections compared; "losses" / "metrics" select scalars (None: every collection)',
    )
    tensor_regex: str | None = Field(None, description="only names matching this (re.search)")
    ratio_threshold: float = Field(10.0, gt=1.0, description="max/min across ranks above this diverges")
    min_value: float = Field(0.01, gt=0.0, description="values below this count as this (tiny values)")
    patience: int = Field(3, ge=1, description="consecutive compared steps that must diverge")


class _Reference(TypedDict):
    """RankDivergence's own state (under "c")."""

    n: int  # compared steps in a row that diverged
    ref: dict[str, dict[str, float]]  # name -> rank -> log value at the last step it agreed


class RankDivergence(CrossRankRule):
    """Fires while, for `patience` compared steps in a row, a tensor's statistic differs across ranks.

    Our definition: per mode and step, each rank contributes, for every tensor of
    `collection_names` whose name matches `tensor_regex` (re.search; all when None), the absolute
    value v = |statistic| ("abs_mean" by default; "l2", "std" or "mean"), and for every scalar
    (when the collections include "losses": scalars whose name contains "loss"; "metrics": the
    other scalars; None: all) its absolute value. A step is compared once the records' `world`
    ranks have reported it, or with the ranks present when it times out (`rank_timeout` seconds by
    record ts, see tensorpulse.rules.cross_rank). For each name reported by at least two ranks,
    all values finite (NaN/inf are ExplodingTensor's), with c = max(v, min_value):
    ratio = max(c) / min(c) over the ranks. The name diverges if ratio > ratio_threshold; tiny
    values are thereby ignored (two values below `min_value` never diverge). The step diverges if
    any name does. It fires after `patience` consecutive compared steps diverge and resolves at
    the first compared step where none does; steps with fewer than two ranks present check
    nothing. value = the largest ratio, tensors = diverging names (largest ratio first; scalars
    as "scalar:<name>"), and the alert names the outlier rank of the first: the rank whose
    log(c) is farthest from the median log(c) of the other ranks; ties (always with two ranks)
    go to the rank whose log(c) moved most since the name's last non-diverging compared step,
    then to the larger value, then the lower rank. The message names the missing ranks of a
    timed-out step. Jobs with world 1 check nothing. Memory: at most `max_pending_steps` steps ×
    ranks × compared names floats, plus one value per rank and name from the last healthy step.
    Jobs of more than `max_exact_ranks` ranks (64) are compared from each name's extremes, so that
    memory does not grow with the job: the ratio is the same; the outlier is the extreme (largest or
    smallest value) farther in log space from the mean of the other ranks' values (the largest on
    a tie, no history tie-break), and the message names the extremes instead of every rank.
    The hook must send the chosen statistic of activations (TorchHook does) and the loss scalar,
    with `rank` and `world` set (RANK / WORLD_SIZE).
    """

    name: ClassVar[str] = "RankDivergence"
    kind: ClassVar[RuleKind] = RuleKind.CROSS_RANK
    Params: ClassVar[type[RuleParams]] = RankDivergenceParams

    class State(CrossRankState):
        c: _Reference  # type: ignore[misc]  # narrows CrossRankState's c

    modes: ClassVar[frozenset[str]] = frozenset({"train", "eval"})
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = (
        "per rank (rank and world set): the statistic of activations and the loss scalar at the same steps"
    )

    def _check(self) -> None:
        p: Any = self.params
        self._regex = compile_regex(p.tensor_regex, "tensor_regex")
        names = p.collection_names
        self._collections = None if names is None else frozenset(names)
        self._losses = names is None or "losses" in names
        self._metrics = names is None or "metrics" in names

    def initialize_compare(self) -> State:
        return {"n": 0, "ref": {}}

    # ------------------------------------------------------------------ per record
    def values(self, record: StepRecord) -> dict[str, float]:
        """The compared values of one rank's record: {tensor name or "scalar:<name>": |value|}."""
        stat = self.params.statistic  # type: ignore[attr-defined]
        out: dict[str, float] = {}
        colls = self._collections
        if colls is None or colls - SCALAR_COLLECTIONS:
            for t in record.select(colls, self._regex):
                if t.n > 0:
                    out[t.name] = abs(_stat(t, stat))
        if self._losses or self._metrics:
            for key, value in record.scalars.items():
                wanted = self._losses if "loss" in key else self._metrics
                if wanted and (self._regex is None or self._regex.search(key)):
                    out[SCALAR_PREFIX + key] = abs(float(value))
        return out

    # ------------------------------------------------------------------ per assembled step
    def compare(self, state: State, step: AssembledStep) -> tuple[State, Finding | None]:
        p: Any = self.params
        if len(step.ranks) < 2:
            return state, None
        floor = p.min_value
        names = sorted({n for v in step.ranks.values() for n in v})
        ref: dict[str, dict[str, float]] = dict(state.get("ref", {}))
        hits: list[tuple[float, str, int, dict[int, float]]] = []
        for name in names:
            logs = {r: math.log(max(v[name], floor)) for r, v in step.ranks.items() if name in v}
            if len(logs) < 2 or not all(math.isfinite(x) for x in logs.values()):
                continue
            ratio = math.exp(max(logs.values()) - min(logs.values()))
            if ratio > p.ratio_threshold:
                outlier = _outlier(logs, ref.get(name, {}))
                raw = {r: step.ranks[r][name] for r in logs}
                hits.append((ratio, name, outlier, raw))
            else:
                ref[name] = {str(r): x for r, x in logs.items()}
        def describe(hit: tuple[float, str, int, dict[int, float]], what: str) -> str:
            ratio, _, outlier, raw = hit
            others = ", ".join(f"rank {r} = {raw[r]:.3g}" for r in sorted(raw) if r != outlier)
            return f"{what} on rank {outlier} = {raw[outlier]:.3g} vs {others}"

        missing = f"; ranks missing: {', '.join(map(str, step.missing))}" if step.missing else ""
        return self._verdict({"ref": ref}, int(state.get("n", 0)), step, min(step.ranks), hits, describe, missing)

    def compare_extremes(self, state: State, step: SummarisedStep) -> tuple[State, Finding | None]:
        """`compare` for a large job, from each name's extremes (see the class docstring)."""
        p: Any = self.params
        if step.reported < 2:
            return state, None
        floor = p.min_value
        hits: list[tuple[float, str, int, Extremes]] = []
        for name, x in sorted(step.names.items()):
            if x.n < 2 or not x.finite:
                continue
            lo, hi = math.log(max(x.lo, floor)), math.log(max(x.hi, floor))
            ratio = math.exp(hi - lo)
            if ratio > p.ratio_threshold:
                # The outlier is one of the two extremes: the one farther (in log space) from the
                # others' mean, estimated from the sum of values as log(mean of the others).
                rest_hi = max((x.total - x.hi) / (x.n - 1), floor)
                rest_lo = max((x.total - x.lo) / (x.n - 1), floor)
                far_hi, far_lo = hi - math.log(rest_hi), math.log(rest_lo) - lo
                hits.append((ratio, name, x.hi_rank if far_hi >= far_lo else x.lo_rank, x))
        def describe(hit: tuple[float, str, int, Extremes], what: str) -> str:
            _, _, outlier, x = hit
            value = x.hi if outlier == x.hi_rank else x.lo
            return (
                f"{what} on rank {outlier} = {value:.3g}; over {x.n} ranks min {x.lo:.3g} (rank {x.lo_rank}), "
                f"max {x.hi:.3g} (rank {x.hi_rank}), mean {x.total / x.n:.3g}"
            )

        missing = f"; {len(step.missing)} rank(s) missing" if step.missing else ""
        return self._verdict(dict(state), int(state.get("n", 0)), step, 0, hits, describe, missing)

    def _verdict(
        self,
        kept: State,
        streak: int,
        step: AssembledStep | SummarisedStep,
        healthy_rank: int,
        hits: list[Any],
        describe: Any,
        missing: str,
    ) -> tuple[State, Finding | None]:
        """The finding on one compared step from its diverging names, (ratio, name, outlier, detail)
        each: healthy without any, firing after `patience` in a row (both ways of comparing)."""
        p: Any = self.params
        if not hits:
            healthy = RankedFinding(
                False, threshold=p.ratio_threshold, step=step.step, mode=step.mode, rank=healthy_rank, ts=step.ts
            )
            return {**kept, "n": 0}, healthy
        new = {**kept, "n": streak + 1}
        if streak + 1 < p.patience:
            return new, None
        hits.sort(key=lambda h: (-h[0], h[1]))
        ratio, name, outlier, _ = hits[0]
        what = name[len(SCALAR_PREFIX) :] if name.startswith(SCALAR_PREFIX) else f"{name} {p.statistic}"
        more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
        message = (
            f"ranks diverge at {step.mode} step {step.step}: {describe(hits[0], what)} "
            f"(ratio {ratio:.3g} > {p.ratio_threshold:g}){more}{missing}"
        )
        return new, RankedFinding(
            True,
            value=ratio,
            threshold=p.ratio_threshold,
            tensors=tuple(h[1] for h in hits),
            message=message,
            step=step.step,
            mode=step.mode,
            rank=outlier,
            ts=step.ts,
        )


def _stat(t: TensorStats, stat: str) -> float:
    if stat == "l2":
        return t.l2
    return float(getattr(t, stat))


def _outlier(logs: dict[int, float], ref: dict[str, float]) -> int:
    """The rank farthest (in log space) from the median of the others; see the class docstring."""

    def key(r: int) -> tuple[float, float, float, int]:
        others = [x for q, x in logs.items() if q != r]
        distance = abs(logs[r] - statistics.median(others))
        before = ref.get(str(r))
        moved = abs(logs[r] - before) if before is not None else 0.0
        return (round(distance, 9), round(moved, 9), logs[r], -r)

    return max(logs, key=key)
