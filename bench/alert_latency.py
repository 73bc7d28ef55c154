#!/usr/bin/env python
"""Step -> alert latency through the broker and a `tensorpulse stream` worker process.

A framework-neutral Hook publishes a job's steps at a fixed rate; every `--every` steps one
step carries NaNs, so ExplodingTensor fires (and resolves at the next step). A consumer of the
alerts topic (read_committed) notes when each firing alert arrives. Latency = arrival time -
the time the hook created the faulty step's record, i.e. everything between the training step
and an alert consumer: the hook's queue, the broker, the worker's decode and rules, and the
worker's transaction commit (exactly-once; commit interval 0.25 s by default).

    python bench/alert_latency.py --faults 40 --rate 50
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import numpy as np
from common import broker, percentile

from tensorpulse.broker import free_port
from tensorpulse.producers import Hook
from tensorpulse.sinks.alerts import read_alerts
from tensorpulse.stream.process import worker_command


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=40)
    ap.add_argument("--every", type=int, default=25, help="steps between faults")
    ap.add_argument("--rate", type=float, default=50.0, help="steps per second")
    ap.add_argument("--guarantee", default="exactly-once", choices=["exactly-once", "at-least-once"])
    ap.add_argument("--bootstrap")
    args = ap.parse_args()
    job = f"latency-{uuid.uuid4().hex[:6]}"
    work = tempfile.mkdtemp(prefix="tp-latency-")
    with broker(args.bootstrap) as bs:
        hook = Hook(job, bs, listen_for_actions=False)
        hook.record(0, {"w": np.ones(1000)}, collection="weights")
        hook.publish()
        port = free_port()
        worker = subprocess.Popen(
            worker_command(
                bs,
                group=f"g-{job}",
                state_dir=os.path.join(work, "state"),
                metrics_port=port,
                jobs_regex=f"^{job}$",
                guarantee=args.guarantee,
            ),
            stdout=open(os.path.join(work, "worker.log"), "wb"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        arrivals: dict[int, float] = {}
        stop = threading.Event()

        def reader() -> None:
            for ev in read_alerts(bs, job=job, follow=True, stop=stop):
                if ev.status == "firing" and ev.rule == "ExplodingTensor":
                    arrivals[ev.step] = time.time()

        threading.Thread(target=reader, daemon=True).start()
        # Wait until the worker evaluates records (its group join takes a few seconds).
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
                if f'tensorpulse_records_total{{training_job="{job}"' in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        created: dict[int, float] = {}
        rng = np.random.default_rng(0)
        period = 1.0 / args.rate
        step = 1
        t_next = time.time()
        for _ in range(args.faults * args.every):
            w = rng.normal(size=1000)
            if step % args.every == 0:
                w[::7] = np.nan
                created[step] = time.time()
            hook.record(step, {"w": w}, collection="weights")
            hook.record_scalars(step, {"loss": 1.0})
            hook.publish()
            step += 1
            t_next += period
            time.sleep(max(0.0, t_next - time.time()))
        deadline = time.time() + 15
        while time.time() < deadline and len(arrivals) < len(created):
            time.sleep(0.1)
        stop.set()
        hook.close(5)
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(20)
    lat = [arrivals[s] - created[s] for s in created if s in arrivals]
    print(f"{len(lat)}/{len(created)} faults alerted, {args.rate:g} steps/s, guarantee {args.guarantee}")
    if lat:
        print(
            f"step->alert latency: p50 {percentile(lat, 50) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms, "
            f"max {max(lat) * 1000:.0f} ms"
        )
    return 0 if len(lat) == len(created) else 1


if __name__ == "__main__":
    sys.exit(main())
