"""A running worker picks up jobs that start after it, and keeps its state across a restart."""

from __future__ import annotations

import time

import numpy as np
import pytest
from confluent_kafka import Producer

from tensorpulse import wire
from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC, reductions_topic

from .helpers import (
    committed_past,
    create_topic,
    metric_value,
    read_topic,
    scrape,
    train_record,
    wait_for,
    worker_process,
    worker_records,
)

pytestmark = pytest.mark.integration


def _weights_record(job: str, step: int, value: float) -> bytes:
    """One tensor whose statistics are all `value`: constant across steps means unchanged."""
    floats = np.array([[value, 0.5, value - 1, value + 1, abs(value)]], dtype=np.float32)
    block = wire.TensorBlock(["fc.weight"], ["weights"], np.array([100]), floats, np.array([0]))
    return train_record(
        job,
        step,
        tensors=block,
        scalars={"loss": 1.0 / (step + 1)},
    )


def test_new_job_is_picked_up_while_running(kafka_bootstrap: str, unique: str, tmp_path) -> None:
    """A job whose topic appears after the worker started is evaluated without a restart."""
    first, second = f"disc-{unique}-a", f"disc-{unique}-b"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    create_topic(kafka_bootstrap, reductions_topic(first))
    with worker_process(kafka_bootstrap, tmp_path, group=f"g-{unique}", jobs_regex=f"^disc-{unique}-") as (
        _,
        url,
    ):
        producer.produce(reductions_topic(first), key=first.encode(), value=_weights_record(first, 0, 1.0))
        producer.flush(10)
        wait_for(lambda: worker_records(url, first) == 1, 60, "first job")
        create_topic(kafka_bootstrap, reductions_topic(second))
        t0 = time.monotonic()
        producer.produce(reductions_topic(second), key=second.encode(), value=_weights_record(second, 0, 1.0))
        producer.flush(10)
        wait_for(lambda: worker_records(url, second) == 1, 30, "second job")
        print(f"new job evaluated {time.monotonic() - t0:.1f}s after its first record")
        assert metric_value(scrape(url), "tensorpulse_jobs") == 2


def test_rule_state_survives_a_worker_restart(kafka_bootstrap: str, unique: str, tmp_path) -> None:
    """UnchangedTensor counts equal steps across a restart: 2 steps before it, 1 after, fires at the 3rd."""
    job = f"restart-{unique}"
    topic = reductions_topic(job)
    create_topic(kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    group = f"g-{unique}"

    def unchanged_alerts() -> list[AlertEvent]:
        evs = [AlertEvent.from_json(m.value()) for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1)]
        return [e for e in evs if e.job == job and e.rule == "UnchangedTensor"]

    record0 = wire.encode(
        job=job,
        rank=0,
        world=1,
        step=0,
        mode="train",
        ts=time.time(),
        tensors=wire.TensorBlock(
            ["fc.weight"],
            ["weights"],
            np.array([100]),
            np.array([[0.0, 1.0, -2.0, 2.0, 0.8]], np.float32),
            np.array([0]),
        ),
    )
    producer.produce(topic, key=job.encode(), value=record0)
    for step in (1, 2):
        producer.produce(topic, key=job.encode(), value=_weights_record(job, step, 3.0))
    producer.flush(10)
    with worker_process(kafka_bootstrap, tmp_path, group=group, jobs_regex=f"^{job}$") as (_, url):
        wait_for(lambda: worker_records(url, job) == 3, 60, "3 records")
        # Its rule state is committed with its position: wait for the position.
        wait_for(
            lambda: committed_past(kafka_bootstrap, group, job), 30, "the worker to commit the 3 records"
        )
    assert unchanged_alerts() == [], "fired after only 2 equal steps"
    # New process, same group and state dir: state comes back (local RocksDB or changelog).
    producer.produce(topic, key=job.encode(), value=_weights_record(job, 3, 3.0))
    producer.flush(10)
    with worker_process(kafka_bootstrap, tmp_path, group=group, jobs_regex=f"^{job}$") as (_, url):
        events = wait_for(unchanged_alerts, 60, "UnchangedTensor to fire after the restart")
        assert [(e.status, e.step) for e in events] == [("firing", 3)]
        assert worker_records(url, job) == 1, "old records were replayed"
