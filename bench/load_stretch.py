"""One bench of bench/load.py and one stretch of load on it: job topics, a design's workers, the
alert reader and the sampler (`bench`), then a rate offered, drained and measured (`offer`).

Apart from load.py, which decides which stretches to run (the knee's levels, the soak) and
judges them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import Broker
from designs import Design
from designs import start_workers as start_design_workers
from load_report import MB, finite, percentile
from loadgen import LoadGenerator, create_topics, make_jobs
from loadwatch import (
    AlertCollector,
    Sample,
    Sampler,
    WorkerProc,
    bucket_delta,
    bucket_quantile,
    check_alive,
    cpu_rss,
    read_all,
    stop_workers,
    wait_until,
)

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------------- the running setup
@dataclass
class Bench:
    bootstrap: str
    run_id: str
    job_prefix: str
    gen: LoadGenerator
    workers: list[WorkerProc]
    alerts: AlertCollector
    sampler: Sampler
    workdir: Path
    phase: str = ""
    design: str = "current"
    broker_pids: tuple[int, ...] = ()
    #: The other designs' workers (idle while this bench offers load): their CPU is reported.
    others: list[WorkerProc] = field(default_factory=list)
    stretches: int = 0  # stretches of load offered so far (each one's tag)


@contextlib.contextmanager
def bench(
    args: argparse.Namespace,
    sample_s: float,
    print_s: float,
    *,
    broker: Broker,
    design: Design,
    run_id: str | None = None,
) -> Iterator[Bench]:
    """Job topics, `design`'s worker processes (joined and evaluating), alert reader and sampler.

    Every bench has its own jobs (`load-<run id>-<n>`), consumer group and work dir, so that the
    benches of two designs can share one broker.
    """
    run_id = run_id or uuid.uuid4().hex[:8]
    prefix = f"load-{run_id}-"
    bs = broker.bootstrap
    workdir = Path(tempfile.mkdtemp(prefix=f"tp-load-{design.name}-"))
    jobs = make_jobs(run_id, args.jobs, args.tensors, args.seed)
    print(
        f"{design.name}: run {run_id}: {args.jobs} jobs x {args.tensors} tensors, broker {bs}, work dir {workdir}",
        flush=True,
    )
    create_topics(bs, [j.topic for j in jobs])
    gen = LoadGenerator(bs, jobs, faults_per_s=args.faults_per_s, fault_jobs=args.fault_jobs, seed=args.seed)
    workers = start_design_workers(
        design,
        bs,
        args.workers,
        group=f"load-{run_id}",
        jobs_regex=f"^{prefix}",
        workdir=workdir,
        guarantee=args.guarantee,
        rules=args.rules,
    )
    alerts = AlertCollector(bs, prefix)
    b = Bench(bs, run_id, prefix, gen, workers, alerts, None, workdir)  # type: ignore[arg-type]
    b.design, b.broker_pids = design.name, broker.pids
    b.sampler = Sampler(
        workers,
        prefix,
        lambda: (gen.sent, gen.delivered, b.phase),
        interval=sample_s,
        print_every=print_s,
    )
    try:
        alerts.start()
        t0 = time.monotonic()
        wait_until(lambda: read_all(workers, prefix) is not None, 60, "the workers' /metrics", workers)
        gen.announce_all()
        wait_until(
            lambda: read_all(workers, prefix).processed >= len(jobs),
            120,
            f"the workers to evaluate the first record of all {len(jobs)} jobs",
            workers,
        )
        print(f"{design.name}: workers ready after {time.monotonic() - t0:.1f}s", flush=True)
        b.sampler.start()
        yield b
    finally:
        b.sampler.stop()
        alerts.stop()
        gen.close()
        stop_workers(workers)
        if args.keep_logs:
            print(f"{design.name}: worker logs kept in {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; from /proc/stat), or nan."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _CLK_TCK  # user nice system irq softirq steal


def _cpu_s(procs: list[WorkerProc] | tuple[int, ...]) -> float:
    total = 0.0
    for p in procs:
        pid = p.proc.pid if isinstance(p, WorkerProc) else p
        with contextlib.suppress(Exception):  # a process that is gone (an idle design stopped)
            total += cpu_rss(pid)[0]
    return total


# ---------------------------------------------------------------------- one stretch of load
def offer(
    b: Bench, index: int, rate: float, seconds: float, drain_s: float, alert_wait_s: float
) -> dict[str, Any]:
    """Offer `rate` records/s for `seconds`, drain, and measure; returns the stretch's report.

    `index` is the level's number; every stretch (a level run again too) gets its own tag, which
    its faults and samples carry.
    """
    gen, workers = b.gen, b.workers
    tag = b.stretches
    b.stretches += 1
    check_alive(workers)
    b.sampler.raise_if_failed()
    before = read_all(workers, b.job_prefix)
    stats0 = gen.tensor_stats
    load0, started = os.getloadavg()[0], time.time()
    busy0, ocpu0, bcpu0 = _machine_busy_s(), _cpu_s(b.others), _cpu_s(b.broker_pids)
    wcpu0 = sum(cpu_rss(w.proc.pid)[0] for w in workers)
    gcpu0 = time.process_time()
    b.phase = f"L{tag}"
    sent, wall = gen.run(rate, seconds, tag)
    after = read_all(workers, b.job_prefix)
    wcpu1 = sum(cpu_rss(w.proc.pid)[0] for w in workers)
    gcpu1 = time.process_time()
    busy1, ocpu1, bcpu1 = _machine_busy_s(), _cpu_s(b.others), _cpu_s(b.broker_pids)
    backlog_end = gen.sent - after.processed

    # Drain: everything offered evaluated, then the level's alerts read (or the waits run out).
    b.phase = f"D{tag}"
    t_drain = time.monotonic()
    gen.flush()
    drained = False
    deadline = t_drain + drain_s
    while time.monotonic() < deadline:
        check_alive(workers)
        if read_all(workers, b.job_prefix).processed >= gen.sent:
            drained = True
            break
        time.sleep(0.1)
    drain_took = time.monotonic() - t_drain
    faults = [f for f in gen.faults if f.level == tag]
    deadline = time.monotonic() + alert_wait_s
    while time.monotonic() < deadline and any((f.job, f.step) not in b.alerts.firings for f in faults):
        time.sleep(0.1)
    b.phase = ""

    e2e, evald = [], []
    for f in faults:
        a = b.alerts.firings.get((f.job, f.step))
        e2e.append(math.inf if a is None else a.read - f.ts)
        evald.append(math.inf if a is None else a.ts - f.ts)
    received = sum(1 for x in e2e if math.isfinite(x))
    samples = [s for s in b.sampler.samples if s.phase in (f"L{tag}", f"D{tag}")]
    load_samples = [s for s in samples if s.phase == f"L{tag}"]
    hist = bucket_delta(after.buckets, before.buckets)
    processed = after.processed - before.processed
    wcpu, gcpu, bcpu = wcpu1 - wcpu0, gcpu1 - gcpu0, bcpu1 - bcpu0
    busy = busy1 - busy0
    return {
        "design": b.design,
        "level_index": index,
        "started_unix": round(started, 2),
        "target_rps": rate,
        "seconds": round(wall, 3),
        "offered_records": sent,
        "offered_rps": round(sent / wall, 2),
        "offered_tensor_stats_ps": round((gen.tensor_stats - stats0) / wall, 1),
        "processed_records": int(processed),
        "processed_rps": round(processed / wall, 2),
        "processed_ratio": round(processed / sent, 4) if sent else None,
        "backlog_end": int(max(backlog_end, 0)),
        "backlog_max": int(max([backlog_end, *(s.backlog for s in load_samples)])),
        "lag_metric_max": max((s.lag for s in samples), default=None),
        "lag_metric_end": load_samples[-1].lag if load_samples else None,
        "drained": drained,
        "drain_s": round(drain_took, 2),
        "alerts_expected": len(faults),
        "alerts_received": received,
        "alert_latency_p50_s": finite(percentile(e2e, 50)) if faults else None,
        "alert_latency_p99_s": finite(percentile(e2e, 99)) if faults else None,
        "alert_latency_max_s": finite(max(e2e)) if faults else None,
        "eval_latency_p50_s": finite(percentile(evald, 50)) if faults else None,
        "eval_latency_p99_s": finite(percentile(evald, 99)) if faults else None,
        "publish_to_eval_p50_le_s": bucket_quantile(hist, 0.50),
        "publish_to_eval_p99_le_s": bucket_quantile(hist, 0.99),
        "worker_cpu_pct": round(100 * wcpu / wall, 1),
        # Worker CPU per record evaluated in the level: 1e6 / this is what one fully busy core
        # would evaluate per second, whatever the level's rate.
        "worker_cpu_us_per_record": round(1e6 * wcpu / processed, 1) if processed > 0 else None,
        "worker_rss_mb_max": round(max((s.worker_rss for s in samples), default=0) / MB, 1),
        "worker_rss_mb_end": round(load_samples[-1].worker_rss / MB, 1) if load_samples else None,
        "generator_cpu_pct": round(100 * gcpu / wall, 1),
        "generator_rss_mb": round(cpu_rss(os.getpid())[1] / MB, 1),
        # The broker's processes (when this run started them), the other designs' (idle) workers,
        # and the whole machine (100 = one core; everything else on it = machine - the rest).
        "broker_cpu_pct": round(100 * bcpu / wall, 1) if b.broker_pids else None,
        "idle_designs_cpu_pct": round(100 * (ocpu1 - ocpu0) / wall, 1) if b.others else None,
        "machine_cpu_pct": finite(100 * busy / wall, 1),
        "rest_cpu_pct": finite(100 * (busy - wcpu - gcpu - bcpu - (ocpu1 - ocpu0)) / wall, 1),
        "loadavg_1m_start": round(load0, 2),
        "timeline": [_point(s) for s in samples],
    }


def _point(s: Sample) -> dict[str, Any]:
    return {
        "t": round(s.t, 2),
        "phase": s.phase,
        "offered": s.sent,
        "processed": int(s.processed),
        "backlog": int(s.backlog),
        "lag_metric": s.lag,
        "worker_rss_mb": round(s.worker_rss / MB, 1),
        "generator_rss_mb": round(s.gen_rss / MB, 1),
    }
