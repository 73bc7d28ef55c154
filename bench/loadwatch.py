"""Watching the workers under load: their processes, /metrics, resource use and the alerts they publish.

Processed records and consumer lag come from the worker's own metrics (docs/metrics.md), read with
a `name[]` filter so that a scrape does not serialise every tensor gauge. CPU and RSS come from
psutil when it is installed, else from /proc (Linux).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tensorpulse.sinks.alerts import read_alerts

try:  # optional: /proc is the fallback
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

_SCRAPED = (
    "tensorpulse_records_total",
    "tensorpulse_consumer_lag",
    "tensorpulse_publish_to_eval_seconds_bucket",
)
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------------- process resources
def cpu_rss(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, resident bytes) of a process."""
    if psutil is not None:
        p = psutil.Process(pid)
        t = p.cpu_times()
        return t.user + t.system, p.memory_info().rss
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the command name (which may hold spaces) start at field 3; utime, stime are 14, 15.
        rest = f.read().rsplit(")", 1)[1].split()
    cpu = (int(rest[11]) + int(rest[12])) / _CLK_TCK
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    return cpu, rss


def resource_source() -> str:
    return "psutil" if psutil is not None else "/proc"


# ---------------------------------------------------------------------- worker processes
@dataclass
class WorkerProc:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics?" + "&".join(f"name[]={n}" for n in _SCRAPED)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def stop_workers(workers: list[WorkerProc], timeout: float = 20.0) -> None:
    for w in workers:
        if w.proc.poll() is None:
            os.killpg(w.proc.pid, signal.SIGTERM)
    for w in workers:
        try:
            w.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait()


def check_alive(workers: list[WorkerProc]) -> None:
    for i, w in enumerate(workers):
        if w.proc.poll() is not None:
            raise RuntimeError(
                f"worker {i} exited with code {w.proc.returncode}; last lines of {w.log}:\n{w.log_tail()}"
            )


# ---------------------------------------------------------------------- metrics
@dataclass
class WorkerReading:
    """What one scrape of one worker says about the benchmark's jobs."""

    processed: float = 0.0
    lag: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


def scrape(worker: WorkerProc, job_prefix: str, timeout: float = 5.0) -> WorkerReading:
    with urllib.request.urlopen(worker.url, timeout=timeout) as r:
        text = r.read().decode()
    out = WorkerReading()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # The training job's label: `training_job` (workers since the label was renamed away from
            # Prometheus's own `job`), `job` before (the baseline design of bench/designs.py).
            job = s.labels.get("training_job") or s.labels.get("job", "")
            if not job.startswith(job_prefix):
                continue
            if s.name == "tensorpulse_records_total":
                out.processed += s.value
            elif s.name == "tensorpulse_consumer_lag":
                out.lag += s.value
            elif s.name == "tensorpulse_publish_to_eval_seconds_bucket":
                le = float(s.labels["le"])
                out.buckets[le] = out.buckets.get(le, 0.0) + s.value
    return out


def read_all(workers: list[WorkerProc], job_prefix: str) -> WorkerReading:
    """Processed and histogram buckets summed over workers; lag: the largest worker's view.

    Every worker of the group reports the lag of every followed job, so summing would count it twice.
    """
    total = WorkerReading()
    for w in workers:
        r = scrape(w, job_prefix)
        total.processed += r.processed
        total.lag = max(total.lag, r.lag)
        for le, c in r.buckets.items():
            total.buckets[le] = total.buckets.get(le, 0.0) + c
    return total


def wait_until(cond: Callable[[], bool], timeout: float, what: str, workers: list[WorkerProc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive(workers)
        try:
            if cond():
                return
        except OSError:
            pass  # /metrics not up yet
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile q (0-1); None without observations."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    total = items[-1][1]
    for le, count in items:
        if count >= q * total:
            return le
    return items[-1][0]


def bucket_delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: c - before.get(le, 0.0) for le, c in after.items()}


# ---------------------------------------------------------------------- samples over time
@dataclass
class Sample:
    t: float  # seconds since the sampler started
    sent: int
    delivered: int
    processed: float
    lag: float
    worker_cpu_s: float
    worker_rss: int
    gen_cpu_s: float
    gen_rss: int
    phase: str  # "L<i>" while level i offers load, "D<i>" while it drains, "" otherwise

    @property
    def backlog(self) -> float:
        """Records offered (handed to the producer) but not yet evaluated by any worker."""
        return max(self.sent - self.processed, 0.0)


class Sampler(threading.Thread):
    """Samples counters, metrics and resources every `interval` s; prints a progress line every `every` s."""

    def __init__(
        self,
        workers: list[WorkerProc],
        job_prefix: str,
        counters: Callable[[], tuple[int, int, str]],
        *,
        interval: float,
        print_every: float,
    ) -> None:
        super().__init__(name="load-sampler", daemon=True)
        self.workers = workers
        self.job_prefix = job_prefix
        self.counters = counters  # () -> (sent, delivered, phase)
        self.interval = interval
        self.print_every = print_every
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self.t0 = time.monotonic()
        self._stop_event = threading.Event()

    def take(self) -> Sample:
        sent, delivered, phase = self.counters()
        reading = read_all(self.workers, self.job_prefix)
        cpu, rss = 0.0, 0
        for w in self.workers:
            c, r = cpu_rss(w.proc.pid)
            cpu += c
            rss += r
        gcpu, grss = cpu_rss(os.getpid())
        return Sample(
            time.monotonic() - self.t0,
            sent,
            delivered,
            reading.processed,
            reading.lag,
            cpu,
            rss,
            gcpu,
            grss,
            phase,
        )

    def run(self) -> None:
        last_print = -1e9
        prev: Sample | None = None
        while not self._stop_event.is_set():
            try:
                check_alive(self.workers)
                s = self.take()
            except BaseException as exc:  # reported by the main thread
                self.error = exc
                return
            self.samples.append(s)
            if prev is not None and s.t - last_print >= self.print_every:
                last_print = s.t
                dt = max(s.t - prev.t, 1e-9)
                print(
                    f"  t={s.t:6.1f}s offered {(s.sent - prev.sent) / dt:7.0f}/s "
                    f"processed {(s.processed - prev.processed) / dt:7.0f}/s backlog {s.backlog:7.0f} "
                    f"lag(metric) {s.lag:7.0f} worker cpu {100 * (s.worker_cpu_s - prev.worker_cpu_s) / dt:4.0f}% "
                    f"rss {s.worker_rss / 2**20:6.1f} MB",
                    flush=True,
                )
            prev = s
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        if self.ident is not None:  # started
            self.join(10)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"sampling the workers failed: {self.error}") from self.error


# ---------------------------------------------------------------------- alerts
@dataclass(frozen=True, slots=True)
class Arrival:
    read: float  # when this process read the alert event
    ts: float  # the event's ts (the worker creating it)
    publish_ts: float | None  # the faulty record's ts, as the worker saw it


class AlertCollector(threading.Thread):
    """Follows the alerts topic; keeps ExplodingTensor firings of the run's jobs and counts the rest."""

    def __init__(self, bootstrap: str, job_prefix: str) -> None:
        super().__init__(name="load-alerts", daemon=True)
        self.bootstrap = bootstrap
        self.job_prefix = job_prefix
        self.firings: dict[tuple[str, int], Arrival] = {}
        self.other: dict[str, int] = {}  # "rule/status" -> count, every other event of the run's jobs
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            for ev in read_alerts(self.bootstrap, follow=True, stop=self._stop_event):
                now = time.time()
                if not ev.job.startswith(self.job_prefix):
                    continue
                if ev.rule == "ExplodingTensor" and ev.status == "firing":
                    self.firings.setdefault((ev.job, ev.step), Arrival(now, ev.ts, ev.publish_ts))
                else:
                    key = f"{ev.rule}/{ev.status}"
                    self.other[key] = self.other.get(key, 0) + 1
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        if self.ident is not None:
            self.join(10)
