"""Finding job topics: the worker follows every reductions topic under the prefix.

The intake (stream/intake.py) lists the cluster's topics every `discovery_interval` and assigns a
new job's partitions by hand, so a job is followed from its first record without a rebalance.
A listing costs CPU in proportion to the cluster's topics, so on a large cluster it lists less
often (`ListingPace`).
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tensorpulse.rules.base import compile_regex
from tensorpulse.topics import reductions_pattern

log = logging.getLogger("tensorpulse.stream")

#: The largest share of the intake thread's time that listing topics for new jobs may take while
#: jobs come and go (a job appeared or went within LISTING_BUSY_S seconds), and otherwise.
LISTING_SHARE = 0.05
QUIET_LISTING_SHARE = 0.02
LISTING_BUSY_S = 10.0


class ListingPace:
    """Seconds from one listing to the next: `discovery_interval`, or longer where a listing costs
    more than its share of the intake thread's time. A listing turns every topic of the cluster
    into Python objects while holding the GIL that the processor needs: with 1,000 jobs (2,000 and
    more topics) listing ten times a second made every record cost 2.5 times as much
    (bench/scaling.py). A new job then waits longer for its first copy, in proportion.

    The share is LISTING_SHARE while jobs come and go (a sweep starts its trials seconds apart:
    the next one is found as fast as before) and QUIET_LISTING_SHARE once the job set has not
    changed for LISTING_BUSY_S: then the first new job on a cluster of thousands of topics waits up
    to 2.5 times as long for its listing (0.5 s instead of 0.2 s at 3,400 topics), and the listing
    costs 2 % of a core instead of 5 % while nothing changes.
    """

    def __init__(self, discovery_interval: float) -> None:
        self.discovery_interval = discovery_interval
        self.stretched = False  # listing less often than discovery_interval (a large cluster)
        self._cpu = [0.0, 0.0, 0.0]  # CPU seconds of the last three listings
        self._changed = float("-inf")  # monotonic time the job set last changed

    def interval(self, cpu: float, changed: bool, now: float, topics: int) -> float:
        """After a listing of `topics` topics that took `cpu` seconds of this thread's CPU and found
        the job set `changed` (or not) at monotonic time `now`."""
        if changed:
            self._changed = now
        share = LISTING_SHARE if now - self._changed <= LISTING_BUSY_S else QUIET_LISTING_SHARE
        # The median of the last three listings' costs: one slow listing (a cold metadata cache, a
        # busy machine) does not hold back new jobs for seconds, a lasting cost does stretch it, and
        # costs that vary (a loaded machine) keep the share on average (the smaller of the last
        # two, used before, let a listing whose cost alternated take several times its share).
        self._cpu = [*self._cpu[1:], cpu]
        cost = sorted(self._cpu)[1]
        interval = max(self.discovery_interval, cost / share)
        stretched = interval > 2 * self.discovery_interval
        if stretched != self.stretched:
            self.stretched = stretched
            (log.warning if stretched else log.info)(
                "intake: listing %d topics took %.0f ms of CPU; listing every %.2f s (a new job's "
                "first record waits up to that long)",
                topics,
                cpu * 1e3,
                interval,
            )
        return interval


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
            [NewTopic(n, partitions, replication_factor, config=config) for n in names],
            request_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            self.existing.add(name)
