"""Where `tensorpulse top` gets its data: the tails of the job topics, the alerts topic, and
optionally the workers' /metrics for their lag.

The feed is an independent reader: one consumer that assigns partitions by hand (no consumer
group is joined, no offset committed, nothing written), so it never takes records away from a
worker and leaves nothing behind. Of each job topic it reads the records of the last `since`
seconds, at most `tail` per partition (enough for the sparklines and for a schema announcement,
see docs/top.md); of the alerts topic, every event of the last `since` seconds, which is what
tells which rules are firing now. It decodes with the wire codec and folds into a `TopState`.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from . import wire
from .errors import ConfigError, DecodeError, TensorpulseError
from .events import AlertEvent
from .kafka import client_config, resolve_bootstrap
from .top import TopState
from .topics import ALERTS_TOPIC, DEFAULT_PREFIX, job_of_topic

log = logging.getLogger("tensorpulse.top")

#: The worker's gauge of records on a job's topic that its intake has not copied yet (docs/metrics.md).
LAG_METRIC = "tensorpulse_consumer_lag"


def header_only(payload: bytes) -> bytes:
    """The same record without its tensor block: what is left to decode of a record whose tensor
    names were announced before the part of the topic `top` read (step, rank, time, scalars).

    Raises DecodeError when the payload is not a msgpack map (the codec then says why)."""
    try:
        rec = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError("not_msgpack", str(exc)) from exc
    if not isinstance(rec, dict):
        raise DecodeError("not_a_record", f"top-level value is {type(rec).__name__}, expected a map")
    rec.pop("t", None)
    return msgpack.packb(rec, use_bin_type=True)


def lag_from_metrics(text: str) -> dict[str, int]:
    """job -> lag from a worker's /metrics text (LAG_METRIC); the largest value where several
    workers report a job (each job is read by one worker's intake; another may still show it
    for a moment after a hand-over)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            job = sample.labels.get("training_job")
            if sample.name == LAG_METRIC and job:
                out[job] = max(out.get(job, 0), int(sample.value))
    return out


def scrape_lag(urls: Iterable[str], timeout: float = 2.0) -> tuple[dict[str, int], list[str]]:
    """The lag of every job that the workers at `urls` report, and a note per URL that failed."""
    lag: dict[str, int] = {}
    problems: list[str] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                text = resp.read().decode("utf-8", errors="replace")
            for job, value in lag_from_metrics(text).items():
                lag[job] = max(lag.get(job, 0), value)
        except (OSError, ValueError) as exc:
            problems.append(f"lag: cannot read {url}: {exc}")
    return lag, problems


class TopFeed:
    """Reads the job topics' tails and the alerts topic into a `TopState` (see the module doc).

    `discover()` assigns the topics of jobs seen since the last call (every job topic under
    `prefix` whose id `jobs` searches, and the alerts topic once it exists); `poll()` folds what
    arrived; `caught_up` is True once every partition assigned so far was read to the end it
    had when assigned (what `--once` waits for).
    """

    def __init__(
        self,
        bootstrap: str | None,
        state: TopState,
        *,
        prefix: str = DEFAULT_PREFIX,
        jobs: re.Pattern[str] | None = None,
        since: float = 3600.0,
        tail: int = 1000,
        alerts_topic: str = ALERTS_TOPIC,
        kafka_config: Mapping[str, Any] | None = None,
        clock: Any = time.time,
    ) -> None:
        from .stream.discovery import JobDiscovery

        self.bootstrap = resolve_bootstrap(bootstrap)
        self.state = state
        self.jobs_filter = jobs
        self.since = since
        self.tail = tail
        self.alerts_topic = alerts_topic
        self.clock = clock
        self.prefix = prefix
        conf = client_config(
            self.bootstrap,
            {
                # A throw-away group id: the client needs one; it is never joined or committed.
                "group.id": f"tensorpulse-top-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",  # alert events are published in transactions
                "fetch.wait.max.ms": 50,
                **(kafka_config or {}),
            },
        )
        try:
            self._consumer = Consumer(conf)
            self._discovery = JobDiscovery(client_config(self.bootstrap, kafka_config), prefix)
        except KafkaException as exc:
            raise ConfigError(f"invalid Kafka client settings for {self.bootstrap}: {exc}") from exc
        self._assigned: set[str] = set()
        self._pending: dict[tuple[str, int], int] = {}  # partition -> end offset when assigned
        self._schemas = wire.SchemaCache()
        #: Records read, and records not decodable by reason (the feed skips them and goes on).
        self.records = 0
        self.alert_events = 0
        self.errors: Counter[str] = Counter()
        #: Records whose tensors wait for their schema's next announcement (step and time still count).
        self.unannounced = 0

    @property
    def caught_up(self) -> bool:
        return not self._pending

    def discover(self, timeout: float = 5.0) -> list[str]:
        """Assign what appeared since the last call; returns the topics newly assigned."""
        try:
            jobs = self._discovery.jobs(timeout=timeout, via=self._consumer)
            meta = self._consumer.list_topics(self.alerts_topic, timeout=timeout)
        except KafkaException as exc:
            raise TensorpulseError(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc
        new: dict[str, int] = {}  # topic -> partitions
        for job, topic in jobs.items():
            if topic not in self._assigned and (self.jobs_filter is None or self.jobs_filter.search(job)):
                new[topic] = self._discovery.partitions.get(topic, 1)
        alerts = meta.topics.get(self.alerts_topic)
        if self.alerts_topic not in self._assigned and alerts is not None and alerts.error is None:
            new[self.alerts_topic] = len(alerts.partitions)
        if not new:
            return []
        since_ms = int((self.clock() - self.since) * 1000)
        wanted = [TopicPartition(t, p, since_ms) for t, n in new.items() for p in range(n)]
        found = self._consumer.offsets_for_times(wanted, timeout=timeout)
        starts = []
        for tp in found:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=timeout
            )
            start = tp.offset if tp.offset >= 0 else high  # no record that recent: nothing to read
            if tp.topic != self.alerts_topic:
                start = max(start, high - self.tail)  # the alerts are read whole: they say what fires
            start = max(start, low)
            if start < high:
                self._pending[(tp.topic, tp.partition)] = high
            starts.append(TopicPartition(tp.topic, tp.partition, start))
        self._consumer.incremental_assign(starts)
        self._assigned.update(new)
        return sorted(new)

    def poll(self, timeout: float = 0.1, max_messages: int = 500) -> int:
        """Fold what arrived within `timeout` seconds into the state; returns messages read. At most
        `max_messages` per call: decoding them takes about 0.25 s (0.5 ms a 50-tensor record), so
        the screen is redrawn on time while `top` catches up on its start."""
        msgs = self._consumer.consume(max_messages, timeout)
        for m in msgs:
            err = m.error()
            key = (m.topic(), m.partition())
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if m.offset() >= self._pending.get(key, 0):
                        self._pending.pop(key, None)
                elif err.fatal():
                    raise TensorpulseError(f"reading {m.topic()} from {self.bootstrap} failed: {err.str()}")
                else:
                    log.warning("reading %s: %s", m.topic(), err.str())
                continue
            if key in self._pending and m.offset() + 1 >= self._pending[key]:
                del self._pending[key]
            if m.topic() == self.alerts_topic:
                self._alert(m.value())
            else:
                self._record(m.topic(), m.value())
        return len(msgs)

    def _alert(self, payload: bytes | None) -> None:
        try:
            ev = AlertEvent.from_json(payload or b"")
        except DecodeError as exc:
            self.errors[exc.reason] += 1
            return
        if self.jobs_filter is None or self.jobs_filter.search(ev.job):
            self.alert_events += 1
            self.state.add_alert(ev)

    def _record(self, topic: str, payload: bytes | None) -> None:
        self.records += 1
        try:
            rec = wire.decode(payload or b"", self._schemas)
        except DecodeError as exc:
            if exc.reason != "unknown_schema":
                self.errors[exc.reason] += 1
                return
            try:
                rec = wire.decode(header_only(payload or b""), self._schemas)
            except DecodeError as again:
                self.errors[again.reason] += 1
                return
            self.unannounced += 1
        if rec.job != job_of_topic(topic, self.prefix):
            # As the worker: a record names the job of its topic, or it is not that job's.
            self.errors["job_mismatch"] += 1
            return
        self.state.add_record(rec)

    def close(self) -> None:
        self._consumer.close()
