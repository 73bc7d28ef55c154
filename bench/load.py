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
  soak  offers a fixed --rate for --minutes and samples worker RSS; reports first/last/max RSS and
        the slope (MB/min) after warm-up.

    python bench/load.py knee --jobs 10 --tensors 50 --rates 50,100,200,400,800,1600
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import broker
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
    start_workers,
    stop_workers,
    wait_until,
)

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20


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


@contextlib.contextmanager
def bench(args: argparse.Namespace, sample_s: float, print_s: float) -> Iterator[Bench]:
    """Broker, job topics, worker processes (joined and evaluating), alert reader and sampler."""
    run_id = uuid.uuid4().hex[:8]
    prefix = f"load-{run_id}-"
    workdir = Path(tempfile.mkdtemp(prefix="tp-load-"))
    with broker(args.bootstrap) as bs:
        jobs = make_jobs(run_id, args.jobs, args.tensors, args.seed)
        print(
            f"run {run_id}: {args.jobs} jobs x {args.tensors} tensors, broker {bs}, work dir {workdir}",
            flush=True,
        )
        create_topics(bs, [j.topic for j in jobs])
        gen = LoadGenerator(
            bs, jobs, faults_per_s=args.faults_per_s, fault_jobs=args.fault_jobs, seed=args.seed
        )
        workers = start_workers(
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
            print(f"workers ready after {time.monotonic() - t0:.1f}s", flush=True)
            b.sampler.start()
            yield b
        finally:
            b.sampler.stop()
            alerts.stop()
            gen.close()
            stop_workers(workers)
            if args.keep_logs:
                print(f"worker logs kept in {workdir}", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------- one stretch of load
def offer(
    b: Bench, index: int, rate: float, seconds: float, drain_s: float, alert_wait_s: float
) -> dict[str, Any]:
    """Offer `rate` records/s for `seconds`, drain, and measure; returns the stretch's report."""
    gen, workers = b.gen, b.workers
    check_alive(workers)
    b.sampler.raise_if_failed()
    before = read_all(workers, b.job_prefix)
    stats0 = gen.tensor_stats
    wcpu0 = sum(cpu_rss(w.proc.pid)[0] for w in workers)
    gcpu0 = time.process_time()
    b.phase = f"L{index}"
    sent, wall = gen.run(rate, seconds, index)
    after = read_all(workers, b.job_prefix)
    wcpu1 = sum(cpu_rss(w.proc.pid)[0] for w in workers)
    gcpu1 = time.process_time()
    backlog_end = gen.sent - after.processed

    # Drain: everything offered evaluated, then the level's alerts read (or the waits run out).
    b.phase = f"D{index}"
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
    faults = [f for f in gen.faults if f.level == index]
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
    samples = [s for s in b.sampler.samples if s.phase in (f"L{index}", f"D{index}")]
    load_samples = [s for s in samples if s.phase == f"L{index}"]
    hist = bucket_delta(after.buckets, before.buckets)
    processed = after.processed - before.processed
    return {
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
        "worker_cpu_pct": round(100 * (wcpu1 - wcpu0) / wall, 1),
        "worker_rss_mb_max": round(max((s.worker_rss for s in samples), default=0) / MB, 1),
        "worker_rss_mb_end": round(load_samples[-1].worker_rss / MB, 1) if load_samples else None,
        "generator_cpu_pct": round(100 * (gcpu1 - gcpu0) / wall, 1),
        "generator_rss_mb": round(cpu_rss(os.getpid())[1] / MB, 1),
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
def run_knee(args: argparse.Namespace) -> dict[str, Any]:
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"--rates must be positive numbers separated by commas, got {args.rates!r}")
    levels: list[dict[str, Any]] = []
    knee = None
    stopped = "all levels run"
    with bench(args, args.sample_s, args.sample_s) as b:
        try:
            for i, rate in enumerate(rates):
                per_job = rate / args.jobs
                print(
                    f"level {i + 1}/{len(rates)}: {rate:g} records/s offered "
                    f"({per_job:.3g} steps/s per job, {rate * args.tensors:.0f} tensor stats/s) for {args.level_seconds:g}s",
                    flush=True,
                )
                level = offer(b, i, rate, args.level_seconds, args.drain_s, args.alert_wait_s)
                level["reasons"] = judge(level, args)
                level["ok"] = not level["reasons"]
                levels.append(level)
                print(_HEADER + "\n" + _row(level), flush=True)
                if all(x["ok"] for x in levels):
                    knee = level  # the highest of the levels kept up before any failed
                if not level["ok"] and not args.keep_going:
                    stopped = f"stopped at level {i + 1}: " + "; ".join(level["reasons"])
                    break
        except KeyboardInterrupt:
            stopped = "interrupted"
        totals = _totals(b)
    knee_rps = knee["target_rps"] if knee else None
    if knee is not None and knee is levels[-1] and all(x["ok"] for x in levels):
        note = "every level kept up: the knee is above the highest rate tried"
    elif knee is None:
        note = "no level kept up: try lower rates"
    else:
        note = f"highest level kept up before the first that did not: {knee_rps:g} records/s"
    return {
        "mode": "knee",
        "levels": levels,
        "knee_target_rps": knee_rps,
        "knee_offered_rps": knee["offered_rps"] if knee else None,
        "knee_tensor_stats_ps": knee["offered_tensor_stats_ps"] if knee else None,
        "peak_processed_rps": max((x["processed_rps"] for x in levels), default=None),
        "note": note,
        "stopped": stopped,
        "totals": totals,
    }


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.minutes * 60
    warmup_s = (args.warmup_minutes if args.warmup_minutes is not None else min(2.0, 0.2 * args.minutes)) * 60
    with bench(args, args.sample_s, args.sample_s) as b:
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
    return {"mode": "soak", "level": level, "memory": memory, "totals": totals}


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
    f"{'lag max/end':>11} {'alert p50/p99 ms':>16} {'alerts':>9} {'cpu%':>5} {'rss MB':>6}  ok"
)


def _ms(x: float | None) -> str:
    return "miss" if x is None else f"{x * 1000:.0f}"


def _row(x: dict[str, Any]) -> str:
    lag = "-" if x["lag_metric_max"] is None else f"{x['lag_metric_max']:.0f}/{x['lag_metric_end'] or 0:.0f}"
    alerts = f"{x['alerts_received']}/{x['alerts_expected']}"
    p = f"{_ms(x['alert_latency_p50_s'])}/{_ms(x['alert_latency_p99_s'])}" if x["alerts_expected"] else "-"
    return (
        f"{x['target_rps']:>9g} {x['offered_rps']:>9.0f} {x['offered_tensor_stats_ps']:>9.0f} "
        f"{x['processed_rps']:>11.0f} {x['processed_ratio'] or 0:>6.3f} "
        f"{str(x['backlog_max']) + '/' + str(x['backlog_end']):>15} {lag:>11} {p:>16} {alerts:>9} "
        f"{x['worker_cpu_pct']:>5.0f} {x['worker_rss_mb_max']:>6.0f}  {'yes' if x.get('ok') else 'NO'}"
    )


def print_report(report: dict[str, Any]) -> None:
    t = report["totals"]
    if report["mode"] == "knee":
        print("\n" + _HEADER)
        for level in report["levels"]:
            print(_row(level))
            if level["reasons"]:
                print(f"{'':>9} ^ " + "; ".join(level["reasons"]))
        print(f"\nknee: {report['note']} ({report['stopped']})")
        if report["knee_target_rps"] is not None:
            print(
                f"      {report['knee_offered_rps']:.0f} records/s = {report['knee_tensor_stats_ps']:.0f} tensor "
                f"statistics/s sustained; peak processed {report['peak_processed_rps']:.0f} records/s"
            )
    else:
        level, m = report["level"], report["memory"]
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
    g.add_argument("--bootstrap", help="a Kafka cluster (default: $KAFKA_BOOTSTRAP, else an embedded broker)")
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
    report = run_knee(args) if args.mode == "knee" else run_soak(args)
    print_report(report)
    path = write_report(report, args, started, host)
    print(f"report: {path}")
    if report["mode"] == "knee":
        return 0 if report["levels"] else 1
    return 0 if report["level"]["ok"] else 1  # the memory verdict is for a reader (see README)


if __name__ == "__main__":
    sys.exit(main())
