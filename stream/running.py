"""The stream workers already running on a cluster, seen from outside through the Admin API.

Why: two worker groups on one cluster both follow every job, so each alert of a job is published
once per group. A tool that would start a worker of its own (`tensorpulse demo --bootstrap ...`)
asks here first and reuses what runs. A running worker is a member of its intake's shard group
(stream/intake.py); whether a group reads a given job shows in the offsets its intake commits on
the job's topic once it has copied records from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from tensorpulse.kafka import client_config

from .intake import shard_group, source_group

_SHARD_SUFFIX = shard_group("")


@dataclass(frozen=True, order=True)
class RunningGroup:
    """A worker group with `workers` live members."""

    group: str
    workers: int


def running_groups(
    bootstrap: str | None, *, timeout: float = 10.0, kafka_config: dict[str, Any] | None = None
) -> list[RunningGroup]:
    """Every worker group with at least one live worker on the cluster, by name."""
    admin = AdminClient(client_config(bootstrap, kafka_config))
    listed = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
    ids = [
        g.group_id for g in listed.valid if g.group_id.endswith(_SHARD_SUFFIX) and g.group_id != _SHARD_SUFFIX
    ]
    if not ids:
        return []
    out = []
    for group_id, future in admin.describe_consumer_groups(ids, request_timeout=timeout).items():
        try:
            members = len(future.result(timeout).members)
        except KafkaException:  # gone between the listing and the description
            continue
        if members:
            out.append(RunningGroup(group_id[: -len(_SHARD_SUFFIX)], members))
    return sorted(out)


def reads_topic(
    bootstrap: str | None,
    group: str,
    topic: str,
    *,
    timeout: float = 10.0,
    kafka_config: dict[str, Any] | None = None,
) -> bool:
    """True once worker group `group` has copied records of `topic` (its intake committed an offset there)."""
    admin = AdminClient(client_config(bootstrap, kafka_config))
    request = ConsumerGroupTopicPartitions(source_group(group), [TopicPartition(topic, 0)])
    futures = admin.list_consumer_group_offsets([request], request_timeout=timeout)
    try:
        answer = next(iter(futures.values())).result(timeout)
    except KafkaException:
        return False
    return any(tp.offset >= 0 for tp in answer.topic_partitions)
