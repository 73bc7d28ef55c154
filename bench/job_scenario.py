"""One scenario of bench/job_start.py: one design, one repetition. Running jobs warm the worker up,
new jobs start on schedule, and each one's first alert, the running jobs' latency and their
standstills are measured (`Scenario`, `find_pauses`).

Apart from job_start.py, which runs the scenarios of every design and repetition, sums them up
and writes the report.
"""

from __future__ import annotations

import argparse
import math
import queue
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from designs import (
    Design,
    DesignError,
    start_workers,
)
from load_report import finite, percentile
from loadgen import Fault, LoadGenerator, SyntheticJob, create_topics, make_jobs
from loadwatch import (
    AlertCollector,
    Sample,
    Sampler,
    WorkerProc,
    check_alive,
    cpu_rss,
    stop_workers,
)

#: The generator runs in slices this long; between slices it starts jobs, schedules faults and
#: checks the workers and the phase's end (the waits of the benchmark, without extra sleeps).
SLICE_S = 0.25
WARM, STEADY, NEW, TAIL = 0, 1, 2, 3
PHASES = {WARM: "warm-up", STEADY: "steady", NEW: "new jobs", TAIL: "tail"}


class ScenarioError(DesignError):
    """A scenario could not be measured (worker crashed, never warmed up, ...): the design's row says why."""


# ---------------------------------------------------------------------- one scenario
def _log_tails(workers: list[WorkerProc]) -> str:
    return "\n".join(f"worker {i} log ({w.log}):\n{w.log_tail(2000)}" for i, w in enumerate(workers))


class JobStarter(threading.Thread):
    """Starts the new jobs on schedule: creates each one's topic, then hands it to the generator.

    A thread of its own so that a slow topic creation (a second or more on some brokers) does not
    stall the running jobs' records, as it would not in a real cluster where each job is its own process.
    """

    def __init__(self, bootstrap: str, jobs: list[SyntheticJob], interval_s: float) -> None:
        super().__init__(name="job-starter", daemon=True)
        self.bootstrap = bootstrap
        self.jobs = jobs
        self.interval_s = interval_s
        self.ready: queue.SimpleQueue[tuple[SyntheticJob, float, float, str | None]] = queue.SimpleQueue()
        self.stop_event = threading.Event()
        self.t0 = 0.0

    def run(self) -> None:
        self.t0 = time.monotonic()
        for i, job in enumerate(self.jobs):
            if self.stop_event.wait(max(0.0, self.t0 + i * self.interval_s - time.monotonic())):
                return
            started = time.monotonic()
            error = None
            try:
                create_topics(self.bootstrap, [job.topic])
            except Exception as exc:  # counted as a miss, with the reason
                error = f"{type(exc).__name__}: {exc}"
            self.ready.put((job, started - self.t0, time.monotonic() - started, error))


@dataclass
class NewJob:
    job: SyntheticJob
    start_s: float  # since the first new job's start
    topic_create_s: float
    error: str | None
    fault: Fault | None = None


class Scenario:
    """One design, one repetition: the load, the workers, the alerts consumer and the bookkeeping."""

    def __init__(self, args: argparse.Namespace, design: Design, rep: int, bootstrap: str) -> None:
        self.args = args
        self.design = design
        self.rep = rep
        self.bootstrap = bootstrap
        self.rid = uuid.uuid4().hex[:6]
        self.prefix = f"load-{self.rid}-"
        seed = args.seed + 1000 * rep
        self.running = make_jobs(f"{self.rid}-run", args.running, args.tensors, seed)
        self.new = make_jobs(f"{self.rid}-new", args.new_jobs, args.tensors, seed + 1)
        self.per_job_rate = args.rate / args.running
        self.rng = random.Random(seed)
        self.phase = WARM
        self.faults_seen = 0
        self.new_jobs: dict[str, NewJob] = {}
        self.sent_in: dict[int, int] = dict.fromkeys(PHASES, 0)
        self.seconds_in: dict[int, float] = dict.fromkeys(PHASES, 0.0)

    # -- the generator, in slices
    def drive(
        self,
        phase: int,
        until: Callable[[], bool],
        max_s: float,
        gen: LoadGenerator,
        workers: list[WorkerProc],
        starter: JobStarter | None = None,
    ) -> bool:
        """Offer load (faults on running jobs except in the tail) until `until()` or `max_s`; True if `until()`."""
        self.phase = phase
        t0 = time.monotonic()
        period = math.inf if self.args.faults_per_s <= 0 or phase == TAIL else 1.0 / self.args.faults_per_s
        next_fault = t0 + period / 2
        while True:
            check_alive(workers)
            if starter is not None:
                self._take_started(starter, gen)
            self._note_faults(gen)
            if until():
                return True
            now = time.monotonic()
            if now - t0 >= max_s:
                return False
            while now >= next_fault:
                self.rng.choice(self.running).pending_fault = True
                next_fault += period
            sent, wall = gen.run(
                self.per_job_rate * len(gen.jobs), min(SLICE_S, max_s - (now - t0)) or SLICE_S, phase
            )
            self.sent_in[phase] += sent
            self.seconds_in[phase] += wall

    def _take_started(self, starter: JobStarter, gen: LoadGenerator) -> None:
        while True:
            try:
                job, start_s, create_s, error = starter.ready.get_nowait()
            except queue.Empty:
                return
            self.new_jobs[job.job] = NewJob(job, start_s, create_s, error)
            if error is None:
                job.pending_fault = True  # its first record (step 0) carries the NaN
                gen.jobs.append(job)

    def _note_faults(self, gen: LoadGenerator) -> None:
        for f in gen.faults[self.faults_seen :]:
            nj = self.new_jobs.get(f.job)
            if nj is not None and nj.fault is None:
                nj.fault = f
        self.faults_seen = len(gen.faults)

    # -- the whole scenario
    def run(self) -> dict[str, Any]:
        a = self.args
        workdir = Path(tempfile.mkdtemp(prefix=f"tp-jobstart-{self.design.name}-"))
        create_topics(self.bootstrap, [j.topic for j in self.running])
        gen = LoadGenerator(
            self.bootstrap, list(self.running), faults_per_s=0.0, fault_jobs=len(self.running), seed=a.seed
        )
        alerts = AlertCollector(self.bootstrap, self.prefix)
        alerts.start()
        workers = start_workers(
            self.design,
            self.bootstrap,
            a.workers,
            group=f"jobstart-{self.rid}",
            jobs_regex=f"^{self.prefix}",
            workdir=workdir,
            guarantee=a.guarantee,
        )
        running_names = {j.job for j in self.running}
        sampler = Sampler(
            workers,
            f"load-{self.rid}-run-",
            lambda: (sum(j.step for j in self.running), gen.delivered, PHASES[self.phase]),
            interval=a.sample_s,
            print_every=a.progress_s,
        )
        starter = JobStarter(self.bootstrap, self.new, 60.0 / a.starts_per_minute)
        t_start = time.monotonic()
        try:

            def warm() -> bool:
                return any(
                    f.level == WARM
                    and f.job in running_names
                    and (arr := alerts.firings.get((f.job, f.step))) is not None
                    and arr.read - f.ts <= a.warm_latency_s
                    for f in gen.faults
                )

            if not self.drive(WARM, warm, a.warmup_timeout_s, gen, workers):
                raise ScenarioError(
                    f"no alert on a running job within {a.warm_latency_s:g}s of its fault after "
                    f"{a.warmup_timeout_s:g}s of warm-up ({len(alerts.firings)} alerts read)\n"
                    + _log_tails(workers)
                )
            warm_s = time.monotonic() - t_start
            print(
                f"  warm after {warm_s:.1f}s; {a.steady_s:g}s steady, then {a.new_jobs} new jobs", flush=True
            )
            sampler.start()
            self.drive(STEADY, lambda: False, a.steady_s, gen, workers)

            cpu0 = sum(cpu_rss(w.proc.pid)[0] for w in workers)
            own0 = time.process_time()
            t_new = time.monotonic()
            starter.start()

            def new_done() -> bool:
                if starter.is_alive() or len(self.new_jobs) < len(self.new):
                    return False
                now = time.time()
                for nj in self.new_jobs.values():
                    if nj.error is not None:
                        continue
                    if nj.fault is None:
                        return False
                    if (nj.job.job, nj.fault.step) not in alerts.firings and now < nj.fault.ts + a.deadline_s:
                        return False
                return True

            bound = (len(self.new) - 1) * 60.0 / a.starts_per_minute + a.deadline_s + 60.0
            self.drive(NEW, new_done, bound, gen, workers, starter)
            new_s = time.monotonic() - t_new
            cpu1 = sum(cpu_rss(w.proc.pid)[0] for w in workers)
            own1 = time.process_time()
            starter.stop_event.set()

            def tail_done() -> bool:
                return all(
                    (f.job, f.step) in alerts.firings
                    for f in gen.faults
                    if f.level == NEW and f.job in running_names
                )

            self.drive(TAIL, tail_done, a.alert_wait_s, gen, workers)
        except ScenarioError:
            raise
        except Exception as exc:
            raise ScenarioError(f"{type(exc).__name__}: {exc}\n{_log_tails(workers)}") from exc
        finally:
            starter.stop_event.set()
            sampler.stop()
            alerts.stop()
            gen.close()
            stop_workers(workers)
            if a.keep_logs:
                print(f"  worker logs and state kept in {workdir}", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        return self._report(gen, alerts, sampler, warm_s, new_s, cpu1 - cpu0, own1 - own0)

    def _report(
        self,
        gen: LoadGenerator,
        alerts: AlertCollector,
        sampler: Sampler,
        warm_s: float,
        new_s: float,
        worker_cpu_s: float,
        own_cpu_s: float,
    ) -> dict[str, Any]:
        a = self.args
        running_names = {j.job for j in self.running}
        new_rows = []
        first: list[float] = []
        for nj in sorted(self.new_jobs.values(), key=lambda x: x.start_s):
            arr = None if nj.fault is None else alerts.firings.get((nj.job.job, nj.fault.step))
            late = math.inf if arr is None else arr.read - nj.fault.ts  # type: ignore[union-attr]
            if arr is not None and late > a.deadline_s:
                late = math.inf  # arrived, but after the deadline: a miss like any other
            first.append(late)
            new_rows.append(
                {
                    "job": nj.job.job,
                    "start_s": round(nj.start_s, 3),
                    "topic_create_s": round(nj.topic_create_s, 3),
                    "fault_step": None if nj.fault is None else nj.fault.step,
                    "first_alert_s": finite(late),
                    "worker_eval_s": None if arr is None else finite(arr.ts - nj.fault.ts),  # type: ignore[union-attr]
                    "arrived_after_deadline_s": finite(arr.read - nj.fault.ts)
                    if arr is not None and math.isinf(late)
                    else None,  # type: ignore[union-attr]
                    "missed": math.isinf(late),
                    "error": nj.error,
                }
            )
        first += [math.inf] * (
            len(self.new) - len(self.new_jobs)
        )  # never started (cannot happen unless stopped)

        def running_latency(level: int) -> list[float]:
            out = []
            for f in gen.faults:
                if f.level == level and f.job in running_names:
                    arr = alerts.firings.get((f.job, f.step))
                    out.append(math.inf if arr is None else arr.read - f.ts)
            return out

        samples = [s for s in sampler.samples if s.phase in (PHASES[STEADY], PHASES[NEW], PHASES[TAIL])]
        stalls = find_pauses(samples, a.pause_s)
        by_phase = {
            PHASES[p]: {
                "records": self.sent_in[p],
                "seconds": round(self.seconds_in[p], 2),
                "records_per_s": round(self.sent_in[p] / self.seconds_in[p], 1)
                if self.seconds_in[p]
                else None,
            }
            for p in PHASES
        }
        return {
            "design": self.design.name,
            "rep": self.rep,
            "status": "ok",
            "run_id": self.rid,
            "warm_after_s": round(warm_s, 2),
            "new_phase_s": round(new_s, 2),
            "first_alert": stats(first),
            "running_new_phase": stats(running_latency(NEW)),
            "running_steady": stats(running_latency(STEADY)),
            "pauses": {
                "measured": sampler.error is None and bool(samples),
                "error": None if sampler.error is None else str(sampler.error),
                "count_new_phase": sum(1 for p in stalls if p["phase"] in (PHASES[NEW], PHASES[TAIL])),
                "count_steady": sum(1 for p in stalls if p["phase"] == PHASES[STEADY]),
                "longest_s": max((p["seconds"] for p in stalls), default=0.0),
                "total_s": round(sum(p["seconds"] for p in stalls), 2),
                "stretches": stalls,
            },
            "offered": by_phase,
            "worker_cpu_pct_new_phase": round(100 * worker_cpu_s / new_s, 1) if new_s else None,
            "bench_cpu_pct_new_phase": round(100 * own_cpu_s / new_s, 1) if new_s else None,
            "records_failed": gen.failed,
            "other_alert_events": dict(sorted(alerts.other.items())),
            "new_jobs": new_rows,
        }


# ---------------------------------------------------------------------- statistics
def stats(values: list[float]) -> dict[str, Any]:
    """p50/p99/max with misses (inf) as the largest values, so a miss shows as null ("miss")."""
    got = [v for v in values if math.isfinite(v)]
    return {
        "n": len(values),
        "received": len(got),
        "missed": len(values) - len(got),
        "p50_s": finite(percentile(values, 50)) if values else None,
        "p99_s": finite(percentile(values, 99)) if values else None,
        "max_s": finite(max(values)) if values else None,
        "values_s": [finite(v, 3) for v in values],
    }


def find_pauses(samples: list[Sample], min_s: float) -> list[dict[str, Any]]:
    """Stretches where the running jobs' processed count stood still while records were waiting.

    Samples only bound a standstill: it lasted at least from the last sample that saw progress to
    the last that saw none ("seconds", the figure counted against `min_s`, so that one empty
    sampling interval is never a pause) and at most until the first that sees progress again
    ("up_to_s").
    """
    out: list[dict[str, Any]] = []
    start: Sample | None = None  # the last sample with progress before the standstill
    still: Sample | None = None  # the latest sample without progress

    def close(resumed: Sample | None) -> None:
        if start is not None and still is not None and still.t - start.t >= min_s:
            upper = (resumed or still).t - start.t
            out.append(
                {
                    "phase": start.phase,
                    "start_t": round(start.t, 2),
                    "seconds": round(still.t - start.t, 2),
                    "up_to_s": round(upper, 2),
                }
            )

    for prev, s in zip(samples, samples[1:], strict=False):
        if s.processed <= prev.processed and s.backlog > 0:
            start = start or prev
            still = s
        else:
            close(s)
            start = still = None
    close(None)
    return out
