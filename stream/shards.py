"""The worker's per-parameter view of sharded parameters (FSDP2, DTensor): shards of a step combined.

Under FSDP2 each rank's record holds statistics of its own shard of every parameter and gradient,
marked with the whole parameter's size and the shard's index (wire `t.sh`, `TensorStats.shard`).
Rules see each rank's record as it came (a NaN in rank 1's shard fires on rank 1, naming the
parameter); this module combines the shards of one step into the parameter's statistics, for the
worker's Prometheus gauges (`tensorpulse_parameter_stat`).

What combines (tensorpulse.statistics, `combine`): n, mean, std, min, max, abs_mean, the zero,
NaN and inf counts, and so l2, variance and zero_frac; weight deltas as root sum of squares (the
same previous step on every shard). What does not: quantiles (a quantile of the whole is not a
function of the shards' quantiles) and activity (activations are not sharded): a combined
parameter has none, and each rank's shard keeps its own in its record.

A parameter of a step is combined once every shard index 0..count-1 has arrived (replicas of a
shard, HSDP, count once) and their element counts add up to the parameter's; shards of at most
`max_pending_steps` steps per (job, mode) wait for the rest, the oldest step given up beyond that
(counted in `incomplete`); the names combined of those steps are remembered as long, so that
replicas of a shard arriving after the parameter was combined are not combined again. The pending shards are the worker's memory only: after a restart a
step whose shards were split across it is not combined, and the next complete one is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tensorpulse import statistics
from tensorpulse.wire import StepRecord, TensorStats

#: Statistics exported per combined parameter (attribute names of TensorStats).
EXPORTED = ("n", "mean", "std", "min", "max", "l2", "abs_mean", "zero_frac", "nan", "inf")


def combine_shards(shards: list[TensorStats]) -> TensorStats:
    """The whole parameter's statistics from one step's shards of it (one per shard index).

    Name and collection are the shards'; quantiles, activity and the shard mark are None.
    """
    return statistics.combine(shards, shard=None)


def complete(shards: dict[int, TensorStats]) -> bool:
    """Every shard index of the parameter is here, and their sizes add up to the parameter's."""
    first = next(iter(shards.values()))
    mark = first.shard
    assert mark is not None
    return len(shards) == mark.count and sum(t.n for t in shards.values()) == mark.numel


@dataclass(slots=True)
class _Step:
    """The shards of one step of one (job, mode) seen so far: name -> shard index -> statistics,
    and the names already combined (so that replicas arriving later do not combine them again)."""

    step: int
    shards: dict[str, dict[int, TensorStats]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)


class ShardJoin:
    """Collects each step's shards per (job, mode) and combines each parameter once it is whole."""

    def __init__(self, max_pending_steps: int = 16) -> None:
        if max_pending_steps < 1:
            raise ValueError(f"Expected argument `max_pending_steps` to be >= 1 but got {max_pending_steps}")
        self.max_pending_steps = max_pending_steps
        self._pending: dict[tuple[str, str], dict[int, _Step]] = {}
        #: Parameters given up (a step pushed out by newer ones before all its shards arrived).
        self.incomplete = 0

    def add(self, record: StepRecord) -> list[tuple[int, TensorStats]]:
        """The (step, combined parameter) pairs this record completes; [] if none."""
        sharded = [t for t in record.tensors if t.shard is not None]
        if not sharded or record.kind != "step":
            return []
        steps = self._pending.setdefault((record.job, record.mode), {})
        entry = steps.get(record.step)
        if entry is None:
            entry = steps[record.step] = _Step(record.step)
            while len(steps) > self.max_pending_steps:
                oldest = min(steps)
                self.incomplete += len(steps.pop(oldest).shards)
            if record.step not in steps:  # older than every step the window holds: too late
                self.incomplete += len(sharded)
                return []
        out = []
        for t in sharded:
            assert t.shard is not None
            if t.name in entry.done:
                continue  # a replica of a shard of a parameter already combined (HSDP)
            parts = entry.shards.setdefault(t.name, {})
            parts.setdefault(t.shard.index, t)  # a replica of a shard already here counts once
            if complete(parts):
                out.append((record.step, combine_shards([parts[i] for i in sorted(parts)])))
                del entry.shards[t.name]
                entry.done.add(t.name)
        return out

    def forget(self, job: str) -> None:
        """Drop a finished job's pending shards."""
        for key in [k for k in self._pending if k[0] == job]:
            del self._pending[key]

    def pending(self) -> int:
        """Parameters waiting for shards, over all jobs (bounded by max_pending_steps per mode)."""
        return sum(len(s.shards) for steps in self._pending.values() for s in steps.values())


class ShardedParameters(Collector):
    """Prometheus gauges of the newest combined statistics of every sharded parameter.

    `tensorpulse_parameter_stat{training_job, mode, collection, tensor, stat}`: no rank label, the
    value is the whole parameter's (the per-rank shard statistics are `tensorpulse_tensor_stat`).
    `tensorpulse_parameter_step`: the step those statistics are of.
    """

    def __init__(self, job_label: str = "training_job", max_parameters_per_job: int = 256) -> None:
        self.job_label = job_label
        self.max_parameters_per_job = max_parameters_per_job
        self.join = ShardJoin()
        self._latest: dict[tuple[str, str, str], tuple[int, TensorStats]] = {}
        self._lock = threading.Lock()

    def observe(self, record: StepRecord) -> None:
        """Feed one record; parameters it completes replace older steps' statistics."""
        with self._lock:
            for step, whole in self.join.add(record):
                key = (record.job, record.mode, whole.name)
                old = self._latest.get(key)
                if old is not None and old[0] > step:
                    continue  # a late step's shards: the gauge keeps the newer one
                if (
                    old is None
                    and sum(k[0] == record.job for k in self._latest) >= self.max_parameters_per_job
                ):
                    continue
                self._latest[key] = (step, whole)

    def latest(self, job: str, mode: str, name: str) -> tuple[int, TensorStats] | None:
        """(step, combined statistics) of a parameter, if any step of it was combined."""
        with self._lock:
            return self._latest.get((job, mode, name))

    def forget(self, job: str) -> None:
        """A job is over: its series and pending shards go."""
        with self._lock:
            self.join.forget(job)
            for key in [k for k in self._latest if k[0] == job]:
                del self._latest[key]

    def collect(self) -> Iterator[Metric]:
        stat = GaugeMetricFamily(
            "tensorpulse_parameter_stat",
            "Latest statistic of a sharded parameter (FSDP2), combined from every rank's shard "
            "(stat: " + ", ".join(EXPORTED) + "; quantiles do not combine and are not given).",
            labels=[self.job_label, "mode", "collection", "tensor", "stat"],
        )
        steps = GaugeMetricFamily(
            "tensorpulse_parameter_step",
            "Step of the latest combined statistics of a sharded parameter.",
            labels=[self.job_label, "mode", "collection", "tensor"],
        )
        with self._lock:
            items = sorted(self._latest.items())
        for (job, mode, name), (step, t) in items:
            base = [job, mode, t.collection, name]
            steps.add_metric(base, step)
            for key in EXPORTED:
                stat.add_metric([*base, key], float(getattr(t, key)))
        yield stat
        yield steps
