"""What a report shows of a job, gathered in one pass over its records: series and replayed alerts.

Series are kept per (mode, scalar) and per tensor, of one rank, thinned by doubling their stride
when long, so memory stays bounded on any topic length; the alerts are the rules replayed on the
same records (`tensorpulse.replay`). Nothing here draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..events import AlertEvent
from ..replay import Payload, ReplaySummary, replay
from ..rules.base import compile_regex
from ..rules.config import RuleSpec
from ..wire import StepRecord, TensorStats

#: Per-tensor statistics `--stat` can plot.
STATS: dict[str, Callable[[TensorStats], float]] = {
    "abs_mean": lambda t: t.abs_mean,
    "l2": lambda t: t.l2,
    "mean": lambda t: t.mean,
    "std": lambda t: t.std,
    "variance": lambda t: t.variance,
    "min": lambda t: t.min,
    "max": lambda t: t.max,
    "zero_frac": lambda t: t.zero_frac,
}
#: Columns kept per tensor and step: the plotted statistics, the band and the dead-unit fraction.
_COLUMNS = (*STATS, "p5", "p95", "dead")
#: Collections drawn first, in this order; others follow alphabetically.
COLLECTION_ORDER = ("weights", "biases", "gradients", "activations")
#: A unit counts as dead when active in fewer than this fraction of samples (DeadRelu's default).
DEAD_EDGE = 0.01


class Thinned:
    """A series of (step, columns) that keeps at most ~2*max_points points.

    When full it drops every other point and doubles its stride, so memory stays constant on
    any topic length while the points stay evenly spread over the steps.
    """

    def __init__(self, columns: Sequence[str], max_points: int) -> None:
        self.max_points = max_points
        self.stride = 1
        self.seen = 0
        self.steps: list[int] = []
        self.cols: dict[str, list[float]] = {c: [] for c in columns}

    def add(self, step: int, values: dict[str, float]) -> None:
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        self.steps.append(step)
        for c, col in self.cols.items():
            col.append(values.get(c, math.nan))
        if len(self.steps) >= 2 * self.max_points:
            self.steps = self.steps[::2]
            for c in self.cols:
                self.cols[c] = self.cols[c][::2]
            self.stride *= 2

    def array(self, column: str) -> np.ndarray:
        return np.asarray(self.cols[column], dtype=np.float64)

    def x(self) -> np.ndarray:
        return np.asarray(self.steps, dtype=np.float64)


@dataclass
class TensorSeries:
    """One tensor's statistics over the steps of one rank."""

    name: str
    collection: str
    series: Thinned
    #: Steps where the tensor held NaN or inf (first 1000).
    nonfinite_steps: list[int] = field(default_factory=list)

    @property
    def has_quantiles(self) -> bool:
        return bool(np.isfinite(self.series.array("p5")).any())

    @property
    def has_activity(self) -> bool:
        return bool(np.isfinite(self.series.array("dead")).any())


@dataclass
class JobData:
    """Everything a report shows of one job: series of one rank, the replayed alerts, the counts."""

    job: str
    rank: int = 0
    scalars: dict[tuple[str, str], Thinned] = field(default_factory=dict)
    tensors: dict[str, TensorSeries] = field(default_factory=dict)
    alerts: list[AlertEvent] = field(default_factory=list)
    summary: ReplaySummary | None = None
    rules: list[str] = field(default_factory=list)

    def collections(self) -> list[str]:
        present = {t.collection for t in self.tensors.values()}
        return [c for c in COLLECTION_ORDER if c in present] + sorted(present - set(COLLECTION_ORDER))

    def firing(self) -> list[AlertEvent]:
        return [a for a in self.alerts if a.status == "firing"]


class Collector:
    """Turns one job's decoded records into series: rank `rank` only, tensors matching `tensors`."""

    def __init__(
        self, job: str, *, rank: int = 0, tensors: str | None = None, max_points: int = 4000
    ) -> None:
        # RE2, as for rule regexes: tensor names come from whoever wrote the job's records.
        self.regex = compile_regex(tensors or None, "--tensors")
        self.data = JobData(job, rank)
        self.max_points = max_points

    def add(self, record: StepRecord) -> None:
        if record.kind != "step" or record.rank != self.data.rank:
            return
        for name, value in record.scalars.items():
            key = (record.mode, name)
            s = self.data.scalars.get(key)
            if s is None:
                s = self.data.scalars[key] = Thinned(("value",), self.max_points)
            s.add(record.step, {"value": value})
        if record.mode != "train":
            return
        for t in record.tensors:
            if self.regex is not None and not self.regex.search(t.name):
                continue
            ts = self.data.tensors.get(t.name)
            if ts is None:
                ts = self.data.tensors[t.name] = TensorSeries(
                    t.name, t.collection, Thinned(_COLUMNS, self.max_points)
                )
            values = {k: f(t) for k, f in STATS.items()}
            if t.quantiles is not None:
                values["p5"], values["p95"] = t.quantiles
            dead = t.inactive_unit_fraction(DEAD_EDGE)
            if dead is not None:
                values["dead"] = dead
            ts.series.add(record.step, values)
            if t.nonfinite and len(ts.nonfinite_steps) < 1000:
                ts.nonfinite_steps.append(record.step)


def collect_job(
    payloads: Iterable[bytes | Payload],
    job: str,
    specs: Sequence[RuleSpec],
    *,
    rank: int = 0,
    tensors: str | None = None,
    max_points: int = 4000,
) -> JobData:
    """One pass over a job's payloads: series for the pictures and the replayed alerts."""
    collector = Collector(job, rank=rank, tensors=tensors, max_points=max_points)
    r = replay(payloads, job, specs, on_record=collector.add)
    data = collector.data
    data.alerts = list(r.events)
    data.summary = r.summary()
    data.rules = [s.name for s in r.specs]
    return data
