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
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import host_info, open_broker, utc, write_json
from designs import (
    DEFAULT_BASELINE_REV,
    DESIGNS,
    Design,
    DesignError,
    prepare,
    print_imports,
)
from job_scenario import Scenario, ScenarioError, stats


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
    host = host_info(loadavg_start=list(os.getloadavg()))
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
        "started_utc": utc(started),
        "duration_s": round(time.time() - started, 1),
        "host": {**host, "loadavg_end": list(os.getloadavg())},
    }
    path = write_json(out, args.out, "job-start", started, allow_nan=False)
    print(f"report: {path}")
    return 0 if all(s["status"] == "ok" for s in scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
