"""What a crashed worker already published: fence it, then read the alerts it left behind.

Exactly-once on Kafka rests on two broker duties: a new producer with the same transactional id
aborts the transaction its crashed predecessor left open, and read_committed consumers never
see aborted records. Apache Kafka does both. The test broker (Tansu 0.6) does neither: it shows
aborted records to read_committed consumers, and a fenced transaction's records become visible
while the consumer offsets sent with it do not (measured here). A restarted worker then
re-processes records whose alerts are already visible and would publish them twice.

So a worker, before it starts, (1) fences its former self by initialising a transactional
producer with its own stable transactional id, and (2) reads the tail of the alerts topic
(read_committed) and remembers the alert ids it finds. Alert ids are deterministic (job, rule,
rank, mode, status, step), so re-emitting one of those is a redelivery, and the worker drops it.
On Apache Kafka step (2) finds nothing of the aborted transaction and changes nothing; on
brokers with weaker transactions it turns redelivery into exactly-once for what the tail holds.
A crashed worker's open transaction is at most one commit interval of output, so a tail of
`tail` alerts per partition is plenty.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

log = logging.getLogger("tensorpulse.stream")

#: Consumer groups of the start-up scan of the alerts topic: this, then a random suffix.
SCAN_GROUP_PREFIX = "tensorpulse-scan-"


def fence(base_config: dict[str, Any], transactional_id: str, timeout: float = 15.0) -> None:
    """Take over `transactional_id`: the broker must end any transaction its last owner left open."""
    producer = Producer({**base_config, "transactional.id": transactional_id})
    producer.init_transactions(timeout)
    producer.flush(1)


class PublishedAlerts:
    """A bounded set of alert ids already on the alerts topic."""

    def __init__(self, max_ids: int = 200_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.max_ids = max_ids
        self.suppressed = 0

    def __contains__(self, alert_id: object) -> bool:
        return alert_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, alert_id: str) -> None:
        self._ids[alert_id] = None
        self._ids.move_to_end(alert_id)
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)

    def scan(self, base_config: dict[str, Any], topic: str, *, tail: int = 20_000, timeout: float = 10.0) -> int:
        """Read the last `tail` committed alerts of every partition of `topic`; return how many ids."""
        consumer = Consumer(
            {
                **base_config,
                "group.id": f"{SCAN_GROUP_PREFIX}{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            }
        )
        found = 0
        try:
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            if meta is None or meta.error is not None:
                return 0
            assignment = []
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                if high > low:
                    assignment.append(TopicPartition(topic, p, max(low, high - tail)))
            if not assignment:
                return 0
            consumer.assign(assignment)
            remaining = {tp.partition for tp in assignment}
            deadline = time.monotonic() + timeout
            while remaining and time.monotonic() < deadline:
                for m in consumer.consume(1000, 0.2):
                    err = m.error()
                    if err is not None:
                        if err.code() == err._PARTITION_EOF:
                            remaining.discard(m.partition())
                        continue
                    try:
                        alert_id = json.loads(m.value()).get("id")
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(alert_id, str):
                        self.add(alert_id)
                        found += 1
            if remaining:
                log.warning(
                    "alerts topic %s: partitions %s not read to the end within %.0fs", topic, remaining, timeout
                )
        finally:
            consumer.close()
        return found

