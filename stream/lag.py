"""Consumer lag per job: high watermark minus the group's committed offset, summed over partitions."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from tensorpulse.sinks.prometheus import WorkerMetrics

log = logging.getLogger("tensorpulse.stream")


class LagMonitor:
    """Reads committed offsets of the worker group from a side consumer that never joins it."""

    def __init__(self, base_config: dict[str, Any], group: str, metrics: WorkerMetrics) -> None:
        self._conf = {
            **base_config,
            "group.id": group,
            "enable.auto.commit": False,
            "client.id": f"tensorpulse-lag-{uuid.uuid4().hex[:6]}",
        }
        self._consumer: Consumer | None = None
        self.metrics = metrics

    def poll(self, jobs: dict[str, str], timeout: float = 5.0) -> dict[str, int]:
        """Update the lag gauges; returns job -> lag (jobs that could not be read are skipped)."""
        try:
            if self._consumer is None:
                self._consumer = Consumer(self._conf)
            c = self._consumer
            meta = c.list_topics(timeout=timeout)
            parts = [
                TopicPartition(topic, p)
                for topic in jobs.values()
                if topic in meta.topics
                for p in meta.topics[topic].partitions
            ]
            if not parts:
                return {}
            committed = c.committed(parts, timeout=timeout)
            topic_job = {t: j for j, t in jobs.items()}
            out: dict[str, int] = {}
            for tp in committed:
                _, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout)
                done = tp.offset if tp.offset >= 0 else 0
                job = topic_job[tp.topic]
                out[job] = out.get(job, 0) + max(high - done, 0)
            for job, lag in out.items():
                self.metrics.set_lag(job, lag)
            return out
        except Exception as exc:
            log.debug("lag poll failed: %s", exc)
            return {}
