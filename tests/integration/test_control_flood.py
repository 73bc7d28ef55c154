"""A flood on a real control topic: a genuine stop inside it is honoured, and the log stays short."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import Producer

from tensorpulse.actions import encode_action
from tensorpulse.producers.control import ControlListener
from tensorpulse.topics import control_topic

from .helpers import create_topic

pytestmark = pytest.mark.integration

JUNK = [b"[" * 5_000, b"not json", b'{"action":"stop","job":"x","ts":' + b"9" * 400 + b"}", b'{"action":[1]}']


def test_stop_inside_a_flood_is_honoured(
    kafka_bootstrap: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """6,000 malformed messages with a genuine stop in the middle: the stop arrives, in a few log lines."""
    caplog.set_level(logging.INFO, logger="tensorpulse.producers")
    job = f"flood-{unique}"
    topic = control_topic(job)
    create_topic(kafka_bootstrap, topic)
    p = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 20})
    for i in range(6_000):
        if i == 3_000:
            p.produce(topic, encode_action("stop", job, rule="R", alert_id="genuine"), job.encode())
        p.produce(topic, JUNK[i % len(JUNK)], job.encode())
        p.poll(0)
    assert p.flush(30) == 0
    listener = ControlListener(job, bootstrap=kafka_bootstrap).start()
    try:
        assert listener.stop_requested.wait(120), f"no stop after the flood; read so far: {listener.counts}"
        assert [a["alert_id"] for a in listener.actions] == ["genuine"]
        assert listener.counts["malformed"] >= 3_000
    finally:
        listener.close(5)
    mine = [r for r in caplog.records if r.name == "tensorpulse.producers"]
    assert 2 <= len(mine) <= 6, [r.getMessage() for r in mine]
