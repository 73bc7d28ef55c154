"""The lag monitor on a real broker: end offsets minus the intake group's committed offsets, per job."""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.stream.lag import LagMonitor
from tensorpulse.topics import reductions_topic

from .helpers import create_topic

pytestmark = pytest.mark.integration


def test_lag_sums_each_jobs_partitions_and_skips_a_missing_topic(kafka_bootstrap: str, unique: str) -> None:
    """Two jobs, one of two partitions: end offsets read in one request, committed offsets in another."""
    a, b, gone = f"lag-a-{unique}", f"lag-b-{unique}", f"lag-gone-{unique}"
    ta, tb = reductions_topic(a), reductions_topic(b)
    create_topic(kafka_bootstrap, ta, partitions=2)
    create_topic(kafka_bootstrap, tb)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for partition, n in ((0, 3), (1, 2)):
        for _ in range(n):
            producer.produce(ta, value=b"x", partition=partition)
    for _ in range(4):
        producer.produce(tb, value=b"x", partition=0)
    assert producer.flush(10) == 0
    group = f"g-{unique}.intake"
    committer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    committer.commit(offsets=[TopicPartition(ta, 0, 1), TopicPartition(tb, 0, 4)], asynchronous=False)
    committer.close()

    metrics = WorkerMetrics()
    monitor = LagMonitor({"bootstrap.servers": kafka_bootstrap}, group, metrics)
    jobs = {a: ta, b: tb, gone: reductions_topic(gone)}
    lag = monitor.poll(jobs, {ta: 2, tb: 1})
    # a: partition 0 read to 1 of 3, partition 1 never committed (2 waiting); b: read to its end.
    assert lag == {a: 2 + 2, b: 0}
    assert metrics.registry.get_sample_value("tensorpulse_consumer_lag", {"training_job": a}) == 4
