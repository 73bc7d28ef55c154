#!/usr/bin/env python
"""One job of many ranks beside a small bystander job: does the worker keep up, alert, stay up?

A job of N ranks publishes `--steps` steps, one record per rank and step (`--tensors` tensor
statistics each); at the last step one rank (3/4 of the way up) goes NaN, so ExplodingTensor must
fire naming that rank. Meanwhile a one-rank bystander job sends a step every 0.25 s with a NaN every
4th step. Per design (old worker at `--baseline-rev` and the working tree, side by side) and size:

  rate        records of the big job evaluated per second (first publish -> all counted in /metrics)
  alert       seconds from the NaN record's creation to its alert, and the rank the alert names
  bystander   step -> alert p50 / max of the bystander's faults while the big job is processed
              (the big job starts once the bystander's first alert arrived: the worker is warm)
  restarts    the worker's tensorpulse_worker_restarts_total, and whether the process died
  state max   the largest record on the group's changelog topics (state entries; Kafka's limit is 1 MB)

    python bench/ranks.py --ranks 1024 4096 --designs baseline current --broker kafka

A design `current:<setting>=<value>,...` is the working tree's worker with those worker settings
(as TENSORPULSE_<SETTING> variables; `<git rev>:<setting>=...` the same for a revision), e.g. `current:max_ahead_per_job=0` for no per-job bound
on the copies ahead of evaluation (stream/flow.py). `--placements same other` runs each scenario
with the bystander named so that its records share the big job's steps partition (which no
consumer setting can help: one partition is evaluated in order) and so that they do not.

Results (JSON) go to bench/results/ unless --out names a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from common import open_broker, percentile
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer, TopicPartition
from designs import DEFAULT_BASELINE_REV, Design, prepare_baseline, prepare_variant, start_workers
from loadgen import create_topics
from loadwatch import AlertCollector, WorkerProc, check_alive, scrape, stop_workers

from tensorpulse import wire
from tensorpulse.sinks.alerts import read_alerts
from tensorpulse.topics import group_topic, reductions_topic

RESULTS = Path(__file__).resolve().parent / "results"


def _block(tensors: int, nan: bool) -> wire.TensorBlock:
    names = [f"layer{i}.weight" if i % 2 == 0 else f"gradient/layer{i}.weight" for i in range(tensors)]
    colls = ["weights" if i % 2 == 0 else "gradients" for i in range(tensors)]
    floats = np.tile(np.array([0.0, 0.1, -0.3, 0.3, 0.08], dtype=np.float32), (tensors, 1))
    nans = np.zeros(tensors, dtype=np.int64)
    if nan:
        floats[1, :] = np.nan
        nans[1] = 7
    return wire.TensorBlock(
        names, colls, np.full(tensors, 4096), floats, np.zeros(tensors, dtype=np.int64), nan=nans
    )


def _record(job: str, rank: int, world: int, step: int, block: wire.TensorBlock, ts: float) -> bytes:
    return wire.encode(
        job=job, rank=rank, world=world, step=step, mode="train", ts=ts, seq=step,
        scalars={"loss": 1.0 / (step + 1)}, tensors=block, announce=step == 0,
    )  # fmt: skip


class Bystander(threading.Thread):
    """A one-rank job stepping every 0.25 s, NaN every 4th step; remembers each fault's record ts."""

    def __init__(self, bootstrap: str, job: str, tensors: int) -> None:
        super().__init__(name="bystander", daemon=True)
        self.job, self.topic = job, reductions_topic(job)
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
        self.healthy, self.sick = _block(tensors, False), _block(tensors, True)
        self.faults: dict[int, float] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        step = 0
        while not self.stop_event.wait(0.25):
            fault = step % 4 == 3
            ts = time.time()
            value = _record(self.job, 0, 1, step, self.sick if fault else self.healthy, ts)
            self.producer.produce(self.topic, key=self.job.encode(), value=value)
            self.producer.poll(0)
            if fault:
                self.faults[step] = ts
            step += 1
        self.producer.flush(10)


class StepsWatch(threading.Thread):
    """Tails the group's steps topic (the working tree's design): when each bystander copy arrived.

    Splits the bystander's wait into publish -> copy (the intake) and copy -> alert (the processor),
    and says whether the two jobs share a steps partition (then no consumer can put one before the other).
    """

    def __init__(self, bootstrap: str, group: str, big: str, bystander: str) -> None:
        super().__init__(name="steps-watch", daemon=True)
        self.topic, self.big, self.bys = group_topic("steps", group), big.encode(), bystander.encode()
        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"watch-{uuid.uuid4().hex[:6]}"}
        )
        self.copied: dict[int, float] = {}  # bystander source offset (= its step) -> arrival here
        self.partitions: dict[bytes, int] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        meta = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        if meta is None or not meta.partitions:
            return
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_END) for p in meta.partitions])
        while not self.stop_event.is_set():
            for m in self.consumer.consume(1000, 0.1):
                if m.error() is not None or m.key() not in (self.big, self.bys):
                    continue
                self.partitions[m.key()] = m.partition()
                src = dict(m.headers() or ()).get("tp.src")
                if m.key() == self.bys and src is not None:
                    self.copied[int(src.decode().partition(":")[2])] = time.time()
        self.consumer.close()


def changelog_max_bytes(bootstrap: str, group: str, timeout: float = 20.0) -> tuple[int, int]:
    """(largest record, records) over the group's changelog topics (Quix names them changelog__<group>--...)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"size-{uuid.uuid4().hex[:6]}",
            "enable.partition.eof": True,
        }
    )
    try:
        meta = c.list_topics(timeout=10)
        parts = [
            TopicPartition(t, p, OFFSET_BEGINNING)
            for t, md in meta.topics.items()
            if t.startswith(f"changelog__{group}--")
            for p in md.partitions
        ]
        if not parts:
            return 0, 0
        c.assign(parts)
        left, biggest, count = len(parts), 0, 0
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is not None:
                    left -= m.error().code() == m.error()._PARTITION_EOF
                    continue
                biggest = max(biggest, len(m.value() or b""))
                count += 1
        return biggest, count
    finally:
        c.close()


def _metric(worker: WorkerProc, name: str) -> float | None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    return None


def scenario(
    design: Design, bootstrap: str, world: int, a: argparse.Namespace, work: Path, placement: str
) -> dict[str, Any]:
    rid = uuid.uuid4().hex[:6]
    big, bys = f"ranks-{rid}-big", f"ranks-{rid}-bys"
    i, n = 0, a.steps_partitions  # librdkafka's default partitioner for keyed records: crc32(key) % n
    while (zlib.crc32(bys.encode()) % n == zlib.crc32(big.encode()) % n) != (placement == "same"):
        i += 1
        bys = f"ranks-{rid}-bys{i}"
    group = f"ranks-{rid}-{design.name.replace(':', '-').replace('=', '-').replace(',', '-')}"
    create_topics(bootstrap, [reductions_topic(big), reductions_topic(bys)])
    wdir = work / f"{group}-{world}"
    wdir.mkdir()
    (worker,) = start_workers(
        design, bootstrap, 1, group=group, jobs_regex=f"^ranks-{rid}-", workdir=wdir, guarantee="exactly-once"
    )
    proc, log = worker.proc, worker.log
    alerts = AlertCollector(bootstrap, f"ranks-{rid}-")
    alerts.start()
    bystander = Bystander(bootstrap, bys, a.tensors)
    out: dict[str, Any] = {
        "design": design.name,
        "placement": placement,
        "ranks": world,
        "steps": a.steps,
        "tensors": a.tensors,
    }
    try:
        deadline = time.monotonic() + 60
        while True:  # the worker answers /metrics
            check_alive([worker])
            try:
                _metric(worker, "tensorpulse_worker_restarts_total")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker's /metrics did not come up") from None
                time.sleep(0.2)
        bystander.start()
        warm = time.monotonic() + 90
        while not any(j == bys for j, _ in alerts.firings):  # the pipeline is up: the bystander alerts
            check_alive([worker])
            if time.monotonic() > warm:
                raise RuntimeError(f"no bystander alert within 90 s; see {log}")
            time.sleep(0.1)
        watch = StepsWatch(bootstrap, group, big, bys)  # idle where the design has no steps topic
        watch.start()
        sick = world * 3 // 4
        healthy, nan = _block(a.tensors, False), _block(a.tensors, True)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000})
        t0 = time.time()
        nan_ts = 0.0
        for step in range(a.steps):
            for rank in range(world):
                fault = step == a.steps - 1 and rank == sick
                ts = time.time()
                nan_ts = ts if fault else nan_ts
                value = _record(big, rank, world, step, nan if fault else healthy, ts)
                while True:
                    try:
                        producer.produce(reductions_topic(big), key=big.encode(), value=value)
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.poll(0)
        producer.flush(60)
        total = world * a.steps
        done_at = None
        end = time.monotonic() + a.deadline_s
        while time.monotonic() < end:
            if proc.poll() is not None:
                break
            try:
                if scrape(worker, big).processed >= total:
                    done_at = time.time()
                    break
            except OSError:
                pass
            time.sleep(0.25)
        alert_wait = time.monotonic() + 5
        while (big, a.steps - 1) not in alerts.firings and time.monotonic() < alert_wait:
            time.sleep(0.1)
        bystander.stop_event.set()
        bystander.join(15)
        arrival = alerts.firings.get((big, a.steps - 1))
        during = {s: ts for s, ts in bystander.faults.items() if ts >= t0}  # faults while the big job ran
        settle = time.monotonic() + 60
        while not all((bys, s) in alerts.firings for s in during) and time.monotonic() < settle:
            time.sleep(0.1)
        lat = [alerts.firings[(bys, s)].read - ts for s, ts in during.items() if (bys, s) in alerts.firings]
        copy_s, after_copy_s = [], []
        watch.stop_event.set()
        watch.join(10)
        for s, ts in during.items():
            copied = watch.copied.get(s)
            if copied is not None and (bys, s) in alerts.firings:
                copy_s.append(copied - ts)
                after_copy_s.append(alerts.firings[(bys, s)].read - copied)
        died = proc.poll() is not None
        try:
            restarts = None if died else _metric(worker, "tensorpulse_worker_restarts_total")
            processed = None if died else scrape(worker, big).processed
        except OSError:
            restarts = processed = None
        biggest, entries = changelog_max_bytes(bootstrap, group)
        out.update(
            rate=round(total / (done_at - t0), 1) if done_at else None,
            evaluated=processed,
            records=total,
            alert_s=round(arrival.read - nan_ts, 3) if arrival else None,
            alert_ranks=_alert_ranks(bootstrap, big),
            bystander_faults=len(during),
            bystander_alerts=len(lat),
            bystander_p50_s=round(percentile(lat, 50), 3) if lat else None,
            bystander_max_s=round(max(lat), 3) if lat else None,
            bystander_copy_p50_s=round(percentile(copy_s, 50), 3) if copy_s else None,
            bystander_after_copy_p50_s=round(percentile(after_copy_s, 50), 3) if after_copy_s else None,
            # None when the watch did not see a copy of both jobs (a short burst)
            same_steps_partition=len(set(watch.partitions.values())) == 1
            if len(watch.partitions) == 2
            else None,
            restarts=restarts,
            died=died,
            state_max_bytes=biggest,
            changelog_records=entries,
        )
    finally:
        bystander.stop_event.set()
        alerts.stop()
        stop_workers([worker])
    return out


def _alert_ranks(bootstrap: str, job: str) -> list[int]:
    """The ranks the job's ExplodingTensor firing alerts name (the collector keeps only their timing)."""
    return [
        ev.rank
        for ev in read_alerts(bootstrap, job=job, idle_timeout=1.0)
        if ev.rule == "ExplodingTensor" and ev.status == "firing"
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1024, 4096], help="world sizes of the big job")
    ap.add_argument("--steps", type=int, default=3, help="steps of the big job (NaN at the last)")
    ap.add_argument("--tensors", type=int, default=20, help="tensor statistics per record")
    ap.add_argument(
        "--designs",
        nargs="+",
        default=["baseline", "current"],
        help="baseline (--baseline-rev), current, current:<setting>=<v>,..., <git rev>[:<setting>=<v>,...]",
    )
    ap.add_argument(
        "--placements",
        nargs="+",
        default=["same", "other"],
        choices=["same", "other"],
        help="the bystander's steps partition: the big job's, or another",
    )
    ap.add_argument("--steps-partitions", type=int, default=12, help="the worker's `partitions` setting")
    ap.add_argument("--baseline-rev", default=DEFAULT_BASELINE_REV)
    ap.add_argument(
        "--deadline-s", type=float, default=240.0, help="per scenario, for every record to be evaluated"
    )
    ap.add_argument("--broker", choices=["tansu", "kafka"], default="kafka")
    ap.add_argument("--bootstrap")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tp-ranks-") as tmp, open_broker(a.bootstrap, a.broker) as broker:
        work = Path(tmp)
        designs = {}
        for name in a.designs:
            d = work / f"design-{len(designs)}"  # no ":" in it: PYTHONPATH separates with ":"
            d.mkdir()
            designs[name] = (
                prepare_baseline(a.baseline_rev, d) if name == "baseline" else prepare_variant(name, d)
            )
            designs[name].name = name
            print(f"{name}: {designs[name].source}", flush=True)
        for world in a.ranks:
            for placement in a.placements:
                for name in a.designs:
                    print(f"-- {name}, {world} ranks, bystander's partition: {placement}", flush=True)
                    row = scenario(designs[name], broker.bootstrap, world, a, work, placement)
                    print("   " + json.dumps(row), flush=True)
                    rows.append(row)
        print(
            f"\nbroker: {broker.what}; {platform.node()}, {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}"
        )
        broker_what = broker.what  # with --bootstrap, --broker is not what ran: say what did
    print(
        "\n| design | ranks | bystander's partition | records | evaluated/s | alert (s), rank "
        "| bystander p50 / max (s) | its copy p50 (s) | restarts | died | largest state record |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bys = f"{r['bystander_p50_s']} / {r['bystander_max_s']} ({r['bystander_alerts']}/{r['bystander_faults']})"
        print(
            f"| {r['design']} | {r['ranks']} | {r['placement']} | {r['records']} | {r['rate']} | "
            f"{r['alert_s']}, {r['alert_ranks']} | {bys} | {r['bystander_copy_p50_s']} | "
            f"{r['restarts']} | {r['died']} | {r['state_max_bytes']} B |"
        )
    out = a.out or RESULTS / f"ranks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "broker": broker_what, "rows": rows}, indent=2))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
