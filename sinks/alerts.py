"""Reading the alerts topic: the contract every downstream consumer (CLI, webhooks, Alertmanager) uses."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from tensorpulse.errors import DecodeError
from tensorpulse.events import AlertEvent
from tensorpulse.kafka import client_config
from tensorpulse.topics import ALERTS_TOPIC

log = logging.getLogger("tensorpulse.sinks")


def read_alerts(
    bootstrap: str | None = None,
    *,
    job: str | None = None,
    follow: bool = False,
    idle_timeout: float = 3.0,
    from_beginning: bool = True,
    kafka_config: dict[str, Any] | None = None,
    topic: str = ALERTS_TOPIC,
    stop: threading.Event | None = None,
) -> Iterator[AlertEvent]:
    """Yield alert events (committed ones only: read_committed).

    Without `follow`, stops once nothing new arrived for `idle_timeout` seconds after reaching the
    end; `stop` ends a follow from another thread. No consumer group is joined: partitions are assigned directly, so reading is instant and
    leaves no offsets behind.
    """
    conf = client_config(
        bootstrap,
        {
            "group.id": f"tensorpulse-alerts-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
            **(kafka_config or {}),
        },
    )
    consumer = Consumer(conf)
    try:
        deadline = time.monotonic() + 10
        while True:
            meta = consumer.list_topics(topic, timeout=5)
            t = meta.topics.get(topic)
            if t is not None and t.error is None and t.partitions:
                break
            if (not follow and time.monotonic() > deadline) or (stop is not None and stop.is_set()):
                return  # no alerts topic yet: no alert was ever raised
            time.sleep(0.5)
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in t.partitions]
        if not from_beginning:
            parts = []
            for p in t.partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
                parts.append(TopicPartition(topic, p, high))
        consumer.assign(parts)
        last = time.monotonic()
        while stop is None or not stop.is_set():
            msgs = consumer.consume(500, 0.02)  # returns at the timeout when fewer: keep it short
            for m in msgs:
                if m.error():
                    if m.error().fatal():
                        raise KafkaException(m.error())
                    continue
                try:
                    ev = AlertEvent.from_json(m.value())
                except DecodeError as exc:
                    log.warning(
                        "skipping a malformed message at %s[%d]@%d: %s", topic, m.partition(), m.offset(), exc
                    )
                    continue
                if job is None or ev.job == job:
                    yield ev
            if msgs:
                last = time.monotonic()
            elif not follow and time.monotonic() - last > idle_timeout:
                return
    finally:
        consumer.close()
