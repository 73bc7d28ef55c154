"""Prometheus metrics of a stream worker.

Per-tensor statistics are not set gauge by gauge on the hot path (hundreds of label look-ups per
record): the worker keeps each (job, rank, mode)'s latest record and a custom collector turns it
into metric families at scrape time, applying the per-job cardinality bound there. Step numbers
are values, never labels.

The training job is the label `training_job`: `job` is Prometheus's own target label (a scrape
would rename ours to `exported_job`). Counters whose label values are known in advance exist
from the start at 0 (decode errors and dead letters per reason, rule errors per rule), and a
job's per-job counters from its first record (actions per action, alert transitions per rule
and status), so rate() and increase() see the first event and panels read 0, not "no data".
A finished job's series are removed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tensorpulse.actions import ACTIONS
from tensorpulse.errors import DECODE_REASONS, LIMITS
from tensorpulse.events import STATUSES
from tensorpulse.rules.config import RuleSpec
from tensorpulse.stream.shards import ShardedParameters
from tensorpulse.wire import StepRecord

#: The label holding the training job's id on every per-job series (never `job`, see above).
JOB_LABEL = "training_job"

#: Statistics exported per tensor (attribute names of TensorStats).
EXPORTED_STATS = ("mean", "std", "min", "max", "l2", "abs_mean", "zero_frac", "nan", "inf")

#: Why a rule's state was reset (`tensorpulse_rule_errors_total{reason}`): `update` or `check_idle`
#: raised, or the state read from the store did not match the rule's declared State (stream/state.py).
RULE_ERROR_REASONS = ("raised", "stored_state")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _num(x: float) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan


class _LatestRecords(Collector):
    """Builds tensor and scalar gauges at scrape time from the latest record per (job, rank, mode)."""

    def __init__(self, max_tensors_per_job: int, max_scalars_per_job: int) -> None:
        self.max_tensors_per_job = max_tensors_per_job
        self.max_scalars_per_job = max_scalars_per_job
        self._latest: dict[tuple[str, int, str], StepRecord] = {}
        self._lock = threading.Lock()

    def observe(self, record: StepRecord) -> None:
        with self._lock:
            self._latest[(record.job, record.rank, record.mode)] = record

    def forget(self, job: str) -> None:
        with self._lock:
            for key in [k for k in self._latest if k[0] == job]:
                del self._latest[key]

    def collect(self) -> Iterator[Metric]:
        tensor = GaugeMetricFamily(
            "tensorpulse_tensor_stat",
            "Latest statistic of a captured tensor (stat: mean, std, min, max, l2, abs_mean, zero_frac, nan, inf).",
            labels=[JOB_LABEL, "rank", "mode", "collection", "tensor", "stat"],
        )
        scalar = GaugeMetricFamily(
            "tensorpulse_scalar",
            "Latest value of a step scalar (loss, metrics).",
            labels=[JOB_LABEL, "rank", "mode", "name"],
        )
        step = GaugeMetricFamily(
            "tensorpulse_last_step", "Last step evaluated.", labels=[JOB_LABEL, "rank", "mode"]
        )
        dropped = GaugeMetricFamily(
            "tensorpulse_tensor_series_over_limit",
            "Tensors of a job not exported now because the job exceeds the per-job series bound.",
            labels=[JOB_LABEL],
        )
        scalars_over = GaugeMetricFamily(
            "tensorpulse_scalar_series_over_limit",
            "Scalar series (rank x mode x name) of a job not exported now: over max_scalars_per_job.",
            labels=[JOB_LABEL],
        )
        with self._lock:
            items = sorted(self._latest.items())
        per_job: dict[str, int] = {}
        over: dict[str, int] = {}
        scalars_per_job: dict[str, int] = {}
        for (job, rank, mode), rec in items:
            labels = [job, str(rank), mode]
            step.add_metric(labels, rec.step)
            room = self.max_scalars_per_job - scalars_per_job.get(job, 0)
            for name, value in list(rec.scalars.items())[: max(room, 0)]:
                scalar.add_metric([*labels, name], _num(value))
            scalars_per_job[job] = scalars_per_job.get(job, 0) + len(rec.scalars)
            budget = self.max_tensors_per_job - per_job.get(job, 0)
            shown = rec.tensors[: max(budget, 0)]
            per_job[job] = per_job.get(job, 0) + len(shown)
            if len(shown) < len(rec.tensors):
                over[job] = over.get(job, 0) + len(rec.tensors) - len(shown)
            for t in shown:
                base = [*labels, t.collection, t.name]
                for stat in EXPORTED_STATS:
                    tensor.add_metric([*base, stat], _num(getattr(t, stat)))
        for job, n in sorted(over.items()):
            dropped.add_metric([job], n)
        for job, n in sorted(scalars_per_job.items()):
            if n > self.max_scalars_per_job:
                scalars_over.add_metric([job], n - self.max_scalars_per_job)
        yield tensor
        yield scalar
        yield step
        yield dropped
        yield scalars_over


class WorkerMetrics:
    """Every metric a worker exports, on an injectable registry (tests use a fresh one)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_tensors_per_job: int = 256,
        max_scalars_per_job: int = 1024,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.latest = _LatestRecords(max_tensors_per_job, max_scalars_per_job)
        r.register(self.latest)
        # FSDP2: each rank's shards of a step combined into the parameter's statistics (stream/shards.py)
        self.parameters = ShardedParameters(JOB_LABEL, max_tensors_per_job)
        r.register(self.parameters)
        self.records = Counter("tensorpulse_records", "Records evaluated.", [JOB_LABEL, "mode"], registry=r)
        self.decode_errors = Counter(
            "tensorpulse_decode_errors", "Records that failed to decode, by reason.", ["reason"], registry=r
        )
        self.deadletters = Counter(
            "tensorpulse_deadletter",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.limits = Counter(
            "tensorpulse_limit_exceeded",
            "What a job sent beyond a documented limit and was dropped (records, scalars, jobs), by limit.",
            ["limit"],
            registry=r,
        )
        self.restarts = Counter(
            "tensorpulse_worker_restarts",
            "Times the stream application failed (e.g. a long broker outage) and was restarted.",
            registry=r,
        )
        self.redeliveries = Counter(
            "tensorpulse_alert_redeliveries_suppressed",
            "Alerts not published again because a crashed predecessor already had (see stream/published.py).",
            registry=r,
        )
        self.duplicates = Counter(
            "tensorpulse_duplicate_records",
            "Second copies of a record (an intake handed over mid-batch) dropped before evaluation.",
            registry=r,
        )
        self.state_too_large = Counter(
            "tensorpulse_state_too_large",
            "Rule state entries over the size limit, not stored (the rule started over), by rule.",
            ["rule"],
            registry=r,
        )
        self.states_removed = Counter(
            "tensorpulse_job_states_removed",
            "Ended jobs whose state was removed after state_retention_s.",
            registry=r,
        )
        self.rule_errors = Counter(
            "tensorpulse_rule_errors",
            "Rule states reset, by rule and reason: the rule raised, or its stored state did not "
            "match its declared State.",
            ["rule", "reason"],
            registry=r,
        )
        self.alerts = Counter(
            "tensorpulse_alerts",
            "Alert transitions emitted.",
            [JOB_LABEL, "rule", "severity", "status"],
            registry=r,
        )
        self.actions = Counter(
            "tensorpulse_actions", "Actions published to jobs.", [JOB_LABEL, "action"], registry=r
        )
        self.rule_firing = Gauge(
            "tensorpulse_rule_firing",
            "1 while a rule is firing for a job and rank.",
            [JOB_LABEL, "rule", "rank"],
            registry=r,
        )
        self.latency = Histogram(
            "tensorpulse_publish_to_eval_seconds",
            "Time from the hook creating a record to the worker having evaluated it.",
            [JOB_LABEL],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "tensorpulse_consumer_lag",
            "Records not yet consumed (sum over partitions).",
            [JOB_LABEL],
            registry=r,
        )
        self.jobs = Gauge("tensorpulse_jobs", "Jobs whose records this worker's intake reads.", registry=r)
        self.finished = Counter(
            "tensorpulse_jobs_finished",
            "Jobs that ended: every rank's end record seen, or silent for job_idle_timeout_s.",
            registry=r,
        )
        self.up_since = Gauge(
            "tensorpulse_worker_start_time_seconds", "Unix time the worker started.", registry=r
        )
        self.up_since.set(time.time())
        self._per_job = (self.records, self.alerts, self.actions, self.rule_firing, self.latency, self.lag)
        self._rules: tuple[RuleSpec, ...] = ()
        self._jobs_seen: set[str] = set()
        #: (job, mode) -> that job's records counter and latency histogram, looked up once per
        #: job and mode: `labels()` checks and joins its label values at every call (about a
        #: tenth of the worker's CPU per record went to `observe`).
        self._bound: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        for reason in DECODE_REASONS:  # 0 from the start, so the first rejection is an increase
            self.decode_errors.labels(reason)
            self.deadletters.labels(reason)
        for limit in LIMITS:
            self.limits.labels(limit)

    def init_rules(self, specs: Iterable[RuleSpec]) -> None:
        """The worker's configured rules: their error counters exist at 0 from now on, and each new
        job gets its alert transition counters (per applicable rule and status) at 0."""
        self._rules = tuple(specs)
        for spec in self._rules:
            for reason in RULE_ERROR_REASONS:
                self.rule_errors.labels(spec.name, reason)
            self.state_too_large.labels(spec.name)
        for job in self._jobs_seen:
            self._init_job(job)

    def _init_job(self, job: str) -> None:
        """A job's event counters at 0 (on its first record; remove_job drops them with the rest)."""
        for action in ACTIONS:
            self.actions.labels(job, action)
        for spec in self._rules:
            if spec.applies_to(job):
                for status in STATUSES:
                    self.alerts.labels(job, spec.name, spec.severity, status)

    def observe(self, record: StepRecord, now: float) -> None:
        job = record.job
        bound = self._bound.get((job, record.mode))
        if bound is None:
            if job not in self._jobs_seen:
                self._jobs_seen.add(job)
                self._init_job(job)
            bound = self._bound[(job, record.mode)] = (
                self.records.labels(job, record.mode),
                self.latency.labels(job),
            )
        bound[0].inc()
        bound[1].observe(max(now - record.ts, 0.0))
        self.latest.observe(record)
        self.parameters.observe(record)

    def alert(self, job: str, rule: str, severity: str, status: str, rank: int) -> None:
        self.alerts.labels(job, rule, severity, status).inc()
        self.rule_firing.labels(job, rule, str(rank)).set(1 if status == "firing" else 0)

    def set_lag(self, job: str, lag: int) -> None:
        """A job's consumer lag, for a job that is live here or has records waiting: an ended job's
        lag of 0 (its topic outlives it) would bring back the series that remove_job removed."""
        if lag > 0 or job in self._jobs_seen:
            self.lag.labels(job).set(lag)

    def remove_job(self, job: str) -> None:
        """Drop every series of training job `job` (called when the job is over: every rank's end
        record arrived, or it was silent for the worker's job_idle_timeout_s)."""
        for metric in self._per_job:
            metric.remove_by_labels({JOB_LABEL: job})
        for key in [k for k in self._bound if k[0] == job]:
            del self._bound[key]
        self.latest.forget(job)
        self.parameters.forget(job)
        self._jobs_seen.discard(job)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP (loopback unless told otherwise)."""
        start_http_server(port, addr=addr, registry=self.registry)
