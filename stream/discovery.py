"""Finding job topics: the worker follows every reductions topic under the prefix.

The intake (stream/intake.py) lists the cluster's topics every `discovery_interval` and assigns a
new job's partitions by hand, so a job is followed from its first record without a rebalance.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tensorpulse.rules.base import compile_regex
from tensorpulse.topics import reductions_pattern

log = logging.getLogger("tensorpulse.stream")


class JobDiscovery:
    def __init__(self, admin_config: dict[str, Any], prefix: str, jobs_regex: str | None = None) -> None:
        self._admin = AdminClient(admin_config)
        self.prefix = prefix
        # RE2, like every rule regex: job ids are chosen by whoever creates a topic.
        self._filter = compile_regex(jobs_regex or None, "--jobs")
        # Replaced whole after each listing, never changed in place: the lag monitor reads it from
        # its own thread.
        self.partitions: dict[str, int] = {}
        self.existing: set[str] = set()
        self.ignored: set[str] = set()  # topics under the prefix whose job part is not a valid job id
        self._pattern = reductions_pattern(prefix)
        # The last listing (topic -> partitions) and its answer: the intake lists every 0.1 s, and
        # re-reading 1,000 unchanged topics each time cost more than the jobs' records (bench/scaling.py).
        self._shape: dict[str, int] | None = None
        self._jobs: dict[str, str] = {}

    def jobs(self, timeout: float = 5.0, via: Any = None) -> dict[str, str]:
        """job id -> reductions topic, for every job topic the cluster has now.

        `via`: the client to ask (anything with `list_topics`), default our admin client. The
        intake asks its own consumer: the answer then also fills that consumer's metadata cache,
        so a new job's partition is fetched at once after `incremental_assign` (on Apache Kafka
        4.4, 0.2 s from produce to receipt instead of 1.1 s when another client listed the topic).
        """
        meta = (via or self._admin).list_topics(timeout=timeout)
        shape = {t: len(info.partitions) for t, info in meta.topics.items()}
        if shape == self._shape:  # nothing was created or deleted: the last answer stands
            return dict(self._jobs)
        out = {}
        partitions: dict[str, int] = {}
        self.existing = set(shape)
        under = f"{self.prefix}reductions."
        for topic, count in shape.items():
            if not topic.startswith(under):
                continue
            match = self._pattern.fullmatch(topic)
            job = match.group(1) if match else None
            if job is None and topic not in self.ignored:
                self.ignored.add(topic)
                log.warning(
                    "ignoring topic %r: %r is not a valid job id (1-128 of [A-Za-z0-9_-], no dots); "
                    "no job can write there through tensorpulse",
                    topic,
                    topic[len(under) :],
                )
            if job and (self._filter is None or self._filter.search(job)):
                out[job] = topic
                partitions[topic] = max(count, 1)
        self.partitions = partitions
        self._shape, self._jobs = shape, out
        return dict(out)

    def ensure_topics(
        self,
        names: list[str],
        config: dict[str, str],
        *,
        partitions: int = 1,
        replication_factor: int = 1,
        compact: bool = False,
        max_message_bytes: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Create topics that do not exist yet with `config` (explicit retention); existing ones are fine.

        Raises the broker's error for any other failure (no permission, too few brokers for the
        replication factor), so that the caller can say what to fix.
        """
        names = [n for n in names if n not in self.existing]
        if not names:
            return
        config = dict(config)
        if compact:
            config.update({"cleanup.policy": "compact", "retention.bytes": "-1"})
        if max_message_bytes is not None:
            config["max.message.bytes"] = str(max_message_bytes)
        futures = self._admin.create_topics(
            [NewTopic(n, partitions, replication_factor, config=config) for n in names], request_timeout=timeout
        )
        for name, fut in futures.items():
            try:
                fut.result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            self.existing.add(name)
