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
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import Broker, host_info, open_broker
from designs import DEFAULT_BASELINE_REV, DESIGNS, Design, prepare, prepare_variant, print_imports
from load_report import HEADER, MB, finite, print_report, row, slope_per_minute, write_report
from load_stretch import Bench, bench, offer
from loadwatch import read_all, resource_source


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
                        print(HEADER + "\n" + row(level), flush=True)
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
    if (b is None or c is None) and len(results) == 2:  # two revisions: the second over the first
        b, c = results.values()
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
        default=["current"],
        help="worker designs (bench/designs.py): current = the working tree (default), baseline = the "
        "worker of --baseline-rev, or any git revision (git archive'd: a fixed version while the tree "
        "changes), each with :<setting>=<value>,... as designs.py's variants; knee: several interleave "
        "level by level, in this order at the first level; soak: one",
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
    host = host_info(resources_from=resource_source(), loadavg_start=list(os.getloadavg()))
    tmp = Path(tempfile.mkdtemp(prefix="tp-load-designs-"))
    try:
        designs = {}
        for i, n in enumerate(args.designs):
            if n in DESIGNS:
                designs[n] = prepare(n, tmp, args.baseline_rev)
            else:  # a revision or a variant (designs.py)
                (tmp / f"design{i}").mkdir()
                designs[n] = prepare_variant(n, tmp / f"design{i}")
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
