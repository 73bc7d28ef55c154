"""The embedded Tansu broker (`tensorpulse broker`, `tensorpulse demo`) still does what the demo needs.

The rest of the suite runs on Apache Kafka; these checks keep the development broker honest on its
own: records go in and come out, and a consumer group forms with the demo's client settings.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer

from .helpers import create_topic, read_topic

pytestmark = pytest.mark.integration


def test_records_round_trip(tansu_bootstrap: str, unique: str) -> None:
    topic = f"tansu-rt-{unique}"
    create_topic(tansu_bootstrap, topic)
    producer = Producer({"bootstrap.servers": tansu_bootstrap, "linger.ms": 5})
    for i in range(100):
        producer.produce(topic, value=str(i).encode())
    assert producer.flush(10) == 0
    got = sorted(int(m.value()) for m in read_topic(tansu_bootstrap, topic, timeout=1))
    assert got == list(range(100))


def test_consumer_group_forms(tansu_bootstrap: str, unique: str) -> None:
    """A group member gets its partition: Tansu joins take about session.timeout.ms / 2, so it is short."""
    topic = f"tansu-grp-{unique}"
    create_topic(tansu_bootstrap, topic)
    producer = Producer({"bootstrap.servers": tansu_bootstrap})
    producer.produce(topic, value=b"x")
    assert producer.flush(10) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": tansu_bootstrap,
            "group.id": f"g-{unique}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        msg = None
        while msg is None or msg.error() is not None:
            assert time.monotonic() < deadline, "no record through a consumer group within 30 s"
            msg = consumer.poll(0.5)
        assert msg.value() == b"x"
    finally:
        consumer.close()
