"""A replicated topic on a three-node Apache Kafka cluster survives the SIGKILL of a partition leader.

This is the guarantee the pipeline's durability rests on (replication 3, min.insync.replicas 2,
acks=all, an idempotent producer): every record acknowledged before, during and after the crash
is in the log exactly once. It also checks that deploy/kafka/kafka_local.py really builds a
cluster: three brokers in the metadata, a leader that fails over, a killed node that comes back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from .helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS = 30_000
KILL_AFTER = 5_000  # acknowledged records before the leader dies
PARTITIONS = 3


def _leaders(admin: AdminClient, topic: str) -> dict[int, int]:
    """Partition → leader node id, as the cluster's metadata says now."""
    meta = admin.list_topics(topic, timeout=10).topics[topic]
    return {p: part.leader for p, part in meta.partitions.items()}


def _full_isr(admin: AdminClient, topic: str) -> bool:
    """Every partition has all three replicas in sync."""
    meta = admin.list_topics(topic, timeout=10).topics[topic]
    return all(len(part.isrs) == 3 for part in meta.partitions.values())


def test_acked_records_survive_a_leader_sigkill_exactly_once(
    kafka_cluster: Callable[[int], Any], unique: str
) -> None:
    t0 = time.monotonic()
    cluster = kafka_cluster(3)
    print(f"three nodes up in {cluster.started_s:.1f}s")
    bootstrap = cluster.bootstrap
    admin = AdminClient({"bootstrap.servers": bootstrap})
    assert len(admin.list_topics(timeout=10).brokers) == 3

    topic = f"ha-{unique}"
    new = NewTopic(topic, PARTITIONS, 3, config={"min.insync.replicas": "2"})
    admin.create_topics([new])[topic].result(30)
    wait_for(lambda: all(n > 0 for n in _leaders(admin, topic).values()), 30, "leaders of every partition")
    victim_id = _leaders(admin, topic)[0]

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": 60_000,
        }
    )
    acked: list[int] = []
    failed: list[KafkaError] = []

    def report(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failed.append(err)
        else:
            acked.append(int(msg.value()))

    killed_at = None
    for i in range(RECORDS):
        while True:
            try:
                producer.produce(topic, value=str(i).encode(), partition=i % PARTITIONS, on_delivery=report)
                break
            except BufferError:  # local queue full: wait for delivery reports, not for time
                producer.poll(0.1)
        producer.poll(0)
        if killed_at is None and i >= KILL_AFTER:
            while len(acked) < KILL_AFTER and not failed:  # the crash must hit acknowledged data
                producer.poll(0.1)
            cluster.kill(victim_id - 1)
            killed_at = time.monotonic()
    assert producer.flush(60) == 0, "records still unacknowledged 60 s after the last produce"
    print(
        f"all {RECORDS} acknowledged {time.monotonic() - killed_at:.1f}s after the SIGKILL of node {victim_id}"
    )
    assert not failed, failed[:5]
    assert sorted(acked) == list(range(RECORDS))

    new_leader = _leaders(admin, topic)[0]
    assert new_leader not in (victim_id, -1), f"partition 0 still led by {new_leader}"

    got = _read_all(bootstrap, topic, RECORDS)
    counts = Counter(got)
    assert not [v for v, n in counts.items() if n > 1], "duplicates in the log"
    assert set(counts) == set(range(RECORDS)), (
        f"{RECORDS - len(set(counts) & set(range(RECORDS)))} records lost"
    )

    # The dead node comes back on its data and catches up: full ISR again.
    cluster.start_node(victim_id - 1)
    wait_for(lambda: _full_isr(admin, topic), 30, "the restarted node back in every ISR")
    print(f"test done in {time.monotonic() - t0:.1f}s")


def _read_all(bootstrap: str, topic: str, expected: int) -> list[int]:
    """Every record of `topic`, read until each partition's end offset (no group, no guessing)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{topic}", "enable.auto.commit": False})
    try:
        ends = {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)
        }
        assert sum(ends.values()) == expected, (
            f"log holds {sum(ends.values())} records, {expected} were acked"
        )
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        out: list[int] = []
        done: set[int] = {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + 30
        while len(done) < PARTITIONS:
            assert time.monotonic() < deadline, f"read {len(out)} of {expected} records in 30 s"
            for m in c.consume(5000, 0.5):
                if m.error() is not None:
                    continue
                out.append(int(m.value()))
                if m.offset() + 1 >= ends[m.partition()]:
                    done.add(m.partition())
        return out
    finally:
        c.close()
