#!/usr/bin/env python
"""Does a worker's cost grow linearly with jobs x ranks x tensors? CPU per record at 10, 100, 1,000 jobs.

For each job count, a fresh worker (its own group) follows that many simulated one-rank jobs
(bench/loadgen.py, `--tensors` statistics per record) while the generator offers the same total
`--rate` records/s for `--seconds`. Measured from the worker process: CPU seconds per evaluated
record (the cost per record should not depend on how many jobs share the rate: linear total cost),
resident memory at the end (per-job state and clients), records evaluated against records sent, and
the step -> alert p50/p99 of the faults (one NaN a second on a random job). A second table does the
same at a fixed job count for `--tensor-counts` (cost per record should grow with tensors).

    python bench/scaling.py --jobs 10 100 1000 --rate 300 --seconds 40 --broker kafka

Results (JSON) go to bench/results/ unless --out names a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import open_broker, percentile
from designs import prepare_variant, start_workers
from loadgen import LoadGenerator, create_topics, make_jobs
from loadwatch import AlertCollector, check_alive, cpu_rss, scrape, stop_workers

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(
    bootstrap: str, jobs: int, tensors: int, a: argparse.Namespace, work: Path, design_name: str = "current"
) -> dict[str, Any]:
    rid = uuid.uuid4().hex[:6]
    prefix = f"load-{rid}-"
    sims = make_jobs(rid, jobs, tensors, seed=7)
    t_topics = time.monotonic()
    create_topics(bootstrap, [j.topic for j in sims])
    topics_s = time.monotonic() - t_topics
    (work / f"design-{rid}").mkdir()
    design = prepare_variant(design_name, work / f"design-{rid}")
    (worker,) = start_workers(
        design, bootstrap, 1, group=f"g-{rid}", jobs_regex=f"^{prefix}", workdir=work / f"design-{rid}",
        guarantee="exactly-once",
    )  # fmt: skip
    proc, log = worker.proc, worker.log
    alerts = AlertCollector(bootstrap, prefix)
    alerts.start()
    gen = LoadGenerator(bootstrap, sims, faults_per_s=1.0, fault_jobs=jobs, seed=11)
    try:
        gen.announce_all()  # one record per job: every job exists and is followed
        deadline = time.monotonic() + 180
        while True:
            check_alive([worker])
            try:
                if scrape(worker, prefix).processed >= jobs:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the worker did not evaluate every job's first record in 180 s; see {log}"
                )
            time.sleep(0.2)
        warm_s = time.monotonic() - t_topics
        before = scrape(worker, prefix).processed
        cpu0, _ = cpu_rss(proc.pid)
        t0 = time.monotonic()
        sent, wall = gen.run(a.rate, a.seconds, level=1)
        gen.flush(30)
        drain = time.monotonic() + 60
        while scrape(worker, prefix).processed - before < sent and time.monotonic() < drain:
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        cpu1, rss = cpu_rss(proc.pid)
        evaluated = scrape(worker, prefix).processed - before
        time.sleep(1.0)
        lat = [
            arr.read - f.ts
            for f in gen.faults
            if f.level == 1 and (arr := alerts.firings.get((f.job, f.step)))
        ]
        listing = [line for line in log.read_text(errors="replace").splitlines() if "intake: listing" in line]
        return {
            "design": design_name,
            "listing": listing[-1].split("intake: ", 1)[1] if listing else None,
            "jobs": jobs,
            "tensors": tensors,
            "sent": sent,
            "evaluated": evaluated,
            "offered_per_s": round(sent / wall, 1),
            "cpu_us_per_record": round((cpu1 - cpu0) / max(evaluated, 1) * 1e6, 1),
            "worker_cpu_share": round((cpu1 - cpu0) / elapsed, 3),
            "rss_mb": round(rss / 2**20, 1),
            "alert_p50_s": round(percentile(lat, 50), 3) if lat else None,
            "alert_p99_s": round(percentile(lat, 99), 3) if lat else None,
            "faults": sum(1 for f in gen.faults if f.level == 1),
            "alerted": len(lat),
            "topics_s": round(topics_s, 1),
            "warm_s": round(warm_s, 1),
        }
    finally:
        alerts.stop()
        gen.close()
        stop_workers([worker])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--tensors", type=int, default=50, help="tensor statistics per record (jobs table)")
    ap.add_argument(
        "--tensor-counts", type=int, nargs="*", default=[10, 50, 200], help="for the tensors table"
    )
    ap.add_argument("--tensor-jobs", type=int, default=10, help="jobs of the tensors table")
    ap.add_argument("--rate", type=float, default=300.0, help="records/s offered in total")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument(
        "--designs",
        nargs="+",
        default=["current"],
        help="current, current:<setting>=<v>,..., <git rev>[:<setting>=<v>,...] (bench/designs.py), "
        "each level run with each design in turn",
    )
    ap.add_argument("--broker", choices=["tansu", "kafka"], default="kafka")
    ap.add_argument("--bootstrap")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    load0 = os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory(prefix="tp-scaling-") as tmp,
        open_broker(a.bootstrap, a.broker) as broker,
    ):
        work = Path(tmp)
        plan = [(n, a.tensors) for n in a.jobs] + [(a.tensor_jobs, t) for t in a.tensor_counts]
        for jobs, tensors in plan:
            for name in a.designs:
                print(f"-- {name}: {jobs} jobs x {tensors} tensors at {a.rate:g} records/s", flush=True)
                row = run_one(broker.bootstrap, jobs, tensors, a, work, name)
                print("   " + json.dumps(row), flush=True)
                rows.append(row)
        what = broker.what
    load1 = os.getloadavg()[0]
    print(f"\nbroker: {what}; {platform.node()}, {os.cpu_count()} cores; load {load0:.1f} -> {load1:.1f}")
    print(
        "\n| design | jobs | tensors | evaluated / sent | worker CPU per record | worker CPU share | RSS "
        "| alert p50 / p99 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['design']} | {r['jobs']} | {r['tensors']} | {r['evaluated']:.0f} / {r['sent']} | {r['cpu_us_per_record']} µs | "
            f"{r['worker_cpu_share']} | {r['rss_mb']} MB | {r['alert_p50_s']} / {r['alert_p99_s']} s |"
        )
    out = a.out or RESULTS / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(a).items()}, "load": [load0, load1], "rows": rows}, indent=2
        )
    )
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
