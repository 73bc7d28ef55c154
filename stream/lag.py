"""Consumer lag per job: high watermark minus the intake's committed offset, summed over partitions.

Two requests a poll whatever the number of jobs: the committed offsets of every job partition in
one OffsetFetch, the high watermarks in one ListOffsets (the admin client's `list_offsets`). The
partitions come from the intake's own listing (`JobDiscovery.partitions`). Before, each poll listed
the cluster's topics again and asked for each partition's watermarks in a request of its own: with
1,000 jobs, 1,000 round trips and a listing of every topic every `lag_interval`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from tensorpulse.sinks.prometheus import WorkerMetrics

log = logging.getLogger("tensorpulse.stream")


class LagMonitor:
    """Reads committed offsets of the intake's group from a side consumer that never joins it."""

    def __init__(self, base_config: dict[str, Any], group: str, metrics: WorkerMetrics) -> None:
        self._base = base_config
        self._conf = {
            **base_config,
            "group.id": group,
            "enable.auto.commit": False,
            "client.id": f"tensorpulse-lag-{uuid.uuid4().hex[:6]}",
        }
        self._consumer: Consumer | None = None
        self._admin: AdminClient | None = None
        self.metrics = metrics

    def poll(
        self, jobs: Mapping[str, str], partitions: Mapping[str, int], timeout: float = 5.0
    ) -> dict[str, int]:
        """Update the lag gauges of `jobs` (job -> topic), whose topics have `partitions` (topic ->
        count; 1 where absent); returns job -> lag (jobs that could not be read are skipped)."""
        try:
            if self._consumer is None:
                self._consumer = Consumer(self._conf)
                self._admin = AdminClient(self._base)
            assert self._admin is not None
            parts = [
                TopicPartition(topic, p) for topic in jobs.values() for p in range(partitions.get(topic, 1))
            ]
            if not parts:
                return {}
            committed = self._consumer.committed(parts, timeout=timeout)
            futures = self._admin.list_offsets(
                {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in parts},
                request_timeout=timeout,
            )
            high: dict[tuple[str, int], int] = {}
            for tp, fut in futures.items():
                try:
                    high[(tp.topic, tp.partition)] = fut.result().offset
                except Exception as exc:  # a topic deleted meanwhile: its job is skipped
                    log.debug("lag: end offset of %s[%d]: %s", tp.topic, tp.partition, exc)
            topic_job = {t: j for j, t in jobs.items()}
            out: dict[str, int] = {}
            for tp in committed:
                end = high.get((tp.topic, tp.partition))
                if end is None or tp.error is not None:
                    continue
                done = tp.offset if tp.offset >= 0 else 0
                job = topic_job[tp.topic]
                out[job] = out.get(job, 0) + max(end - done, 0)
            for job, lag in out.items():
                self.metrics.set_lag(job, lag)
            return out
        except Exception as exc:
            log.debug("lag poll failed: %s", exc)
            return {}
