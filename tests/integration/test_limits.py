"""Over every limit on what jobs send, through a real worker: each excess is dropped and counted,
the worker never restarts, and a genuine fault published right after still alerts."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from corpus import _raw, good

from tensorpulse import wire
from tensorpulse.errors import LIMITS
from tensorpulse.topics import ALERTS_TOPIC, reductions_topic

from .helpers import RETENTION, metric_value, read_topic, scrape, wait_for, worker_process

pytestmark = pytest.mark.integration

BIG = 8 * 1024 * 1024  # lets a record over wire.MAX_RECORD_BYTES reach the intake, whose limit stops it
MAX_SCALARS = 16


def test_over_every_limit_then_a_fault_still_alerts(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """max_jobs=1 with two jobs, then on the job read: a 5 MiB record, 65,537 tensors, rank 5000,
    40 new scalar names; each is counted under its limit, and the NaN published next alerts."""
    job, waiting = f"limits-a-{unique}", f"limits-b-{unique}"  # by name, job a is the one read
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    new = [
        NewTopic(reductions_topic(j), 1, 1, config={**RETENTION, "max.message.bytes": str(BIG)})
        for j in (job, waiting)
    ]
    for fut in admin.create_topics(new).values():
        fut.result(10)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5, "message.max.bytes": BIG})

    def send(j: str, payload: bytes) -> None:
        producer.produce(reductions_topic(j), key=j.encode(), value=payload)

    send(waiting, good(waiting, 0, announce=True, ts=time.time()))
    send(job, good(job, 0, announce=True, ts=time.time()))
    assert producer.flush(30) == 0
    env = {
        "TENSORPULSE_MAX_JOBS": "1",
        "TENSORPULSE_MAX_SCALARS_PER_JOB": str(MAX_SCALARS),
    }
    group = f"g-{unique}"
    with worker_process(
        kafka_bootstrap, tmp_path, group=group, jobs_regex=f"^limits-[ab]-{unique}$", env=env
    ) as (
        proc,
        url,
    ):
        wait_for(
            lambda: metric_value(scrape(url), "tensorpulse_records_total", training_job=job) == 1,
            60,
            "the job's first record evaluated",
        )
        names = ["t"] * (wire.MAX_TENSORS + 1)
        send(job, _raw(job, step=1, s={"x" * (wire.MAX_RECORD_BYTES + 10): 1.0}))  # 4 MiB + 10 bytes
        send(job, _raw(job, step=2, t={"sid": 3, "names": names, "colls": names}))
        send(job, good(job, 3, announce=True, rank=5000, world=5001, ts=time.time()))
        for step in range(4, 44):  # loss and a new name each step: 41 names, 16 kept
            send(job, _raw(job, step=step, s={"loss": 1.0, f"metric_{step}": 0.5}))
        assert producer.flush(30) == 0
        fault_step = 100
        send(job, good(job, fault_step, nan=True, ts=time.time()))
        assert producer.flush(30) == 0
        published = time.monotonic()

        def alerted() -> bool:
            evs = [json.loads(m.value()) for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=0.5)]
            return any(
                e["job"] == job and e["rule"] == "ExplodingTensor" and e["step"] == fault_step for e in evs
            )

        wait_for(alerted, 60, "the ExplodingTensor alert of the fault after the over-limit input")
        print(f"\nfault -> alert read back: {time.monotonic() - published:.2f} s")

        expected = {
            "record_bytes": 1,
            "tensors_per_record": 1,
            "ranks_per_job": 1,
            "scalars_per_job": 41 - MAX_SCALARS,
            "jobs_per_worker": 1,
        }
        assert set(expected) == set(LIMITS)

        def counted(text: str) -> dict[str, float | None]:
            return {k: metric_value(text, "tensorpulse_limit_exceeded_total", limit=k) for k in expected}

        last: dict[str, float | None] = {}

        def settled() -> bool:
            last.update(counted(scrape(url)))
            return last == expected

        with contextlib.suppress(AssertionError):  # the assertion below says what was counted instead
            wait_for(settled, 30, "the limits counted")
        assert last == expected
        text = scrape(url)
        assert metric_value(text, "tensorpulse_worker_restarts_total") == 0
        assert metric_value(text, "tensorpulse_records_total", training_job=waiting) is None  # not read
        assert metric_value(text, "tensorpulse_records_total", training_job=job) == 1 + 40 + 1
        assert proc.poll() is None
    log_text = (tmp_path / f"worker-{group}.log").read_text(errors="replace")
    assert "max_jobs=1" in log_text and waiting in log_text
    assert "max_scalars_per_job" in log_text and "max_ranks_per_job" in log_text
    assert "MAX_TENSORS" in log_text and "MAX_RECORD_BYTES" in log_text
