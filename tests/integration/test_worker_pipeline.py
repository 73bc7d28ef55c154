"""A `tensorpulse stream` process against a real broker: alerts, dead letters, metrics, job end."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from confluent_kafka import Producer

from tensorpulse import wire
from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC, DEADLETTER_TOPIC, reductions_topic

from .helpers import (
    committed_past,
    create_topic,
    metric_value,
    read_topic,
    scrape,
    train_record,
    wait_for,
    worker_process,
)

pytestmark = pytest.mark.integration

NAMES = ["fc.weight", "fc.bias", "gradient/fc.weight", "gradient/fc.bias"]
COLLS = ["weights", "biases", "gradients", "gradients"]


def _record(job: str, step: int, *, nan: int = 0, announce: bool = False, loss: float | None = None) -> bytes:
    k = len(NAMES)
    rng = np.random.default_rng(step)
    floats = np.column_stack(
        [
            rng.normal(0, 0.01, k),
            0.1 + rng.random(k) * 0.01,
            -np.ones(k),
            np.ones(k),
            0.05 + rng.random(k) * 0.01,
        ]
    ).astype(np.float32)
    nans = np.zeros(k, dtype=np.int64)
    nans[2] = nan
    if nan:  # NaN propagates into the statistics, as it does in a real hook; rule state must keep it
        floats[2, :] = np.nan
    block = wire.TensorBlock(NAMES, COLLS, np.full(k, 1000), floats, np.zeros(k, dtype=np.int64), nan=nans)
    return train_record(
        job,
        step,
        seq=step,
        scalars={"loss": 2.0 * math.exp(-step / 20) if loss is None else loss},
        tensors=block,
        announce=announce,
    )


def test_worker_alerts_dead_letters_and_metrics(kafka_bootstrap: str, unique: str, tmp_path) -> None:
    """Valid records are evaluated (one firing and one resolved event), bad ones dead-lettered and counted."""
    job = f"wk-{unique}"
    topic = reductions_topic(job)
    create_topic(kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    bad = [
        (b"\x93\x01", "not_msgpack"),
        (_record(job, 3).replace(b"\xa1v\x01", b"\xa1v\x07"), "unknown_version"),
    ]
    with worker_process(kafka_bootstrap, tmp_path, group=f"g-{unique}", jobs_regex=f"^{job}$") as (proc, url):
        for step in range(40):
            payload = _record(job, step, announce=step == 0, nan=64 if step == 30 else 0)
            producer.produce(topic, key=job.encode(), value=payload)
            if step == 10:
                for raw, _ in bad:
                    producer.produce(topic, key=job.encode(), value=raw)
        producer.flush(10)

        def alerts():
            evs = [
                AlertEvent.from_json(m.value()) for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1)
            ]
            evs = [e for e in evs if e.job == job]
            return evs if len(evs) >= 2 else None

        wait_for(alerts, 60, "a firing and a resolved ExplodingTensor event")
        # Once the worker has committed past all 40 records, every alert it raised on them is on the
        # topic: a rule that fired on a later step cannot be missed by reading too early.
        wait_for(
            lambda: committed_past(kafka_bootstrap, f"g-{unique}", job), 60, "the worker to commit past the job"
        )
        events = alerts()
        exploding = [e for e in events if e.rule == "ExplodingTensor"]
        assert [(e.status, e.step) for e in exploding] == [("firing", 30), ("resolved", 31)]
        assert exploding[0].tensors == ("gradient/fc.weight",) and exploding[0].severity == "critical"
        assert {e.rule for e in events} == {"ExplodingTensor"}, "a healthy stream raised another rule"

        dead = [json.loads(m.value()) for m in read_topic(kafka_bootstrap, DEADLETTER_TOPIC, timeout=1)]
        dead = [d for d in dead if d["job"] == job]
        assert sorted(d["reason"] for d in dead) == sorted(r for _, r in bad)
        assert all(d["topic"] == topic and d["offset"] >= 0 for d in dead)

        def all_counted():
            text = scrape(url)
            return text if metric_value(text, "tensorpulse_records_total", training_job=job) == 40 else None

        text = wait_for(all_counted, 20, "40 records counted in /metrics")
        assert metric_value(text, "tensorpulse_decode_errors_total", reason="not_msgpack") >= 1
        assert metric_value(text, "tensorpulse_rule_firing", training_job=job, rule="ExplodingTensor") == 0
        assert (
            metric_value(text, "tensorpulse_tensor_stat", training_job=job, tensor="gradient/fc.weight", stat="nan")
            == 0
        )
        assert metric_value(text, "tensorpulse_last_step", training_job=job, mode="train") == 39
        assert metric_value(text, "tensorpulse_publish_to_eval_seconds_count", training_job=job) == 40

        def lag_reported():
            return metric_value(scrape(url), "tensorpulse_consumer_lag", training_job=job)

        # Every record is evaluated (above): the lag the worker reports comes down to 0.
        wait_for(lambda: lag_reported() == 0, 20, "the consumer lag gauge to read 0")

        end = wire.encode(job=job, rank=0, world=1, step=40, mode="train", ts=time.time(), kind="end")
        producer.produce(topic, key=job.encode(), value=end)
        producer.flush(10)
        wait_for(lambda: f'training_job="{job}"' not in scrape(url), 20, "the finished job's series to disappear")
        assert proc.poll() is None
