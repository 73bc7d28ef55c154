"""The intake's source consumer made anew for more partitions (stream/source.py) loses no record."""

from __future__ import annotations

import logging
import re
import threading

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tensorpulse.stream import source
from tensorpulse.stream.intake import SOURCE_HEADER, Intake, IntakeConfig
from tensorpulse.topics import reductions_topic

from .helpers import create_topic, wait_for

pytestmark = pytest.mark.integration


def test_a_new_source_consumer_for_more_partitions_copies_every_record(
    kafka_bootstrap: str, unique: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two jobs read, then four more (the scale, one per 2 partitions here, goes from 1 to up to 3): every
    record of the six jobs, before and after the new consumer, is copied to the steps topic."""
    monkeypatch.setattr(source, "FETCH_SCALE_PARTITIONS", 2)
    config = IntakeConfig(
        group=f"g-{unique}", topic_prefix="tensorpulse.", jobs_regex=f"^rs-{unique}-", shards=1,
        discovery_interval=0.1, max_record_bytes=1 << 20, topic_config={}, replication_factor=1,
        tick_interval=None, tick_horizon=60.0,
    )  # fmt: skip
    intake = Intake(config, {"bootstrap.servers": kafka_bootstrap})
    intake.create_topics(1)
    jobs = [f"rs-{unique}-{i}" for i in range(6)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    sent: set[tuple[str, int]] = set()

    def publish(some: list[str], n: int) -> None:
        for job in some:
            create_topic(kafka_bootstrap, reductions_topic(job))
            for _ in range(n):
                producer.produce(reductions_topic(job), key=job.encode(), value=b"r")
        assert producer.flush(10) == 0
        for job in some:
            low, high = reader.get_watermark_offsets(TopicPartition(reductions_topic(job), 0), timeout=10)
            sent.update((job, o) for o in range(low, high))

    copied: set[tuple[str, int]] = set()
    reader = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"r-{unique}", "auto.offset.reset": "earliest"}
    )
    reader.subscribe([config.steps_topic])

    def all_copied() -> bool:
        for m in reader.consume(500, timeout=0.2):
            if m.error() is None:
                src = dict(m.headers() or ())[SOURCE_HEADER].decode()
                copied.add((m.key().decode(), int(src.partition(":")[2])))
        return copied >= sent

    stop = threading.Event()
    thread = threading.Thread(target=intake.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.INFO, logger="tensorpulse.stream"):
        thread.start()
        try:
            publish(jobs[:2], 5)
            wait_for(all_copied, 60, "the first two jobs' records copied")
            publish(jobs, 5)  # four new jobs, and more records of the first two
            wait_for(all_copied, 60, "every record of the six jobs copied")
        finally:
            stop.set()
            thread.join(20)
            reader.close()
    # Once or more (the listing may find the four new jobs apart): 3 to 6 partitions, 30 to 60 ms.
    assert re.search(r"reading [3-6] partitions; fetches wait up to [3-6]0 ms", caplog.text), caplog.text
