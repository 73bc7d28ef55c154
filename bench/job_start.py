#!/usr/bin/env python
"""New-job start benchmark: how long a job the worker has never seen waits for its first alert
while other jobs run, and what its arrival costs the jobs already running; worker designs side by
side in one run.

Why it exists: the worker used to rebuild its Quix application for every new job topic, and the
consumer group's rebalance paused every running job; a new job waited 8-10 s for its first alert
beside 20 running jobs. This measures that wait, and the running jobs' alert latency meanwhile,
for the old worker (a git revision) and the working tree, under the same load in the same run.

One scenario = one design, one repetition; each gets fresh job names, a fresh consumer group and
its state directory in a temp dir:
  1. warm-up   --running synthetic jobs (bench/loadgen.py) publish --rate records/s in total,
               --tensors statistics per record, with a NaN fault about --faults-per-s times a
               second on one of them; the worker(s) start. Ends when the worker alerts on a
               running job's fault within --warm-latency-s of its record (the worker is warm).
  2. steady    --steady-s more of the same: the running jobs' latency with no job arriving.
  3. new jobs  --new-jobs jobs start at --starts-per-minute: each creates its topic, then
               publishes at the running jobs' per-job rate, its first record carrying a NaN
               tensor so ExplodingTensor fires at once. Lasts until every new job has alerted
               or --deadline-s has passed since its faulty record.
  4. tail      no more faults, load goes on up to --alert-wait-s until the running jobs' faults
               of phase 3 have all alerted.

Figures (per scenario, and pooled per design over the repetitions):
  first alert  when this process's alerts consumer read the new job's firing ExplodingTensor
               alert - the faulty record's ts (set when the record is handed to the producer)
  running      step->alert latency of the running jobs' faults published during phase 3
               (and, for reference, phase 2)
  missed       new jobs without an alert within --deadline-s; running faults without one by the
               end of phase 4. A miss counts as infinitely late in the percentiles ("miss").
  pauses       stretches of at least --pause-s in which the running jobs' processed-records
               counter (the workers' /metrics, sampled every --sample-s) stood still while their
               records were waiting: what a rebalance looks like from outside (a stretch's
               length is a lower bound, within one sampling interval)
  ratio        current / baseline of each percentile (below 1: the current design is faster)

Designs (bench/designs.py, shared with `load.py knee --designs`):
  baseline  the worker of git revision --baseline-rev (default 9382ccd, the last commit before
            the worker rewrite), extracted with `git archive` and run with PYTHONPATH pointing
            there. The bench prints the files such a process imports, and stops if they are not
            the revision's.
  current   the working tree, as installed (the editable install), started as the project
            starts workers (stream/process.py's worker_command).
The bench's own side (generator, alerts consumer) always runs the working tree's code.

Examples (from the repository root or bench/, venv active):
  python bench/job_start.py                          # both designs, 2 repetitions, embedded Tansu
  python bench/job_start.py --designs baseline current --running 20 --new-jobs 10 --reps 1
  python bench/job_start.py --designs current --running 2 --new-jobs 2 --rate 20 --tensors 5 \\
      --steady-s 1 --reps 1                           # a smoke run, about a minute
  python bench/job_start.py --running 50             # the 50-job case
  python bench/job_start.py --broker kafka           # Apache Kafka from deploy/kafka/kafka_local.py
  KAFKA_BOOTSTRAP=host:9092 python bench/job_start.py

The JSON report (every new job, every scenario, the summary and ratios) goes to
bench/results/job-start-<UTC time>.json unless --out names a file; a table goes to stdout.
Exit status 0 when every scenario ran (misses are figures, not failures), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import open_broker
from designs import (
    DEFAULT_BASELINE_REV,
    DESIGNS,
    Design,
    DesignError,
    prepare,
    print_imports,
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
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


def summarise(scenarios: list[dict[str, Any]], design: str) -> dict[str, Any]:
    """One design's figures, pooled over its repetitions that ran."""
    ran = [s for s in scenarios if s["design"] == design and s["status"] == "ok"]
    failed = [s for s in scenarios if s["design"] == design and s["status"] != "ok"]

    def pooled(key: str) -> dict[str, Any]:
        values = [math.inf if v is None else v for s in ran for v in s[key]["values_s"]]
        out = stats(values)
        del out["values_s"]
        return out

    measured = [s for s in ran if s["pauses"]["measured"]]
    return {
        "runs_ok": len(ran),
        "runs_failed": len(failed),
        "failures": [s["error"][:500] for s in failed],
        "first_alert": pooled("first_alert") if ran else None,
        "running_new_phase": pooled("running_new_phase") if ran else None,
        "running_steady": pooled("running_steady") if ran else None,
        "pauses_new_phase": sum(s["pauses"]["count_new_phase"] for s in measured) if measured else None,
        "pauses_longest_s": max((s["pauses"]["longest_s"] for s in measured), default=None),
    }


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """current / baseline for each percentile both designs measured (null where either missed)."""
    b, c = summary.get("baseline"), summary.get("current")
    if not b or not c or not b["runs_ok"] or not c["runs_ok"]:
        return None
    out = {}
    for key in ("first_alert", "running_new_phase", "running_steady"):
        for q in ("p50_s", "p99_s", "max_s"):
            x, y = b[key][q], c[key][q]
            out[f"{key}_{q[:-2]}"] = round(y / x, 3) if x and y is not None else None
    return out


# ---------------------------------------------------------------------- output
def _s(x: float | None) -> str:
    return "miss" if x is None else f"{x:.2f}"


def _trio(d: dict[str, Any] | None) -> str:
    return "-" if not d else f"{_s(d['p50_s'])} / {_s(d['p99_s'])} / {_s(d['max_s'])}"


def print_table(summary: dict[str, dict[str, Any]], ratio: dict[str, Any] | None) -> None:
    head = (
        f"{'design':<10} {'runs':>5}  {'first alert p50/p99/max s':>27} {'missed':>7}  "
        f"{'running p50/p99/max s':>24} {'missed':>7}  {'steady p50/p99/max s':>22}  {'pauses (longest s)':>18}"
    )
    print("\n" + head)
    for name, d in summary.items():
        runs = f"{d['runs_ok']}/{d['runs_ok'] + d['runs_failed']}"
        if not d["runs_ok"]:
            print(f"{name:<10} {runs:>5}  FAILED: {(d['failures'] or ['?'])[0].splitlines()[0][:150]}")
            continue
        fa, rn = d["first_alert"], d["running_new_phase"]
        pauses = (
            "-" if d["pauses_new_phase"] is None else f"{d['pauses_new_phase']} ({d['pauses_longest_s']:.1f})"
        )
        print(
            f"{name:<10} {runs:>5}  {_trio(fa):>27} {fa['missed']:>3}/{fa['n']:<3}  {_trio(rn):>24} "
            f"{rn['missed']:>3}/{rn['n']:<3}  {_trio(d['running_steady']):>22}  {pauses:>18}"
        )
    if ratio:

        def r(k: str) -> str:
            return "-" if ratio[k] is None else f"{ratio[k]:.3f}"

        print(
            f"{'cur/base':<10} {'':>5}  {r('first_alert_p50') + ' / ' + r('first_alert_p99') + ' / ' + r('first_alert_max'):>27} "
            f"{'':>7}  {r('running_new_phase_p50') + ' / ' + r('running_new_phase_p99') + ' / ' + r('running_new_phase_max'):>24}"
        )


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what is compared")
    g.add_argument(
        "--designs",
        nargs="+",
        choices=DESIGNS,
        default=list(DESIGNS),
        help="designs to run, in this order in the first repetition (default: baseline current)",
    )
    g.add_argument(
        "--baseline-rev",
        default=DEFAULT_BASELINE_REV,
        help=f"git revision whose worker is the baseline (default {DEFAULT_BASELINE_REV}, before the rewrite)",
    )
    g.add_argument(
        "--reps",
        type=int,
        default=2,
        help="repetitions; the designs' order rotates each repetition (default 2)",
    )
    g = ap.add_argument_group("load")
    g.add_argument(
        "--running", type=int, default=20, help="jobs already running when the new ones start (default 20)"
    )
    g.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="records/s in total over the running jobs; every job, new ones too, gets rate/running (default 100)",
    )
    g.add_argument("--tensors", type=int, default=20, help="tensor statistics per record (default 20)")
    g.add_argument(
        "--faults-per-s",
        type=float,
        default=2.0,
        help="NaN faults per second on the running jobs, in total (default 2)",
    )
    g.add_argument("--new-jobs", type=int, default=10, help="jobs started while the others run (default 10)")
    g.add_argument(
        "--starts-per-minute",
        type=float,
        default=30.0,
        help="how fast the new jobs start (default 30: one every 2 s)",
    )
    g.add_argument(
        "--workers", type=int, default=1, help="worker processes in one consumer group (default 1)"
    )
    g.add_argument(
        "--guarantee",
        default="exactly-once",
        choices=["exactly-once", "at-least-once"],
        help="the workers' processing guarantee (default exactly-once, the worker's own default)",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds the jobs' statistics and the fault schedule")
    g = ap.add_argument_group("timing and limits")
    g.add_argument(
        "--deadline-s",
        type=float,
        default=30.0,
        help="a new job without an alert this long after its faulty record is a miss (default 30)",
    )
    g.add_argument(
        "--warmup-timeout-s",
        type=float,
        default=180.0,
        help="longest wait for the worker to alert on a running job (default 180)",
    )
    g.add_argument(
        "--warm-latency-s",
        type=float,
        default=2.0,
        help="the worker is warm once a running job's fault alerts within this (default 2)",
    )
    g.add_argument(
        "--steady-s",
        type=float,
        default=5.0,
        help="running jobs alone after warm-up, as a reference (default 5)",
    )
    g.add_argument(
        "--alert-wait-s",
        type=float,
        default=15.0,
        help="longest wait, after the new jobs, for the running jobs' outstanding alerts (default 15)",
    )
    g.add_argument(
        "--pause-s",
        type=float,
        default=1.0,
        help="a standstill of the running jobs this long counts as a pause (default 1)",
    )
    g.add_argument(
        "--sample-s",
        type=float,
        default=0.5,
        help="how often the workers' /metrics are read for pauses (default 0.5)",
    )
    g.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines (default 5)")
    g = ap.add_argument_group("broker and output")
    g.add_argument("--bootstrap", help="an existing cluster (default: $KAFKA_BOOTSTRAP, else --broker)")
    g.add_argument(
        "--broker",
        choices=["tansu", "kafka"],
        default="tansu",
        help="broker started for the run: the embedded Tansu (default) or a one-node Apache Kafka from deploy/kafka/kafka_local.py",
    )
    g.add_argument("--out", help="JSON report path (default bench/results/job-start-<UTC time>.json)")
    g.add_argument("--keep-logs", action="store_true", help="keep the workers' logs and state directories")
    args = ap.parse_args(argv)
    if min(args.running, args.new_jobs, args.tensors, args.workers, args.reps) < 1:
        ap.error("--running, --new-jobs, --tensors, --workers and --reps must be >= 1")
    if args.rate <= 0 or args.starts_per_minute <= 0 or args.deadline_s <= 0 or args.sample_s <= 0:
        ap.error("--rate, --starts-per-minute, --deadline-s and --sample-s must be > 0")
    args.designs = list(dict.fromkeys(args.designs))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    host = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }
    tmp = Path(tempfile.mkdtemp(prefix="tp-jobstart-"))
    designs: dict[str, Design] = {}
    scenarios: list[dict[str, Any]] = []
    broker_used: dict[str, str] = {}
    try:
        for name in args.designs:
            try:
                d = prepare(name, tmp, args.baseline_rev)
            except DesignError as exc:
                print(f"{name}: cannot run: {exc}", flush=True)
                scenarios += [
                    {"design": name, "rep": r, "status": "failed", "error": str(exc)}
                    for r in range(args.reps)
                ]
                continue
            designs[name] = d
            print_imports(d)
        with open_broker(args.bootstrap, args.broker) as b:
            bs, what = b.bootstrap, b.what
            print(f"broker: {bs} ({what})", flush=True)
            broker_used = {"bootstrap": bs, "kind": what}
            for rep in range(args.reps):
                order = args.designs[rep % len(args.designs) :] + args.designs[: rep % len(args.designs)]
                for name in order:
                    if name not in designs:
                        continue
                    print(
                        f"rep {rep + 1}/{args.reps}, {name}: {args.running} running jobs, {args.new_jobs} new",
                        flush=True,
                    )
                    sc = Scenario(args, designs[name], rep, bs)
                    try:
                        result = sc.run()
                    except ScenarioError as exc:
                        print(f"  {name} FAILED: {exc}", flush=True)
                        scenarios.append(
                            {
                                "design": name,
                                "rep": rep,
                                "status": "failed",
                                "run_id": sc.rid,
                                "error": str(exc),
                            }
                        )
                        continue
                    scenarios.append(result)
                    fa, rn, p = result["first_alert"], result["running_new_phase"], result["pauses"]
                    print(
                        f"  first alert p50/p99/max {_trio(fa)} s, missed {fa['missed']}/{fa['n']}; running "
                        f"{_trio(rn)} s, missed {rn['missed']}/{rn['n']}; pauses {p['count_new_phase']} "
                        f"(longest {p['longest_s']:.1f} s); worker CPU {result['worker_cpu_pct_new_phase']}%, "
                        f"bench CPU {result['bench_cpu_pct_new_phase']}%",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {name: summarise(scenarios, name) for name in args.designs}
    ratio = ratios(summary)
    print_table(summary, ratio)
    out = {
        "config": vars(args),
        "broker": broker_used,
        "designs": {n: d.describe() for n, d in designs.items()},
        "summary": summary,
        "ratio_current_over_baseline": ratio,
        "scenarios": scenarios,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "host": {**host, "loadavg_end": list(os.getloadavg())},
    }
    path = (
        Path(args.out)
        if args.out
        else RESULTS / f"job-start-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    print(f"report: {path}")
    return 0 if all(s["status"] == "ok" for s in scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
