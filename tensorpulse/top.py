"""The view state of `tensorpulse top`: decoded records and alert events in, rows and sparklines out.

Nothing here reads Kafka, a clock or a terminal: the feed (tensorpulse/top_feed.py) folds what it
reads into a `TopState`, the screen (tensorpulse/top_screen.py) asks it for `rows(now)` and
`series(job)` and draws them, and the unit tests do both with hand-made records and a fixed `now`.

Times are the records' own `ts` (the hook's clock), so a job's step rate does not depend on when
`top` happened to read its records (at start it reads minutes of them at once); a record's age is
`now - ts`, which assumes the hosts' clocks agree (NTP), as the worker's publish-to-evaluation
latency does.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .events import AlertEvent
from .sinks.alertmanager import AlertKey, alert_key
from .wire import StepRecord

#: Eight heights of a sparkline, lowest first; a non-finite value is drawn as NONFINITE_MARK.
SPARK_BARS = "▁▂▃▄▅▆▇█"
NONFINITE_MARK = "!"
#: A series whose finite values are all > 0 and span more than this ratio is drawn on a log scale
#: (a gradient norm that explodes would otherwise flatten everything before it into the lowest bar).
LOG_SPAN = 100.0

#: Defaults of `TopState`, which `tensorpulse top --help` states: a job with no record for this long
#: is silent; steps/s is measured over this much of a job's most recent records.
SILENT_AFTER_S = 30.0
RATE_WINDOW_S = 10.0

#: The states of a job, as the STATE column shows them.
LIVE, SILENT, ENDED = "live", "silent", "ended"

#: Severities in the order the FIRING column lists their rules (most urgent first).
_SEVERITY_ORDER = {"critical": 0, "error": 1, "warning": 2, "info": 3}


def sparkline(values: Sequence[float]) -> tuple[str, bool]:
    """One character per value, scaled between the series' finite min and max; and whether the
    scale is logarithmic (all finite values > 0, spanning more than LOG_SPAN). NaN and ±inf are
    NONFINITE_MARK: the moment a tensor broke stays visible in the line."""
    finite = [v for v in values if math.isfinite(v)]
    log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > LOG_SPAN

    def scaled(v: float) -> float:
        return math.log10(v) if log else v

    if not finite:
        return NONFINITE_MARK * len(values), False
    lo, hi = scaled(min(finite)), scaled(max(finite))
    top = len(SPARK_BARS) - 1
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(NONFINITE_MARK)
        elif hi == lo:
            out.append(SPARK_BARS[top // 2])  # a constant series: a flat line mid-height
        else:
            out.append(SPARK_BARS[round((scaled(v) - lo) / (hi - lo) * top)])
    return "".join(out), log


@dataclass(frozen=True, slots=True)
class Firing:
    """A rule firing for a job now: the ranks it fires on and its severity (from its alert events)."""

    rule: str
    severity: str
    ranks: tuple[int, ...]
    since_step: int


@dataclass(frozen=True, slots=True)
class JobRow:
    """One line of the jobs table (the columns `tensorpulse top --help` explains)."""

    job: str
    state: str
    step: int | None
    mode: str | None
    steps_per_s: float | None
    ranks: int
    world: int | None
    age_s: float | None
    lag: int | None
    firing: tuple[Firing, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["firing"] = [asdict(f) for f in self.firing]
        return d


@dataclass(frozen=True, slots=True)
class Series:
    """Recent values of one scalar or tensor statistic, one per step, oldest first."""

    name: str
    kind: str  # "scalar", or the tensor's collection
    steps: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def last(self) -> float:
        return self.values[-1]

    def to_dict(self) -> dict[str, Any]:
        line, log = sparkline(self.values)
        values = [v if math.isfinite(v) else str(v) for v in self.values]
        return {"name": self.name, "kind": self.kind, "steps": list(self.steps), "values": values,
                "sparkline": line, "log": log}


@dataclass
class _Job:
    """What `TopState` keeps of one job: bounded, whatever the job's length."""

    ranks: set[int] = field(default_factory=set)
    ended_ranks: set[int] = field(default_factory=set)
    world: int | None = None
    last_ts: float | None = None  # the newest record's creation time
    last_event: float = -math.inf  # the newest record's or alert event's time (for forgetting the job)
    mode: str | None = None  # the mode whose steps the row and the series follow
    rank: int | None = None  # the rank whose tensors the series show (the lowest seen)
    step: int | None = None  # the highest step of `mode` over every rank
    rank_step: int | None = None  # the last step of `mode` from `rank`
    rank_ts: float = -math.inf  # when `rank` created that step's record
    progress: deque[tuple[float, int]] = field(default_factory=deque)  # (ts, step), new steps only
    series: dict[str, tuple[str, deque[tuple[int, float]]]] = field(default_factory=dict)
    firing: dict[AlertKey, AlertEvent] = field(default_factory=dict)  # by alert_key: the worker's rule slot


class TopState:
    """Folds records (`add_record`) and alert events (`add_alert`) into the jobs table and series.

    - A job is `ended` once every rank it has (its world size) sent its end record, `silent` when
      its newest record is older than `silent_after` seconds (or three of its steps, for a job that
      slow), else `live`. A rank that publishes
      again after its end counts as running again (as the worker does).
    - The row's step, steps/s and the series follow one mode: `train` once seen, else the first
      mode the job used; the series come from the lowest rank seen (rank 0 normally).
    - steps/s is measured on record times over the last `rate_window` seconds of the job's own
      records (at least its last two steps); it is shown for live jobs only.
    - Firing rules are those with a `firing` event and no `resolved` event since, per alert
      (`alert_key`: job, rule, rank, as Alertmanager's sink keys them), as the alerts topic tells.
    - A job with no record or alert event in the last `forget_after` seconds is dropped.
    """

    def __init__(
        self,
        *,
        history: int = 60,
        rate_window: float = RATE_WINDOW_S,
        silent_after: float = SILENT_AFTER_S,
        forget_after: float = 3600.0,
        collection: str = "gradients",
        stat: str = "l2",
        max_series: int = 256,
    ) -> None:
        if history < 2:
            raise ValueError(f"Expected argument `history` to be at least 2 steps but got {history}")
        if stat not in ("l2", "mean", "std", "min", "max", "abs_mean", "zero_frac", "variance"):
            raise ValueError(f"Expected argument `stat` to be a TensorStats statistic but got {stat!r}")
        self.history = history
        self.rate_window = rate_window
        self.silent_after = silent_after
        self.forget_after = forget_after
        self.collection = collection
        self.stat = stat
        self.max_series = max_series
        self._jobs: dict[str, _Job] = {}
        self._lag: dict[str, int] = {}

    # ------------------------------------------------------------------------------------- input
    def add_record(self, rec: StepRecord) -> None:
        """Fold one decoded record (any rank, mode or kind) into its job."""
        job = self._jobs.setdefault(rec.job, _Job())
        job.last_event = max(job.last_event, rec.ts)
        job.last_ts = rec.ts if job.last_ts is None else max(job.last_ts, rec.ts)
        job.world = rec.world
        job.ranks.add(rec.rank)
        if rec.kind == "end":
            job.ended_ranks.add(rec.rank)
            return
        job.ended_ranks.discard(rec.rank)
        if job.mode is None or (rec.mode == "train" and job.mode != "train"):
            self._restart(job, mode=rec.mode, rank=rec.rank)
        if rec.mode != job.mode:
            return  # eval and predict steps have counters of their own
        if job.rank is None or rec.rank < job.rank:
            self._restart(job, mode=job.mode, rank=rec.rank)
        if rec.rank == job.rank:
            if job.rank_step is not None and rec.step < job.rank_step:
                if rec.ts < job.rank_ts:
                    # Created before the step already shown: a record that arrived late (a retried
                    # produce), not a restart. It is history: the row and the series stay as they are.
                    return
                # The job started over under the same id (another rank being a step ahead is no restart).
                self._restart(job, mode=job.mode, rank=rec.rank)
            job.rank_step, job.rank_ts = rec.step, rec.ts
        if job.step is None or rec.step > job.step:
            job.step = rec.step
            job.progress.append((rec.ts, rec.step))
            self._trim_progress(job)
        if rec.rank == job.rank:
            self._add_series(job, rec)

    def add_alert(self, ev: AlertEvent) -> None:
        """Fold one alert event: `firing` adds its alert, `resolved` removes it (a job's end resolves
        with the end record's mode and step: the mode is not part of an alert's identity)."""
        job = self._jobs.setdefault(ev.job, _Job())
        job.last_event = max(job.last_event, ev.ts)
        key = alert_key(ev)
        if ev.status == "firing":
            job.firing[key] = ev
        else:
            job.firing.pop(key, None)

    def set_lag(self, lag: Mapping[str, int]) -> None:
        """The worker's lag per job (records not yet read), replacing what was known."""
        self._lag = dict(lag)

    def extend(self, items: Iterable[StepRecord | AlertEvent]) -> TopState:
        """Fold records and alert events in the order given; returns self."""
        for item in items:
            if isinstance(item, AlertEvent):
                self.add_alert(item)
            else:
                self.add_record(item)
        return self

    # ------------------------------------------------------------------------------------ output
    def jobs(self) -> list[str]:
        return sorted(self._jobs)

    def rows(self, now: float) -> list[JobRow]:
        """The jobs table at time `now` (Unix seconds), by job id; jobs to forget are dropped here."""
        for name in [n for n, j in self._jobs.items() if now - j.last_event > self.forget_after]:
            del self._jobs[name]
        return [self._row(name, self._jobs[name], now) for name in sorted(self._jobs)]

    def series(self, job: str) -> list[Series]:
        """The job's step scalars, then its tensors of `collection` (their `stat`), in the order the
        job reported them; [] for a job not seen."""
        j = self._jobs.get(job)
        if j is None:
            return []
        out = [
            Series(name, kind, tuple(s for s, _ in points), tuple(v for _, v in points))
            for name, (kind, points) in j.series.items()
            if points
        ]
        return sorted(out, key=lambda s: s.kind != "scalar")  # stable: each group keeps its order

    # ---------------------------------------------------------------------------------- internal
    def _restart(self, job: _Job, *, mode: str, rank: int) -> None:
        job.mode, job.rank, job.step, job.rank_step, job.rank_ts = mode, rank, None, None, -math.inf
        job.progress.clear()
        job.series.clear()

    def _trim_progress(self, job: _Job) -> None:
        newest = job.progress[-1][0]
        while len(job.progress) > 2 and job.progress[1][0] <= newest - self.rate_window:
            job.progress.popleft()  # keeps one point at or before the window's start
        while len(job.progress) > self.history:
            job.progress.popleft()

    def _add_series(self, job: _Job, rec: StepRecord) -> None:
        points = [(name, "scalar", value) for name, value in rec.scalars.items()]
        points += [
            (t.name, t.collection, float(getattr(t, self.stat)))
            for t in rec.tensors
            if t.collection == self.collection
        ]
        for name, kind, value in points:
            entry = job.series.get(name)
            if entry is None:
                if len(job.series) >= self.max_series:
                    continue
                entry = job.series[name] = (kind, deque(maxlen=self.history))
            values = entry[1]
            if values and values[-1][0] == rec.step:
                values[-1] = (rec.step, value)  # the same step again (a re-sent record): last wins
            else:
                values.append((rec.step, value))

    def _rate(self, job: _Job) -> float | None:
        if len(job.progress) < 2:
            return None
        (t0, s0), (t1, s1) = job.progress[0], job.progress[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def _row(self, name: str, job: _Job, now: float) -> JobRow:
        age = None if job.last_ts is None else max(now - job.last_ts, 0.0)
        rate = self._rate(job)
        # A slow job (steps more than silent_after/3 apart) is silent only after three steps' time.
        quiet = max(self.silent_after, 3.0 / rate) if rate else self.silent_after
        if job.world is not None and len(job.ended_ranks) >= job.world:
            state = ENDED
        elif age is None or age > quiet:
            state = SILENT
        else:
            state = LIVE
        firing: dict[str, list[AlertEvent]] = {}
        for ev in job.firing.values():
            firing.setdefault(ev.rule, []).append(ev)
        rules = [
            Firing(
                rule,
                min((e.severity for e in evs), key=lambda s: _SEVERITY_ORDER.get(s, 9)),
                tuple(sorted({e.rank for e in evs})),
                min(e.step for e in evs),
            )
            for rule, evs in firing.items()
        ]
        rules.sort(key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9), f.rule))
        return JobRow(
            job=name,
            state=state,
            step=job.step,
            mode=job.mode,
            steps_per_s=rate if state == LIVE else None,
            ranks=len(job.ranks),
            world=job.world,
            age_s=age,
            lag=self._lag.get(name),
            firing=tuple(rules),
        )
