#!/usr/bin/env python
"""Load benchmark: simulated jobs -> broker -> real `tensorpulse stream` worker(s), default rule set.

N jobs each send one record per step with M tensor statistics (encoded with tensorpulse.wire, no
torch); the total offered rate is split evenly over the jobs. Faults (a NaN tensor on a known step
of some jobs, about --faults-per-s a second) make ExplodingTensor fire, and an alerts consumer
times them: step->alert latency = when this process read the firing event - the faulty record's ts.
Processed records and consumer lag come from the workers' /metrics; CPU and RSS from psutil or /proc.

  knee  steps up the offered rate (--rates, --level-seconds each) and finds the highest level the
        workers keep up with: processed >= 95% of offered, backlog at the level's end under
        --max-lag-s seconds' worth of records, alert p99 <= --p99-limit-s, drained in time.

        With --designs baseline current, each design gets its own jobs, consumer group and
        worker(s) on the same broker, and the levels interleave: at every rate each design in
        turn offers its level (the first design rotating from level to level) while the other
        design's worker idles (its CPU is reported). A design stops (its workers too) after its
        first level that does not keep up; the other goes on. baseline = the worker of
        --baseline-rev (default 9382ccd, before the worker rewrite), current = the working tree
        (bench/designs.py).
  soak  offers a fixed --rate for --minutes and samples worker RSS; reports first/last/max RSS and
        the slope (MB/min) after warm-up.

    python bench/load.py knee --jobs 10 --tensors 50 --rates 50,100,200,400,800,1600
    python bench/load.py knee --designs baseline current --broker kafka --rates 200,400,800,1600,3200
    python bench/load.py soak --minutes 10 --rate 400

Results (JSON) go to bench/results/ unless --out names a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import Broker, open_broker
from designs import DEFAULT_BASELINE_REV, DESIGNS, Design, prepare, print_imports
from designs import start_workers as start_design_workers
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
    resource_source,
    stop_workers,
    wait_until,
)

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---------------------------------------------------------------------- small statistics
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100); inf entries (missing alerts) count as the largest."""
    s = sorted(values)
    if not s:
        return math.nan
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var


def finite(x: float | None, digits: int = 4) -> float | None:
    """JSON has no inf/NaN: those become null."""
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


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


def judge(level: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Why a level does not count as kept up (empty: it does)."""
    why = []
    if level["offered_rps"] < 0.9 * level["target_rps"]:
        why.append(f"generator offered only {level['offered_rps']:.0f}/s of {level['target_rps']:g}/s")
    ratio = level["processed_ratio"] or 0.0
    if ratio < args.keep_up:
        why.append(f"processed {100 * ratio:.1f}% < {100 * args.keep_up:.0f}% of offered")
    bound = args.max_lag_s * level["offered_rps"]
    if level["backlog_end"] > bound:
        why.append(f"backlog {level['backlog_end']} > {bound:.0f} ({args.max_lag_s:g}s of records)")
    if not level["drained"]:
        why.append(f"not drained within {args.drain_s:g}s")
    p99 = level["alert_latency_p99_s"]
    if level["alerts_expected"] and (p99 is None or p99 > args.p99_limit_s):
        shown = "alerts missing" if p99 is None else f"{p99:.2f}s"
        why.append(f"alert p99 {shown} > {args.p99_limit_s:g}s")
    return why


# ---------------------------------------------------------------------- modes
def _knee_of(levels: list[dict[str, Any]], stopped: str, totals: dict[str, Any]) -> dict[str, Any]:
    """One design's knee: the highest level kept up before the first that did not."""
    knee = None
    for level in levels:
        if not level["ok"]:
            break
        knee = level
    knee_rps = knee["target_rps"] if knee else None
    if knee is not None and knee is levels[-1]:
        note = "every level kept up: the knee is above the highest rate tried"
    elif knee is None:
        note = "no level kept up: try lower rates"
    else:
        note = f"highest level kept up before the first that did not: {knee_rps:g} records/s"
    costs = [x["worker_cpu_us_per_record"] for x in levels if x.get("worker_cpu_us_per_record")]
    return {
        "mode": "knee",
        "levels": levels,
        "knee_target_rps": knee_rps,
        "knee_offered_rps": knee["offered_rps"] if knee else None,
        "knee_tensor_stats_ps": knee["offered_tensor_stats_ps"] if knee else None,
        "peak_processed_rps": max((x["processed_rps"] for x in levels), default=None),
        # The least worker CPU per record over the levels (the busiest levels amortise the most).
        "worker_cpu_us_per_record_min": min(costs, default=None),
        "note": note,
        "stopped": stopped,
        "totals": totals,
    }


def run_knee(args: argparse.Namespace, designs: dict[str, Design], broker: Broker) -> dict[str, Any]:
    """The knee of each design; with several, their levels interleave on one broker (see the module doc)."""
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"--rates must be positive numbers separated by commas, got {args.rates!r}")
    names = list(designs)
    run_id = uuid.uuid4().hex[:8]
    levels: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    stopped = dict.fromkeys(names, "all levels run")
    totals: dict[str, dict[str, Any]] = {}
    stacks = {n: contextlib.ExitStack() for n in names}
    benches: dict[str, Bench] = {}

    def close(n: str) -> None:
        if n in benches and n not in totals:
            totals[n] = _totals(benches[n])
        stacks[n].close()  # its workers stop: a backlog of its own must not load the others' levels
        for m in benches:
            benches[m].others = [w for w in benches[m].others if w.proc.poll() is None]

    try:
        for n in names:
            rid = run_id if len(names) == 1 else f"{run_id}-{n[0]}"
            benches[n] = stacks[n].enter_context(
                bench(args, args.sample_s, args.sample_s, broker=broker, design=designs[n], run_id=rid)
            )
        for n in names:
            benches[n].others = [w for m in names if m != n for w in benches[m].workers]
        active = list(names)
        try:
            for i, rate in enumerate(rates):
                shift = i % len(names)
                for n in names[shift:] + names[:shift]:  # who goes first rotates from level to level
                    if n not in active:
                        continue
                    print(
                        f"{n}: level {i + 1}/{len(rates)}: {rate:g} records/s offered "
                        f"({rate / args.jobs:.3g} steps/s per job, {rate * args.tensors:.0f} tensor stats/s) "
                        f"for {args.level_seconds:g}s",
                        flush=True,
                    )
                    for m, other in benches.items():  # progress lines from the design under load only
                        other.sampler.print_every = args.sample_s if m == n else math.inf
                    failed: list[dict[str, Any]] = []
                    while True:
                        level = offer(
                            benches[n], i, rate, args.level_seconds, args.drain_s, args.alert_wait_s
                        )
                        level["reasons"] = judge(level, args)
                        level["ok"] = not level["reasons"]
                        print(_HEADER + "\n" + _row(level), flush=True)
                        if level["ok"] or len(failed) >= args.retries:
                            break
                        failed.append(level)  # a busy spell of a shared machine: once more (--retries)
                        print(
                            f"{n}: level {i + 1} did not keep up ({'; '.join(level['reasons'])}); again",
                            flush=True,
                        )
                    level["attempts"] = len(failed) + 1
                    level["failed_attempts"] = failed
                    levels[n].append(level)
                    if not level["ok"] and not args.keep_going:
                        stopped[n] = f"stopped at level {i + 1}: " + "; ".join(level["reasons"])
                        active.remove(n)
                        close(n)
                if not active:
                    break
        except KeyboardInterrupt:
            for n in active:
                stopped[n] = "interrupted"
        for n in names:
            if n not in totals and n in benches:
                totals[n] = _totals(benches[n])
    finally:
        for n in reversed(names):
            stacks[n].close()
    results = {n: _knee_of(levels[n], stopped[n], totals[n]) for n in names}
    if len(names) == 1:
        return {**results[names[0]], "design": names[0]}
    return {
        "mode": "knee",
        "designs_order": names,
        "by_design": results,
        "comparison": compare(results, rates),
    }


def compare(results: dict[str, dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    """Per rate, each design's figures side by side; the knees and current/baseline ratios."""
    rows = []
    for i, rate in enumerate(rates):
        row: dict[str, Any] = {"target_rps": rate}
        for n, r in results.items():
            lv = r["levels"][i] if i < len(r["levels"]) else None
            row[n] = (
                None
                if lv is None
                else {
                    k: lv[k]
                    for k in (
                        "offered_rps",
                        "processed_rps",
                        "processed_ratio",
                        "ok",
                        "alert_latency_p99_s",
                        "worker_cpu_pct",
                        "worker_cpu_us_per_record",
                        "generator_cpu_pct",
                        "broker_cpu_pct",
                        "machine_cpu_pct",
                        "rest_cpu_pct",
                        "loadavg_1m_start",
                    )
                }
            )
        rows.append(row)
    out: dict[str, Any] = {
        "rows": rows,
        "knee_target_rps": {n: r["knee_target_rps"] for n, r in results.items()},
        "peak_processed_rps": {n: r["peak_processed_rps"] for n, r in results.items()},
        "worker_cpu_us_per_record_min": {n: r["worker_cpu_us_per_record_min"] for n, r in results.items()},
    }
    b, c = results.get("baseline"), results.get("current")
    if b and c:
        for key in ("knee_target_rps", "peak_processed_rps", "worker_cpu_us_per_record_min"):
            x, y = b[key], c[key]
            out[f"{key}_current_over_baseline"] = round(y / x, 3) if x and y is not None else None
    return out


def run_soak(args: argparse.Namespace, design: Design, broker: Broker) -> dict[str, Any]:
    seconds = args.minutes * 60
    warmup_s = (args.warmup_minutes if args.warmup_minutes is not None else min(2.0, 0.2 * args.minutes)) * 60
    with bench(args, args.sample_s, args.sample_s, broker=broker, design=design) as b:
        print(
            f"soak: {args.rate:g} records/s ({args.rate / args.jobs:.3g} steps/s per job) for {args.minutes:g} min, "
            f"RSS sampled every {args.sample_s:g}s, warm-up {warmup_s:.0f}s",
            flush=True,
        )
        level = offer(b, 0, args.rate, seconds, args.drain_s, args.alert_wait_s)
        samples = [s for s in b.sampler.samples if s.phase == "L0"]
        totals = _totals(b)
    level["reasons"] = judge(level, args)
    level["ok"] = not level["reasons"]
    start = samples[0].t if samples else 0.0
    worker = [(s.t - start, s.worker_rss / MB) for s in samples]
    gen = [(s.t - start, s.gen_rss / MB) for s in samples]
    after = [p for p in worker if p[0] >= warmup_s]
    gen_after = [p for p in gen if p[0] >= warmup_s]
    slope = slope_per_minute(after)
    memory = {
        "samples": len(worker),
        "warmup_s": warmup_s,
        "worker_rss_mb_first": round(worker[0][1], 1) if worker else None,
        "worker_rss_mb_after_warmup": round(after[0][1], 1) if after else None,
        "worker_rss_mb_last": round(worker[-1][1], 1) if worker else None,
        "worker_rss_mb_max": round(max(v for _, v in worker), 1) if worker else None,
        "worker_rss_slope_mb_per_min": finite(slope, 3),
        "worker_rss_slope_all_mb_per_min": finite(slope_per_minute(worker), 3),
        "generator_rss_mb_first": round(gen[0][1], 1) if gen else None,
        "generator_rss_mb_last": round(gen[-1][1], 1) if gen else None,
        "generator_rss_slope_mb_per_min": finite(slope_per_minute(gen_after), 3),
        "flat_limit_mb_per_min": args.flat_mb_per_min,
        "flat": None if slope is None else slope <= args.flat_mb_per_min,
    }
    return {"mode": "soak", "design": design.name, "level": level, "memory": memory, "totals": totals}


def _totals(b: Bench) -> dict[str, Any]:
    b.gen.flush(10)
    processed = read_all(b.workers, b.job_prefix).processed
    faults = b.gen.faults
    return {
        "records_offered": b.gen.sent,
        "records_delivered": b.gen.delivered,
        "records_failed": b.gen.failed,
        "records_processed": int(processed),
        "alerts_expected": len(faults),
        "alerts_received": sum(1 for f in faults if (f.job, f.step) in b.alerts.firings),
        "other_alert_events": dict(sorted(b.alerts.other.items())),
    }


# ---------------------------------------------------------------------- output
_HEADER = (
    f"{'target/s':>9} {'offered/s':>9} {'stats/s':>9} {'processed/s':>11} {'ratio':>6} {'backlog max/end':>15} "
    f"{'lag max/end':>11} {'alert p50/p99 ms':>16} {'alerts':>9} {'cpu%':>5} {'us/rec':>6} {'gen%':>5} "
    f"{'mach%':>5} {'rss MB':>6}  ok"
)


def _ms(x: float | None) -> str:
    return "miss" if x is None else f"{x * 1000:.0f}"


def _num(x: float | None, width: int, fmt: str = ".0f") -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def _row(x: dict[str, Any]) -> str:
    lag = "-" if x["lag_metric_max"] is None else f"{x['lag_metric_max']:.0f}/{x['lag_metric_end'] or 0:.0f}"
    alerts = f"{x['alerts_received']}/{x['alerts_expected']}"
    p = f"{_ms(x['alert_latency_p50_s'])}/{_ms(x['alert_latency_p99_s'])}" if x["alerts_expected"] else "-"
    return (
        f"{x['target_rps']:>9g} {x['offered_rps']:>9.0f} {x['offered_tensor_stats_ps']:>9.0f} "
        f"{x['processed_rps']:>11.0f} {x['processed_ratio'] or 0:>6.3f} "
        f"{str(x['backlog_max']) + '/' + str(x['backlog_end']):>15} {lag:>11} {p:>16} {alerts:>9} "
        f"{x['worker_cpu_pct']:>5.0f} {_num(x.get('worker_cpu_us_per_record'), 6)} "
        f"{x['generator_cpu_pct']:>5.0f} {_num(x.get('machine_cpu_pct'), 5)} "
        f"{x['worker_rss_mb_max']:>6.0f}  {'yes' if x.get('ok') else 'NO'}"
    )


def _print_knee(report: dict[str, Any]) -> None:
    print("\n" + _HEADER)
    for level in report["levels"]:
        for k, earlier in enumerate(level.get("failed_attempts", []), 1):
            print(_row(earlier))
            print(f"{'':>9} ^ attempt {k} of {level['attempts']}: " + "; ".join(earlier["reasons"]))
        print(_row(level))
        if level["reasons"]:
            print(f"{'':>9} ^ " + "; ".join(level["reasons"]))
    print(f"\nknee: {report['note']} ({report['stopped']})")
    if report["knee_target_rps"] is not None:
        print(
            f"      {report['knee_offered_rps']:.0f} records/s = {report['knee_tensor_stats_ps']:.0f} tensor "
            f"statistics/s sustained; peak processed {report['peak_processed_rps']:.0f} records/s"
        )
    t = report["totals"]
    print(
        f"records offered {t['records_offered']}, delivered {t['records_delivered']}, failed {t['records_failed']}, "
        f"processed {t['records_processed']}; ExplodingTensor alerts {t['alerts_received']}/{t['alerts_expected']}"
    )


def _print_comparison(report: dict[str, Any]) -> None:
    names = report["designs_order"]
    c = report["comparison"]
    cell = "processed/s  ok  cpu% us/rec gen% mach%"
    print("\n" + f"{'':>9} " + " | ".join(f"{n:^{len(cell)}}" for n in names))
    print(f"{'target/s':>9} " + " | ".join(cell for _ in names))
    for row in c["rows"]:
        parts = []
        for n in names:
            x = row[n]
            if x is None:
                parts.append(f"{'(not run)':^{len(cell)}}")
                continue
            parts.append(
                f"{x['processed_rps']:>11.0f} {'yes' if x['ok'] else ' NO':>3} {x['worker_cpu_pct']:>5.0f} "
                f"{_num(x['worker_cpu_us_per_record'], 6)} {x['generator_cpu_pct']:>4.0f} "
                f"{_num(x['machine_cpu_pct'], 5)}"
            )
        print(f"{row['target_rps']:>9g} " + " | ".join(parts))
    for n in names:
        r = report["by_design"][n]
        print(
            f"{n}: knee {_num(r['knee_target_rps'], 0, 'g').strip()} records/s; {r['note']} ({r['stopped']})"
        )
    for key in ("knee_target_rps", "peak_processed_rps", "worker_cpu_us_per_record_min"):
        ratio = c.get(f"{key}_current_over_baseline")
        if ratio is not None:
            print(f"current/baseline {key}: {ratio:.3f}")


def print_report(report: dict[str, Any]) -> None:
    if report["mode"] == "knee":
        if "by_design" in report:
            for n in report["designs_order"]:
                print(f"\n=== {n}")
                _print_knee(report["by_design"][n])
            _print_comparison(report)
        else:
            _print_knee(report)
        return
    level, m, t = report["level"], report["memory"], report["totals"]
    print("\n" + _HEADER)
    print(_row(level))
    if level["reasons"]:
        print(f"{'':>9} ^ " + "; ".join(level["reasons"]))
    print(
        f"\nworker RSS: first {m['worker_rss_mb_first']} MB, after warm-up {m['worker_rss_mb_after_warmup']} MB, "
        f"last {m['worker_rss_mb_last']} MB, max {m['worker_rss_mb_max']} MB; slope after warm-up "
        f"{m['worker_rss_slope_mb_per_min']} MB/min (all: {m['worker_rss_slope_all_mb_per_min']}) -> "
        f"{'flat' if m['flat'] else 'GROWING' if m['flat'] is False else 'too few samples'} "
        f"(limit {m['flat_limit_mb_per_min']:g} MB/min)"
    )
    print(
        f"generator RSS: first {m['generator_rss_mb_first']} MB, last {m['generator_rss_mb_last']} MB, "
        f"slope {m['generator_rss_slope_mb_per_min']} MB/min"
    )
    print(
        f"records offered {t['records_offered']}, delivered {t['records_delivered']}, failed {t['records_failed']}, "
        f"processed {t['records_processed']}; ExplodingTensor alerts {t['alerts_received']}/{t['alerts_expected']}"
    )


def write_report(
    report: dict[str, Any], args: argparse.Namespace, started: float, run_host: dict[str, Any]
) -> Path:
    config = {k: v for k, v in vars(args).items() if k not in ("func",)}
    out = {
        **report,
        "config": config,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "host": {**run_host, "loadavg_end": list(os.getloadavg())},
    }
    path = (
        Path(args.out)
        if args.out
        else RESULTS / (f"load-{report['mode']}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    return path


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("load and setup")
    g.add_argument("--jobs", type=int, default=10, help="simulated jobs (default 10)")
    g.add_argument("--tensors", type=int, default=50, help="tensor statistics per record (default 50)")
    g.add_argument("--workers", type=int, default=1, help="worker processes in one group (default 1)")
    g.add_argument(
        "--faults-per-s", type=float, default=2.0, help="NaN faults per second in total (default 2)"
    )
    g.add_argument(
        "--fault-jobs", type=int, default=None, help="jobs that get faults (default: half, at least 1)"
    )
    g.add_argument("--guarantee", default="exactly-once", choices=["exactly-once", "at-least-once"])
    g.add_argument("--rules", help="rules file for the workers (default: the built-in default set)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bootstrap", help="a Kafka cluster (default: $KAFKA_BOOTSTRAP, else --broker)")
    g.add_argument(
        "--broker",
        choices=["tansu", "kafka"],
        default="tansu",
        help="broker started for the run: the embedded Tansu (default) or a one-node Apache Kafka "
        "from deploy/kafka/kafka_local.py",
    )
    g.add_argument(
        "--designs",
        nargs="+",
        choices=DESIGNS,
        default=["current"],
        help="worker designs (bench/designs.py): current = the working tree (default), baseline = the "
        "worker of --baseline-rev; knee: several interleave level by level, in this order at the first "
        "level; soak: one",
    )
    g.add_argument(
        "--baseline-rev",
        default=DEFAULT_BASELINE_REV,
        help=f"git revision whose worker is the baseline (default {DEFAULT_BASELINE_REV}, before the rewrite)",
    )
    g.add_argument(
        "--drain-s", type=float, default=30.0, help="longest wait for the backlog to clear (default 30)"
    )
    g.add_argument(
        "--alert-wait-s", type=float, default=5.0, help="extra wait for a stretch's alerts (default 5)"
    )
    g.add_argument(
        "--keep-up", type=float, default=0.95, help="processed/offered a level needs (default 0.95)"
    )
    g.add_argument(
        "--max-lag-s", type=float, default=2.0, help="backlog bound, in seconds of offered records"
    )
    g.add_argument(
        "--p99-limit-s", type=float, default=2.0, help="alert latency p99 a level may have (default 2)"
    )
    g.add_argument("--out", help="JSON report path (default bench/results/load-<mode>-<time>.json)")
    g.add_argument("--keep-logs", action="store_true", help="keep the workers' logs and state directories")

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    k = sub.add_parser("knee", parents=[common], help="step the offered rate up and find the knee")
    k.add_argument("--rates", default="50,100,200,400,800,1600,3200", help="total records/s per level")
    k.add_argument("--level-seconds", type=float, default=25.0, help="length of each level (default 25)")
    k.add_argument("--sample-s", type=float, default=1.0, help="sampling interval (default 1)")
    k.add_argument("--keep-going", action="store_true", help="run every level, even after one fails")
    k.add_argument(
        "--retries",
        type=int,
        default=0,
        help="run a level that did not keep up again, up to N times, before it counts as failed (a busy "
        "spell of a shared machine; every attempt is in the report); default 0",
    )
    s = sub.add_parser(
        "soak", parents=[common], help="fixed rate for a long time; is the worker's memory flat?"
    )
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--rate", type=float, default=200.0, help="total records/s (pick one below the knee)")
    s.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling interval (default 5)")
    s.add_argument(
        "--warmup-minutes", type=float, default=None, help="excluded from the slope (default 20%%, <= 2)"
    )
    s.add_argument(
        "--flat-mb-per-min", type=float, default=0.5, help="largest slope called flat (default 0.5)"
    )
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.tensors < 1 or args.workers < 1:
        ap.error("--jobs, --tensors and --workers must be >= 1")
    if args.fault_jobs is None:
        args.fault_jobs = max(1, args.jobs // 2)
    args.designs = list(dict.fromkeys(args.designs))
    if args.mode == "soak" and len(args.designs) != 1:
        ap.error("soak runs one design at a time (--designs baseline or --designs current)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    host = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "resources_from": resource_source(),
        "loadavg_start": list(os.getloadavg()),
    }
    tmp = Path(tempfile.mkdtemp(prefix="tp-load-designs-"))
    try:
        designs = {n: prepare(n, tmp, args.baseline_rev) for n in args.designs}
        for d in designs.values():
            print_imports(d)
        with open_broker(args.bootstrap, args.broker) as b:
            print(f"broker: {b.bootstrap} ({b.what})", flush=True)
            host["broker"] = b.what
            if args.mode == "knee":
                report = run_knee(args, designs, b)
            else:
                report = run_soak(args, designs[args.designs[0]], b)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["design_sources"] = {n: d.describe() for n, d in designs.items()}
    print_report(report)
    path = write_report(report, args, started, host)
    print(f"report: {path}")
    if report["mode"] == "knee":
        runs = report["by_design"].values() if "by_design" in report else [report]
        return 0 if all(r["levels"] for r in runs) else 1
    return 0 if report["level"]["ok"] else 1  # the memory verdict is for a reader (see README)


if __name__ == "__main__":
    sys.exit(main())
