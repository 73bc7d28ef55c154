"""SIGKILL a worker mid-stream: nothing lost, nothing duplicated; a dead worker's jobs move on.

The expected alerts are computed offline by the same JobEvaluator over the same records (the
batch reference). A read_committed consumer that de-duplicates by nothing must see exactly that
list after a worker is killed with SIGKILL halfway and a new one starts with an empty state
directory, so its rule state can only come back from the changelog topic.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from tensorpulse import wire
from tensorpulse.rules.config import load_rules
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.topics import ALERTS_TOPIC, reductions_topic

from .helpers import (
    committed_past,
    create_topic,
    read_topic,
    train_record,
    wait_for,
    worker_process,
    worker_records,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = """\
rules:
  - rule: ExplodingTensor
  - rule: UnchangedTensor
"""
NAMES, COLLS = ["fc.weight", "gradient/fc.weight"], ["weights", "gradients"]


def _record(job: str, step: int) -> bytes:
    """NaN gradients at steps ≡ 20 (mod 40); weights frozen for steps ≡ 50..54 (mod 100)."""
    frozen = 50 <= step % 100 <= 54
    w = 0.5 if frozen else 0.5 + step * 1e-3
    floats = np.array([[w, 0.1, w - 1, w + 1, abs(w)], [0.0, 0.01, -0.03, 0.03, 0.008]], np.float32)
    nans = np.zeros(2, np.int64)
    if step % 40 == 20:
        floats[1] = np.nan
        nans[1] = 3
    block = wire.TensorBlock(NAMES, COLLS, np.array([64, 64]), floats, np.zeros(2, np.int64), nan=nans)
    return train_record(job, step, seq=step, tensors=block, announce=step % 100 == 0)


def _expected(payloads: list[bytes], rules: Path) -> list[str]:
    evaluator, schemas, state, ids = JobEvaluator(load_rules(rules)), wire.SchemaCache(), None, []
    for p in payloads:
        state, transitions = evaluator.process(state, wire.decode(p, schemas))
        ids += [t.event.id for t in transitions]
    return ids


def _alert_ids(bootstrap: str, job: str) -> list[str]:
    docs = [json.loads(m.value()) for m in read_topic(bootstrap, ALERTS_TOPIC, timeout=1)]
    return [d["id"] for d in docs if d["job"] == job]


def test_sigkill_mid_stream_loses_and_duplicates_nothing(kafka_bootstrap: str, unique: str, tmp_path: Path):
    job, n = f"kill-{unique}", 4000
    topic = reductions_topic(job)
    create_topic(kafka_bootstrap, topic)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    payloads = [_record(job, s) for s in range(n)]
    expected = _expected(payloads, rules)
    assert len(expected) > 150 and len(set(expected)) == len(expected)

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    for p in payloads:
        producer.produce(topic, key=job.encode(), value=p)
    assert producer.flush(30) == 0

    group = f"g-{unique}"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    same = ["--worker-id", "w1"]  # the same worker coming back (e.g. a rescheduled StatefulSet pod)
    with worker_process(
        kafka_bootstrap, first, group=group, rules=rules, jobs_regex=f"^{job}$", extra=same
    ) as (proc, url):
        wait_for(
            lambda: worker_records(url, job) >= n // 2,
            120,
            "the first worker to get halfway",
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    before = _alert_ids(kafka_bootstrap, job)
    assert 0 < len(before) < len(expected), "the kill did not land mid-stream"

    # A new process with an empty state directory: rule state can only come from the changelog.
    with worker_process(kafka_bootstrap, second, group=group, rules=rules, jobs_regex=f"^{job}$", extra=same):
        wait_for(
            lambda: len(_alert_ids(kafka_bootstrap, job)) >= len(expected),
            180,
            f"all {len(expected)} alerts after the restart",
        )
        # A duplicate would come from records evaluated again: once the worker committed past the
        # last one (its alerts go in the same transaction), every alert it will write is readable.
        wait_for(
            lambda: committed_past(kafka_bootstrap, group, job),
            60,
            "the worker to commit past the last record",
        )
    got = _alert_ids(kafka_bootstrap, job)
    dupes = [i for i, c in collections.Counter(got).items() if c > 1]
    assert not dupes, f"{len(dupes)} alert(s) delivered twice"
    assert got == expected, "alerts lost or out of order"
    print(f"SIGKILL after {len(before)} of {len(expected)} alerts; all delivered exactly once")


def test_killed_workers_jobs_move_to_the_other_worker(kafka_bootstrap: str, unique: str, tmp_path: Path):
    job = f"move-{unique}"
    topic = reductions_topic(job)
    create_topic(kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    for s in range(10):
        producer.produce(topic, key=job.encode(), value=_record(job, s))
    producer.flush(10)
    group, a_dir, b_dir = f"g-{unique}", tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    with (
        worker_process(kafka_bootstrap, a_dir, group=group, jobs_regex=f"^{job}$") as (proc_a, url_a),
        worker_process(kafka_bootstrap, b_dir, group=group, jobs_regex=f"^{job}$") as (proc_b, url_b),
    ):

        def owner():
            for proc, url in ((proc_a, url_a), (proc_b, url_b)):
                if worker_records(url, job):
                    return proc, url
            return None

        owner_proc, _ = wait_for(owner, 60, "one of the two workers to take the job")
        survivor_url = url_b if owner_proc is proc_a else url_a
        os.killpg(owner_proc.pid, signal.SIGKILL)
        owner_proc.wait(10)
        killed = time.monotonic()
        for s in range(10, 30):
            producer.produce(topic, key=job.encode(), value=_record(job, s))
        producer.flush(10)
        wait_for(
            lambda: worker_records(survivor_url, job) >= 20,
            60,
            "the surviving worker to take over the job",
        )
        moved = time.monotonic() - killed
        print(f"job moved to the surviving worker {moved:.1f}s after SIGKILL (session timeout 6 s)")
        # The survivor's records are counted when evaluated; its alerts are readable once the
        # transaction that holds them commits, a moment later.
        wait_for(
            lambda: any(
                json.loads(m.value())["step"] == 20
                for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1)
                if json.loads(m.value())["job"] == job
            ),
            30,
            "the surviving worker's alert at step 20",
        )
