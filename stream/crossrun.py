"""Cross-run rules in the stream: getting job B's records into job A's state.

SimilarAcrossRuns (a `cross_run` rule) for job A compares A's records with those of the jobs its
`other_trials` names. Quix keeps state per topic and message key, so A's state never sees a
record of B, and A and B may be owned by different workers of the group. The design:

- **Re-keying.** While processing a step record of job J, a worker forwards it to the internal
  topic `tensorpulse.crossrun.<group>` once for every job A that needs it: keyed by J itself if
  J has cross-run rules (its own side), and keyed by every other followed job A whose cross-run
  rules name J (the other side). The forwarded value is the record re-encoded with the shared
  codec (`wire.encode`, names announced so no schema state is needed), holding only the tensors
  and scalars some of those rules compare. Forwarding is an output of the record's processing,
  so with exactly-once it is committed atomically with J's offsets.
- **One key context.** The same application consumes that topic with its own state store,
  keyed by A. Both sides of every comparison for A therefore arrive, in production order, in A's
  key context, on whichever worker owns that partition; there the cross-run `JobEvaluator` of A
  runs `process` for A's own records and `process_other` for the others'. Its alerts (job A) go
  to the alerts topic and its actions to A's control topic, in the same transaction as the
  state change: cross-run alerts are exactly-once like any other.
- **Not in the per-job evaluator.** Cross-run rules are left out of the evaluator of the job's
  own topic, so they are evaluated exactly once, in the crossrun stream.

- **A job's end.** When job A is over (every rank's end record, or no record for
  `job_idle_timeout_s`), the worker that saw it forwards a job-over notice keyed by A: an end record of
  A with the header `JOB_OVER_HEADER` (the reason). In A's key context it resolves every cross-run
  alert still firing for A (`JobEvaluator.end_job`), removes A's series there, and marks the context
  over (with the reason). B's records reach this stream through other partitions than A's, so one of
  B for a step A published can come after A's notice: it is compared as ever, and an alert it
  raises resolves at once with A's end (`late_comparison`), once per rule and rank, so that none is
  left firing for a job that is over and a divergence seen late is said once, not at every step.

The topic name carries the consumer group, so that two groups on one cluster do not evaluate each
other's forwarded records. It has one partition (comparisons are few; more partitions would
spread them over workers). Limits: B's records are forwarded only while A's topic exists and
is followed by the group (A discovered), and the rule compares steps within its `window`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
from quixstreams.models.serializers import SerializationContext, Serializer

from tensorpulse import wire
from tensorpulse.rules.config import RuleSpec
from tensorpulse.topics import group_topic

from .evaluator import JobEvaluator, JobState, Transition


def crossrun_topic(group: str) -> str:
    """The internal topic of a consumer group's cross-run records."""
    return group_topic("crossrun", group)


#: Header of a crossrun message that says the job of its key is over; its value is the reason (UTF-8).
JOB_OVER_HEADER = "tensorpulse-job-over"


class Forward(NamedTuple):
    """One message for the crossrun topic: its key (the job it is evaluated for), value and headers."""

    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def job_over_notice(job: str, step: int, now: float, reason: str) -> Forward:
    """The message that ends `job`'s cross-run evaluation: an end record of the job, the reason in a header.

    A value that is a valid record keeps the topic readable by anything that decodes it (replay,
    the dead-letter path); the header is what says "the whole job", not one rank.
    """
    value = wire.encode(job=job, rank=0, world=1, step=max(step, 0), mode="global", ts=now, kind="end")
    return Forward(job.encode(), value, ((JOB_OVER_HEADER, reason.encode()),))


def job_over_reason(headers: Any) -> str | None:
    """The reason of a job-over notice from a message's headers (None for a forwarded record)."""
    for name, value in headers or ():
        if name == JOB_OVER_HEADER:
            return bytes(value).decode("utf-8", "replace")
    return None


def ended_state(reason: str) -> dict[str, Any]:
    """What the crossrun stream keeps for a job that is over: the reason, and the (rule, rank)
    slots whose late comparison was already said."""
    return {"why": reason, "said": []}


def late_comparison(
    ev: JobEvaluator,
    state: JobState,
    job: str,
    transitions: list[Transition],
    ended: Any,
    now: float,
) -> tuple[JobState, list[Transition], dict[str, Any]]:
    """`transitions` of a comparison that came after `job`'s end: what fired resolves at once with the
    job's end reason, and each (rule, rank) says so once; returns the state, the transitions to
    publish, and the updated `ended_state`."""
    ended = ended if isinstance(ended, dict) else ended_state(str(ended))
    said = set(ended.get("said") or ())
    state, resolved = ev.end_job(state, job, now, reason=str(ended.get("why")))
    out = []
    for tr in [*transitions, *resolved]:
        slot = f"{tr.event.rule}|{tr.event.rank}"
        if slot not in said:
            out.append(tr)
    said |= {f"{tr.event.rule}|{tr.event.rank}" for tr in transitions if tr.event.status == "firing"}
    return state, out, {"why": ended.get("why"), "said": sorted(said)}


def _selected(spec: RuleSpec, name: str, collection: str | None) -> bool:
    return bool(spec.rule.selects(name, collection))  # type: ignore[attr-defined]


def forward_payload(record: wire.StepRecord, specs: Iterable[RuleSpec]) -> bytes | None:
    """`record` re-encoded with only what `specs` compare (names announced); None if nothing is."""
    specs = list(specs)
    tensors = [t for t in record.tensors if any(_selected(s, t.name, t.collection) for s in specs)]
    scalars = {k: v for k, v in record.scalars.items() if any(_selected(s, k, None) for s in specs)}
    if not tensors and not scalars:
        return None
    block = None
    if tensors:
        floats = np.array([[getattr(t, c) for c in wire.FLOAT_COLUMNS] for t in tensors], dtype=np.float32)
        block = wire.TensorBlock(
            names=[t.name for t in tensors],
            collections=[t.collection for t in tensors],
            n=np.array([t.n for t in tensors], dtype=np.int64),
            floats=floats,
            zeros=np.array([t.zeros for t in tensors], dtype=np.int64),
            nan=np.array([t.nan for t in tensors], dtype=np.int64),
            inf=np.array([t.inf for t in tensors], dtype=np.int64),
        )
    return wire.encode(
        job=record.job,
        rank=record.rank,
        world=record.world,
        step=record.step,
        mode=record.mode,
        ts=record.ts,
        seq=record.seq,
        scalars=scalars,
        tensors=block,
        announce=True,
    )


class KeyedValue(Serializer):
    """Serialises a `Forward` to its value: the key was taken by `to_topic(key=...)`, the headers by
    `set_headers`."""

    def __call__(self, value: tuple[Any, ...], ctx: SerializationContext) -> bytes:
        return value[1]
