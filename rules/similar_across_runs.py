"""SimilarAcrossRuns: the same tensor differs at the same step between this job and another.

A rule sees one job's records, but this one must compare two jobs, whose records arrive on
different topics with different keys. The rule therefore has two entry points: `update` for
records of its own job (side A) and `update_other` for records of a job named by
`other_trials` (side B); both keep their fingerprints in the one rule state. Getting B's records
into A's state is the stream layer's job (see tensorpulse.stream.crossrun): workers re-publish
the selected fingerprints of both jobs on an internal topic keyed by A, so one key context,
on whichever worker owns it, sees both sides. Everything here stays pure and testable.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field
from typing_extensions import TypedDict

from tensorpulse.errors import ConfigError
from tensorpulse.wire import MODES, StepRecord

from . import functional as F
from .base import Finding, Regex, Rule, RuleKind, RuleParams, State, compile_regex

#: Collection names that select the scalars of a record (as for ExplodingTensor).
SCALAR_COLLECTIONS = frozenset({"losses", "metrics"})
#: What is compared per tensor (scalars: their value).
COMPARED = ("mean", "std", "min", "max", "l2")
#: At most this many tensor names are kept per compared job for the alert.
MAX_NAMES = 20


class SimilarAcrossRunsParams(RuleParams):
    other_trials: list[str] | str = Field(description="job ids (a list) or a regex (re.search) of job ids")
    collection_names: list[str] | None = None
    tensor_regex: str | None = None
    rtol: float = Field(1e-5, ge=0.0)
    atol: float = Field(1e-8, ge=0.0)
    window: int = Field(50, ge=1, description="steps per side kept while waiting for the other side")


class SimilarAcrossRuns(Rule):
    """Fires while a tensor differs at the same step between this job and another one.

    Our definition: `other_trials` names the other jobs, as a list of job ids or as a regex
    (re.search on the job id; anchor it, e.g. "^seed-1-", to avoid surprises); a job is never
    compared with itself. Per rank and mode, the tensors in `collection_names` (all when None)
    whose name matches `tensor_regex` (all when None) are reduced to a fingerprint (mean, std,
    min, max, l2); scalars (losses, metrics) are compared by value when `collection_names` is
    None or names "losses" or "metrics". When both jobs have reported the same (rank, mode,
    step), every tensor present on both sides is compared; it differs unless each component
    is close: |a − b| <= atol + rtol·|b| (numpy.isclose; NaN equals NaN, inf equals inf of the
    same sign). Defaults rtol=1e-5, atol=1e-8 (numpy's): identically seeded runs on the same
    hardware produce identical statistics; raise them to tolerate non-deterministic kernels.
    The finding of a comparison: firing if the latest comparison with any other job differed;
    value = number of differing tensors, tensors = their names (at most 20 per job), and the
    message names the other job, the step and the first difference. Tensors present on one side
    only are not compared. Only the last `window` steps of each side are kept while waiting
    for the other side: runs further apart than that are not compared (a record of the other
    job arriving too late is kept in its own window and evicted unmatched). The state is
    bounded: window × compared tensors × 5 floats per side and rank.
    Needs the stream layer's cross-run path (the worker sets it up when a rules file uses this
    rule); both jobs must be followed by the same worker group.
    """

    name: ClassVar[str] = "SimilarAcrossRuns"
    Params: ClassVar[type[RuleParams]] = SimilarAcrossRunsParams
    modes: ClassVar[frozenset[str]] = frozenset(MODES)
    severity: ClassVar[str] = "warning"
    needs: ClassVar[str] = (
        "mean, std, min, max and l2 of the selected tensors of both jobs, at the same steps"
    )
    #: Tells the stream layer to route other jobs' records to `update_other` (crossrun path).
    kind: ClassVar[RuleKind] = RuleKind.CROSS_RUN

    class State(TypedDict):
        a: dict[str, dict[str, list[float]]]  # "<mode>:<step>" -> name -> this job's values
        b: dict[str, dict[str, dict[str, list[float]]]]  # other job -> its values waiting, as `a`
        d: dict[str, list[Any]]  # other job -> [differing names, how many, compared, first text]

    def _check(self) -> None:
        p = self.params
        self._regex: Regex | None = compile_regex(p.tensor_regex, "tensor_regex")
        self._collections = None if p.collection_names is None else frozenset(p.collection_names)
        self._scalars = p.collection_names is None or bool(SCALAR_COLLECTIONS & frozenset(p.collection_names))
        if isinstance(p.other_trials, str):
            self._others: frozenset[str] | None = None
            self._others_re = compile_regex(p.other_trials, "other_trials")
        else:
            if not p.other_trials:
                raise ConfigError("rule SimilarAcrossRuns: other_trials must name at least one job")
            self._others = frozenset(p.other_trials)
            self._others_re = None

    def initialize(self) -> State:
        return {"a": {}, "b": {}, "d": {}}

    def watches(self, job: str) -> bool:
        """True if `job` is one of the other trials this rule compares with."""
        if self._others is not None:
            return job in self._others
        return self._others_re is not None and self._others_re.search(job) is not None

    def selects(self, name: str, collection: str | None) -> bool:
        """True if the tensor (collection given) or scalar (collection None) is compared."""
        if self._regex is not None and self._regex.search(name) is None:
            return False
        if collection is None:
            return self._scalars
        return self._collections is None or collection in self._collections

    def fingerprints(self, record: StepRecord) -> dict[str, list[float]]:
        """name -> compared values of the selected tensors, then scalars, in record order."""
        out: dict[str, list[float]] = {}
        for t in record.tensors:
            if self.selects(t.name, t.collection):
                out[t.name] = [float(t.mean), float(t.std), float(t.min), float(t.max), float(t.l2)]
        for key, value in record.scalars.items():
            if key not in out and self.selects(key, None):
                out[key] = [float(value)]
        return out

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        """A record of this rule's own job: keep it, and compare with other jobs waiting at its step."""
        key = f"{record.mode}:{record.step}"
        mine = self.fingerprints(record)
        a = _push(state["a"], key, mine, self.params.window)
        b, d = dict(state["b"]), dict(state["d"])
        compared = False
        for other in sorted(b):
            theirs = b[other].get(key)
            if theirs is None:
                continue
            d[other] = self._verdict(mine, theirs, other, record)
            b[other] = {k: v for k, v in b[other].items() if k != key}
            compared = True
        new = {"a": a, "b": b, "d": d}
        return new, (self._finding(d) if compared else None)

    def update_other(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        """A record of another job: compare with this job's record of that step, or keep it until it comes."""
        other = record.job
        key = f"{record.mode}:{record.step}"
        theirs = self.fingerprints(record)
        mine = state["a"].get(key)
        if mine is None:
            b = {**state["b"], other: _push(state["b"].get(other, {}), key, theirs, self.params.window)}
            return {**state, "b": b}, None
        d = {**state["d"], other: self._verdict(mine, theirs, other, record)}
        return {**state, "d": d}, self._finding(d)

    def _verdict(
        self, mine: dict[str, list[float]], theirs: dict[str, list[float]], other: str, record: StepRecord
    ) -> list[Any]:
        """[differing names (bounded), how many differ, how many compared, first difference text]."""
        p = self.params
        names: list[str] = []
        count = compared = 0
        first = ""
        for name, a in mine.items():
            b = theirs.get(name)
            if b is None:
                continue
            compared += 1
            if F.fingerprints_close(a, b, p.rtol, p.atol, equal_nan=True):
                continue
            count += 1
            if len(names) < MAX_NAMES:
                names.append(name)
            if not first:
                i = next(
                    (
                        i
                        for i, (x, y) in enumerate(zip(a, b, strict=True))
                        if not F.close(x, y, p.rtol, p.atol, True)
                    ),
                    0,
                )
                what = COMPARED[i] if len(a) > 1 else "value"
                first = (
                    f"{name} differs from job {other} at {record.mode} step {record.step}: "
                    f"{what} {a[i]:.6g} vs {b[i]:.6g}"
                )
        return [names, count, compared, first]

    def _finding(self, verdicts: dict[str, list[Any]]) -> Finding:
        differing = [o for o in sorted(verdicts) if verdicts[o][1] > 0]
        threshold = self.params.rtol
        if not differing:
            return Finding(False, value=0.0, threshold=threshold)
        names: list[str] = []
        for o in differing:
            names += [n for n in verdicts[o][0] if n not in names]
        count = sum(verdicts[o][1] for o in differing)
        first = verdicts[differing[0]]
        more = f" ({first[1]} of {first[2]} compared tensors differ" + (
            f"; also differs from {', '.join(differing[1:])})" if len(differing) > 1 else ")"
        )
        return Finding(
            True, value=float(count), threshold=threshold, tensors=tuple(names), message=first[3] + more
        )


def _push(window: dict[str, Any], key: str, value: Any, size: int) -> dict[str, Any]:
    """A new dict: `window` with key set to value, keeping the `size` most recently added keys."""
    out = {k: v for k, v in window.items() if k != key}
    out[key] = value
    if len(out) > size:
        out = dict(list(out.items())[-size:])
    return out
