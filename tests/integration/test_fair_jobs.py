"""A job with a backlog does not hold back another job's records (stream/flow.py), on a real broker."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from tensorpulse import wire
from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC, group_topic, reductions_topic

from .helpers import create_topic, metric_value, read_topic, scrape, wait_for, worker_process

pytestmark = pytest.mark.integration

STEPS_PARTITIONS = 12  # the worker's default `partitions`
MAX_AHEAD = 50
RANKS, STEPS = 64, 60
TOTAL = RANKS * STEPS  # the big job's backlog: 3,840 records, 77 times the allowance


def _record(job: str, rank: int, world: int, step: int, nan: bool = False) -> bytes:
    floats = np.tile(np.array([0.0, 0.1, -0.3, 0.3, 0.08], dtype=np.float32), (2, 1))
    nans = np.zeros(2, dtype=np.int64)
    if nan:
        floats[1, :] = np.nan
        nans[1] = 3
    block = wire.TensorBlock(
        ["fc.weight", "gradient/fc.weight"],
        ["weights", "gradients"],
        np.full(2, 100),
        floats,
        np.zeros(2, dtype=np.int64),
        nan=nans,
    )
    return wire.encode(
        job=job, rank=rank, world=world, step=step, mode="train", ts=time.time(), seq=step, tensors=block,
        announce=step == 0,
    )  # fmt: skip


def _sharing_names(unique: str) -> tuple[str, str]:
    """Two job ids whose records share a steps partition (librdkafka's partitioner: crc32(key) % n),
    so that only the order in which the intake copies them decides which is evaluated first."""
    big = f"fair-big-{unique}"
    i = 0
    while (
        zlib.crc32(f"fair-bys{i}-{unique}".encode()) % STEPS_PARTITIONS
        != zlib.crc32(big.encode()) % STEPS_PARTITIONS
    ):
        i += 1
    return big, f"fair-bys{i}-{unique}"


def _copies(bootstrap: str, group: str, partition: int) -> int:
    """Records on the steps topic's `partition` so far (its high watermark; 0 before it exists)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"watch-{group}"})
    try:
        return c.get_watermark_offsets(TopicPartition(group_topic("steps", group), partition), timeout=5)[1]
    except KafkaException:
        return 0
    finally:
        c.close()


def test_bystander_is_evaluated_before_a_big_jobs_backlog(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """A big job publishes 3,840 records at once; once the intake copies them, a bystander publishes a
    NaN. The bystander's copy lands behind at most the allowance and what was evaluated meanwhile,
    not behind the whole backlog (where an intake that copies all it reads puts it), it alerts, and
    every record of the big job is still evaluated exactly once despite the pauses and seeks."""
    big, bys = _sharing_names(unique)
    partition = zlib.crc32(big.encode()) % STEPS_PARTITIONS
    for job in (big, bys):
        create_topic(kafka_bootstrap, reductions_topic(job))
    group = f"fair-{unique}"
    env = {"TENSORPULSE_MAX_AHEAD_PER_JOB": str(MAX_AHEAD)}
    regex = f"^fair-.*{unique}$"
    with worker_process(kafka_bootstrap, tmp_path, group=group, jobs_regex=regex, env=env) as (_, url):

        def evaluated(job: str) -> float:
            return metric_value(scrape(url), "tensorpulse_records_total", training_job=job) or 0.0

        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
        for step in range(STEPS):
            for rank in range(RANKS):
                producer.produce(
                    reductions_topic(big), key=big.encode(), value=_record(big, rank, RANKS, step)
                )
            producer.poll(0)
        assert producer.flush(30) == 0
        wait_for(
            lambda: _copies(kafka_bootstrap, group, partition) >= MAX_AHEAD, 60, "the big job's first copies"
        )
        producer.produce(reductions_topic(bys), key=bys.encode(), value=_record(bys, 0, 1, 0, nan=True))
        assert producer.flush(30) == 0
        wait_for(lambda: evaluated(bys) >= 1 and evaluated(big) >= TOTAL, 180, "every record evaluated")
        assert evaluated(big) == TOTAL  # none lost to the pauses and seeks, none twice
    alerts = [AlertEvent.from_json(m.value()) for m in read_topic(kafka_bootstrap, ALERTS_TOPIC)]
    assert any(a.job == bys and a.status == "firing" for a in alerts), "the bystander's NaN raised no alert"
    # The processor evaluates the shared steps partition in offset order: the copies' order is the
    # order of evaluation.
    copies = [m for m in read_topic(kafka_bootstrap, group_topic("steps", group)) if m.value()]
    assert {m.partition() for m in copies} == {partition}
    order = [m.key() for m in sorted(copies, key=lambda m: m.offset())]
    assert order.count(big.encode()) == TOTAL
    before = order.index(bys.encode())
    assert before <= TOTAL // 2, (
        f"the bystander's record was evaluated after {before} of the big job's {TOTAL}"
    )
