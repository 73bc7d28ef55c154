"""Helpers for integration tests: real topics, a real worker process, real consumers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families
from waits import wait_for as wait_for  # the one wait of the suite (tests/waits.py), re-exported

from tensorpulse import wire
from tensorpulse.broker import free_port
from tensorpulse.stream.process import worker_command
from tensorpulse.topics import group_topic

RETENTION = {"retention.ms": str(7 * 24 * 3600 * 1000)}


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    create_topic_with(bootstrap, name, {}, partitions)


def create_topic_with(bootstrap: str, name: str, conf: dict[str, Any], partitions: int = 1) -> None:
    """Create a topic with extra client settings (TLS, SASL); an existing topic is fine."""
    admin = AdminClient({"bootstrap.servers": bootstrap, **conf})
    for fut in admin.create_topics([NewTopic(name, partitions, 1, config=RETENTION)]).values():
        with contextlib.suppress(Exception):
            fut.result(10)


def committed_past(bootstrap: str, group: str, job: str) -> bool:
    """True once worker group `group` has committed its position past every record of `job` in its
    steps topic: what it does with those records (alerts, rule state) is then all written, so a
    test that checks for something that must not happen can look now instead of sleeping."""
    steps = group_topic("steps", group)
    last: dict[int, int] = {}
    for m in read_topic(bootstrap, steps, timeout=0.5):
        if m.key() == job.encode() and m.value():  # a record, not a clock tick
            last[m.partition()] = max(last.get(m.partition(), -1), m.offset())
    if not last:
        return False
    # Same group id, but no subscribe: this consumer only asks for the offsets, it never joins.
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        committed = c.committed([TopicPartition(steps, p) for p in last], timeout=10)
    finally:
        c.close()
    return all(tp.offset > last[tp.partition] for tp in committed)


def read_topic(bootstrap: str, topic: str, *, timeout: float = 3.0, committed_only: bool = True) -> list[Any]:
    """Every message currently in `topic` (assign, no group join).

    Read until the consumer reports the end of every partition (with `committed_only`, the last
    stable offset: records of an open transaction are not there yet); `timeout` s without a
    message or an end bounds the read should no end be reported. Waiting for the end rather than
    for `timeout` s of quiet keeps a read, and every poll of a `wait_for` that reads, short.
    """
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"t-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            # The broker answers a fetch at the end within 10 ms, not the default 500 ms.
            "fetch.wait.max.ms": 10,
            "isolation.level": "read_committed" if committed_only else "read_uncommitted",
        }
    )
    try:
        meta = c.list_topics(topic, timeout=10)
        t = meta.topics.get(topic)
        if t is None or t.error is not None:
            return []
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in t.partitions])
        out, idle, pending = [], time.monotonic(), set(t.partitions)
        while pending and time.monotonic() - idle < timeout:
            msgs = c.consume(1000, 0.2)
            for m in msgs:
                err = m.error()
                if err is None:
                    out.append(m)
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
            if msgs:
                idle = time.monotonic()
        return out
    finally:
        c.close()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Value of the first sample `name` in exposition text whose labels include `labels` exactly
    (`job="a"` does not match `training_job="a"`)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def worker_records(url: str, job: str) -> float:
    """`tensorpulse_records_total` of `job` at a worker's /metrics `url`: the job's records that
    worker has evaluated (0 before its first one)."""
    return metric_value(scrape(url), "tensorpulse_records_total", training_job=job) or 0.0


@contextlib.contextmanager
def worker_process(
    bootstrap: str,
    tmp: Path,
    *,
    group: str,
    rules: Path | None = None,
    jobs_regex: str | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`tensorpulse stream` as a separate process; yields (process, metrics URL).

    `env` adds environment variables for the worker alone (e.g. its own SASL credentials).
    """
    port = free_port()
    cmd = worker_command(
        bootstrap,
        group=group,
        state_dir=tmp / f"state-{group}",
        metrics_port=port,
        rules=rules,
        jobs_regex=jobs_regex,
        log_level="INFO",
    )
    cmd += extra or []
    log_path = tmp / f"worker-{group}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: _up(url, proc), 30, "the worker's /metrics endpoint")
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if os.environ.get("TENSORPULSE_TEST_SHOW_LOGS"):
            print(log_path.read_text(errors="replace")[-5000:])


def _up(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"worker exited with code {proc.returncode}")
    try:
        scrape(url)
        return True
    except OSError:
        return False


def train_record(job: str, step: int, **fields: Any) -> bytes:
    """A wire record of rank 0 of a one-rank train job at `step`, stamped now; `fields` as wire.encode."""
    return wire.encode(job=job, rank=0, world=1, step=step, mode="train", ts=time.time(), **fields)


def launch_ranks(script: Path, world: int, argv: list[str], out: Path) -> list[subprocess.Popen]:
    """`world` processes of `python script *argv`, one per rank, rendezvous on a free local port
    (the environment torchrun would give them); rank r's output goes to out/rank-r.log."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
        with open(out / f"rank-{rank}.log", "wb") as log:  # the child keeps its own descriptor
            procs.append(subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def ranks_ready(out: Path, procs: list[subprocess.Popen]) -> bool:
    """True once every rank wrote out/ready-<rank>; a rank that exited without its result fails, with its log."""
    for rank, p in enumerate(procs):
        if p.poll() is not None and not (out / f"result-{rank}.json").exists():
            log = (out / f"rank-{rank}.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"rank {rank} of {out.name} exited with {p.returncode}:\n{log}")
    return all((out / f"ready-{r}").exists() for r in range(len(procs)))
