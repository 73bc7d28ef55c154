"""The intake: every job's records, from its first one, copied into the group's one steps topic.

Why a stage of its own (docs/architecture.md has the measurements): a Kafka consumer group that
subscribes to job topics must rebalance whenever a job topic appears, and a rebalance pauses
every job and costs seconds (4.5 s measured for a pattern subscription; 8-21 s for the old
rebuild-per-job worker). A consumer that is *assigned* partitions by hand has no rebalance: it
lists topics every `discovery_interval` and adds a new job's partition with `incremental_assign`,
which takes tens of milliseconds. So the intake reads job topics by hand-assignment and re-keys
their records, unchanged, by job id into `tensorpulse.steps.<group>`; the stream application
(stream/worker.py) consumes that one static topic in an ordinary consumer group. New jobs never
change its subscription, so they never cause a rebalance of the processing.

Which worker reads which job: the workers' intakes form a second, tiny consumer group over the
coordination topic `tensorpulse.intake.<group>`, whose partitions are shards; a job belongs to
shard `crc32(job) % shards`, and a worker reads the jobs of the shards assigned to it. Workers
joining or leaving rebalance that group only (cooperative-sticky: the other shards keep going).

Delivery: at least once. Source offsets are committed (group `<group>.intake`, which has no
members) only after the copies are acknowledged (acks=all); a worker that dies in between makes
its successor copy some records again. Each copy carries its source offset in a header and the
processor drops a copy at or below the last offset it processed for that job partition (state,
under the same transaction as everything else), so a copy made twice is evaluated once.

Clock rules: the intake also sends each owned job a `tick` (no value, a header with the time)
every `tick_interval` seconds while the job is within `tick_horizon` seconds of its last record.
A tick travels the job's own partition, so the processor evaluates StalledTrainingRule in the
job's own state and transaction, like a record (stream/clock.py). A tick also says how long the
job has been silent (since its last record, or since this intake took it over): after the worker's
`job_idle_timeout_s` the processor counts the job as ended.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_STORED, Consumer, KafkaError, Producer, TopicPartition

from tensorpulse.topics import DEADLETTER_TOPIC, control_topic, group_topic

from .deadletter import envelope
from .discovery import JobDiscovery, ListingPace
from .flow import JobFlow, Progress
from .source import FETCH_MIN_BYTES, FETCH_WAIT_MS, fetch_scale, rescale, source_config

log = logging.getLogger("tensorpulse.stream")

#: Headers of a copy on the steps topic (the record's own value and timestamp are kept as they are).
SOURCE_HEADER = "tp.src"  # b"<partition>:<offset>" of the record on its job topic
KEY_HEADER = "tp.key"  # the record's own key, when it had one (the processor checks it)
TICK_HEADER = "tp.tick"  # b"<unix time>": a clock tick, no record
IDLE_HEADER = "tp.idle"  # on a tick: b"<seconds>" since the intake last copied a record of the job
#: A round of the intake's loop longer than this is logged with what took the time.
SLOW_ROUND_S = 1.0


def source_group(group: str) -> str:
    """The consumer group whose offsets are the intake's position in job topics (it has no members)."""
    return f"{group}.intake"


def shard_group(group: str) -> str:
    """The consumer group the workers' intakes form over the shards: one member per running worker."""
    return f"{group}.intake-shards"


def shard_of(job: str, shards: int) -> int:
    """The intake shard a job belongs to: stable across processes and versions (crc32, not hash())."""
    return zlib.crc32(job.encode()) % shards


@dataclass(frozen=True)
class IntakeConfig:
    """What the intake needs from the worker's settings (all derived there, once)."""

    group: str
    topic_prefix: str
    jobs_regex: str | None
    shards: int
    discovery_interval: float
    max_record_bytes: int  # wire.MAX_RECORD_BYTES: a larger record is dead-lettered here, not copied
    topic_config: dict[str, str]  # broker config of the topics it creates (WorkerSettings.topic_config)
    replication_factor: int
    tick_interval: float | None  # None: no clock rule, no ticks
    tick_horizon: float
    max_jobs: int = 2000  # WorkerSettings.max_jobs: jobs read at once; the rest wait, counted
    max_ahead: int = 0  # WorkerSettings.max_ahead_per_job: a job's copies not yet evaluated (0: no bound)

    @property
    def steps_topic(self) -> str:
        return group_topic("steps", self.group)

    @property
    def coordination_topic(self) -> str:
        return group_topic("intake", self.group)


class Intake:
    """Runs in its own thread (`run`) until `stop` is set; never raises out of the loop.

    `on_jobs(all jobs, how many this intake reads)` is called on the intake's thread whenever
    either changes; `on_reject(reason)` for every record it dead-letters itself; `on_refused(n)`
    when n more jobs of its shards are not read because it reads `max_jobs` already.
    """

    def __init__(
        self,
        config: IntakeConfig,
        base_config: dict[str, Any],
        *,
        on_jobs: Callable[[dict[str, str], int], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
        on_refused: Callable[[int], None] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self._base = base_config
        self._on_jobs = on_jobs
        self._on_reject = on_reject
        self._on_refused = on_refused
        self.refused: frozenset[str] = frozenset()  # jobs of its shards not read: over max_jobs
        self.discovery = JobDiscovery(base_config, config.topic_prefix, config.jobs_regex)
        self.jobs: dict[str, str] = {}  # every followed job (all shards) -> its topic
        self.owned: dict[str, str] = {}  # topic -> job, for the jobs this intake reads
        self._last_seen: dict[str, float] = {}  # job -> monotonic time of its last record (or assignment)
        self._need_control: list[str] = []
        self._creator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorpulse-topics")
        self._creating: Future[None] | None = None
        self._followed: tuple[frozenset[int], dict[str, str]] | None = None  # what _follow last acted on
        self._failed: dict[tuple[str, int], int] = {}  # (topic, partition) -> first undelivered offset
        # How far each job's copies run ahead of the processor (stream/flow.py); its committed
        # offsets come from a consumer of the processing group made with the other clients.
        self._positions: Consumer | None = None
        self._steps_partitions: list[TopicPartition] = []
        self.flow = JobFlow(config.max_ahead, progress or Progress(), self._processed_positions)
        self.copied = 0
        self.pace = ListingPace(config.discovery_interval)  # how often it lists (stream/discovery.py)
        self._source: Consumer | None = None  # the source consumer now (`_rescaled` replaces it)
        self._fetch_scale = 1.0  # its fetches' scale (stream/source.py)
        self._done: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset committed last

    # ------------------------------------------------------------------ clients
    def _clients(self) -> tuple[Consumer, Consumer, Producer]:
        c, base = self.config, self._base
        source = self._source_consumer(fetch_scale(0))
        coordination = Consumer(
            {
                **base,
                "group.id": shard_group(c.group),
                "enable.auto.commit": False,
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1000,
                "client.id": f"tensorpulse-shards-{c.group}",
            }
        )
        coordination.subscribe([c.coordination_topic])
        if c.max_ahead > 0:
            # Never joins the processing group: it only reads the group's committed offsets.
            self._positions = Consumer(
                {
                    **base,
                    "group.id": c.group,
                    "enable.auto.commit": False,
                    "client.id": f"tensorpulse-flow-{c.group}",
                }
            )
        producer = Producer(
            {
                **base,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 1,
                "compression.type": "lz4",
                "message.max.bytes": c.max_record_bytes + (64 << 10),
                "client.id": f"tensorpulse-intake-{c.group}",
            }
        )
        return source, coordination, producer

    def _source_consumer(self, scale: float) -> Consumer:
        """A source consumer whose fetches suit reading about `scale` * 200 partitions (stream/source.py)."""
        c = self.config
        self._fetch_scale = scale
        client_id = f"tensorpulse-intake-{c.group}"
        return Consumer(
            source_config(self._base, source_group(c.group), client_id, c.max_record_bytes, scale)
        )

    def _rescaled(self, source: Consumer) -> Consumer:
        """`source`, or a new source consumer reading the same partitions whose fetches suit their
        number (stream/source.py): what was copied is committed first, the new one starts from the
        committed offsets (records read but not copied, held or unacknowledged, are read again)."""
        partitions = sum(self.discovery.partitions.get(t, 1) for t in self.owned)
        scale = rescale(self._fetch_scale, partitions)
        if scale is None:
            return source
        parts = source.assignment()
        if self._done:
            source.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in self._done.items()], asynchronous=False
            )
        source.close()
        self._source = source = self._source_consumer(scale)
        source.incremental_assign([TopicPartition(tp.topic, tp.partition, OFFSET_STORED) for tp in parts])
        held = [TopicPartition(t, p) for tps in self.flow.held.values() for t, p in tps]
        if held:
            source.pause(held)
        log.info(
            "intake: reading %d partitions; fetches wait up to %d ms or %d KiB",
            partitions,
            round(FETCH_WAIT_MS * scale),
            round(FETCH_MIN_BYTES * scale) >> 10,
        )
        return source

    def create_topics(self, partitions: int) -> None:
        """The steps topic (`partitions`: the processing's parallelism) and the coordination topic."""
        c = self.config
        self.discovery.ensure_topics(
            [c.steps_topic],
            c.topic_config,
            partitions=partitions,
            replication_factor=c.replication_factor,
            max_message_bytes=c.max_record_bytes + (64 << 10),
        )
        self.discovery.ensure_topics(
            [c.coordination_topic],
            c.topic_config,
            partitions=c.shards,
            replication_factor=c.replication_factor,
        )

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Discover, assign, copy, commit, tick; until `stop`. Broker outages are waited out."""
        backoff = 0.5
        while not stop.is_set():
            try:
                source, coordination, producer = self._clients()
                self._source = source
            except Exception as exc:  # bad config is caught at start-up; this is the broker
                log.warning("intake cannot start (%s); retrying in %.1fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            try:
                self._loop(stop, source, coordination, producer)
            except Exception:
                log.exception("intake failed; starting again from the committed offsets")
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                producer.flush(5)
                for client in (self._source, coordination, self._positions):
                    try:
                        if client is not None:
                            client.close()
                    except Exception as exc:  # closing after an outage may fail; nothing to keep
                        log.debug("closing an intake client: %s", exc)
                self._positions = None
                self.owned = {}
                self._followed = None  # a new source consumer has nothing assigned
                self._done = {}
                self.flow.reset()

    def _loop(
        self, stop: threading.Event, source: Consumer, coordination: Consumer, producer: Producer
    ) -> None:
        c = self.config
        next_discovery = next_tick = 0.0
        logged_down = False
        steps: dict[str, float] = {}  # how long each part of this round took (a slow round is logged)
        while not stop.is_set():
            now = time.monotonic()
            if steps and (took := sum(steps.values())) > SLOW_ROUND_S:
                log.warning(
                    "intake: one round took %.1f s (%s): every job's records waited",
                    took,
                    ", ".join(f"{k} {v:.2f} s" for k, v in steps.items() if v >= 0.05),
                )
            steps = {}
            coordination.poll(0)  # serves the shard group's heartbeats and rebalances
            steps["coordination"] = time.monotonic() - now
            if now >= next_discovery:
                cpu = time.thread_time()
                try:
                    jobs = self.discovery.jobs(via=source)
                    logged_down = False
                except Exception as exc:
                    if not logged_down:
                        log.warning("intake cannot list topics (%s); retrying", exc)
                        logged_down = True
                    jobs = self.jobs
                changed = jobs != self.jobs
                cpu = time.thread_time() - cpu
                next_discovery = now + self.pace.interval(cpu, changed, now, len(self.discovery.existing))
                t = time.monotonic()
                steps["listing"] = t - now
                owned = len(self.owned)
                self.jobs = jobs
                self._follow(source, coordination)
                if len(self.owned) != owned:
                    source = self._rescaled(source)
                if (changed or owned != len(self.owned)) and self._on_jobs is not None:
                    self._on_jobs(dict(jobs), len(self.owned))
                steps["assignment"] = time.monotonic() - t
            t = time.monotonic()
            if self.owned:
                self._copy(source, producer)
                if self.flow.held:
                    self._release(source)
                steps["copy"] = time.monotonic() - t
            else:
                stop.wait(c.discovery_interval / 2)
            if c.tick_interval is not None and now >= next_tick:
                next_tick = now + c.tick_interval
                t = time.monotonic()
                self._tick(producer)
                steps["ticks"] = time.monotonic() - t
            if self._need_control and (self._creating is None or self._creating.done()):
                # Off this loop: creating topics can take seconds on a busy cluster, and the loop
                # copies every job's records.
                names, self._need_control = self._need_control, []
                self._creating = self._creator.submit(self._create_control_topics, names)

    def _create_control_topics(self, jobs: list[str]) -> None:
        """The new jobs' control topics (where their stop actions go), on the creator thread."""
        c = self.config
        try:
            self.discovery.ensure_topics(
                [control_topic(j, c.topic_prefix) for j in jobs],
                c.topic_config,
                replication_factor=c.replication_factor,
            )
        except Exception as exc:
            log.warning("creating control topics failed (%s); retrying", exc)
            self._need_control += jobs

    def _follow(self, source: Consumer, coordination: Consumer) -> None:
        """Assign the partitions of newly owned jobs, unassign those no longer owned or deleted."""
        c = self.config
        shards = frozenset(
            tp.partition for tp in coordination.assignment() if tp.topic == c.coordination_topic
        )
        if (shards, self.jobs) == self._followed and not self.refused:
            return  # same shards, same jobs: nothing to assign (checked every listing)
        self._followed = (shards, dict(self.jobs))
        wanted = self.limit_jobs({t: j for j, t in self.jobs.items() if shard_of(j, c.shards) in shards})
        added = [t for t in wanted if t not in self.owned]
        removed = [t for t in self.owned if t not in wanted]
        if removed:
            gone = [TopicPartition(t, p) for t in removed for p in range(self.discovery.partitions.get(t, 1))]
            try:
                source.commit(asynchronous=False)
            except Exception as exc:  # nothing consumed yet, or broker away: the successor re-reads
                log.debug("commit before unassign: %s", exc)
            source.incremental_unassign(gone)
            for key in [k for k in self._done if k[0] in removed]:
                del self._done[key]
            for t in removed:
                job = self.owned.pop(t)
                self._last_seen.pop(job, None)
                self.flow.forget(job)
            log.info("intake: no longer reading %d job(s): %s", len(removed), ", ".join(sorted(removed)))
        if added:
            parts = [
                TopicPartition(t, p, OFFSET_STORED)
                for t in added
                for p in range(self.discovery.partitions.get(t, 1))
            ]
            source.incremental_assign(parts)
            now = time.monotonic()
            for t in added:
                self.owned[t] = wanted[t]
                self._last_seen[wanted[t]] = now
            self._need_control += [wanted[t] for t in added]
            log.info(
                "intake: reading %d new job(s): %s", len(added), ", ".join(sorted(wanted[t] for t in added))
            )

    def limit_jobs(self, wanted: dict[str, str]) -> dict[str, str]:
        """The jobs (topic -> job) of `wanted` to read, at most `max_jobs` live ones: every live one
        already read, then new ones in name order, then ended ones already read (newest record
        first) while there is room. A job read here is live until it has been silent for the tick
        horizon (its idle timeout and its state's retention are over: nothing more is owed to it),
        so the topics of ended jobs, which outlive them, do not keep new jobs out. The jobs left out
        are not read (their records wait on their topics), said and counted once each (ended ones
        are not counted), and taken in as soon as there is room."""
        limit = self.config.max_jobs
        if len(wanted) <= limit:
            self.refused = frozenset()
            return wanted
        now = time.monotonic()

        def ended(t: str) -> bool:
            seen = self._last_seen.get(self.owned[t])
            return seen is not None and now - seen > self.config.tick_horizon

        owned = [t for t in wanted if t in self.owned]
        kept = {t: wanted[t] for t in owned if not ended(t)}
        for t in sorted(t for t in wanted if t not in self.owned)[: max(limit - len(kept), 0)]:
            kept[t] = wanted[t]
        idle = sorted((t for t in owned if ended(t)), key=lambda t: -self._last_seen[self.owned[t]])
        for t in idle[: max(limit - len(kept), 0)]:
            kept[t] = wanted[t]
        refused = frozenset(j for t, j in wanted.items() if t not in kept)
        new = sorted(refused - self.refused - {self.owned[t] for t in idle})
        self.refused = refused
        if new:
            log.error(
                "intake: this worker reads %d jobs, its limit (max_jobs=%d); %d more job(s) of its "
                "shards are not read until there is room (run more workers, or raise max_jobs): %s%s",
                len(kept),
                limit,
                len(refused),
                ", ".join(new[:10]),
                f" and {len(new) - 10} more" if len(new) > 10 else "",
            )
            if self._on_refused is not None:
                self._on_refused(len(new))
        return kept

    def _copy(self, source: Consumer, producer: Producer) -> None:
        """One batch: copy, wait for the acknowledgements, commit the source positions."""
        c = self.config
        batch = source.consume(num_messages=2000, timeout=0.05)
        if not batch:
            producer.poll(0)
            return
        self._failed.clear()
        now = time.monotonic()
        done: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset to read
        flow = self.flow
        room: dict[str, int] = {}  # job -> copies it may still have made in this batch
        skipped: dict[tuple[str, int], int] = {}  # (topic, partition) -> first offset not copied (held)
        for m in batch:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("intake: reading %s: %s", m.topic(), err)
                continue
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            job = self.owned.get(topic)
            if job is None:
                continue  # unassigned while the batch was in flight: its new reader commits it
            left = room.get(job)
            if left is None:
                left = 0 if job in flow.held else flow.room(job)
            if left <= 0:  # the job is far enough ahead of its evaluation: the rest waits on its topic
                skipped.setdefault((topic, partition), offset)
                room[job] = 0
                continue
            room[job] = left - 1
            done[(topic, partition)] = offset + 1
            self._last_seen[job] = now
            value = m.value()  # None (a tombstone) is copied as it is: the decoder names it
            if value is not None and len(value) > c.max_record_bytes:
                self._reject_large(producer, job, m, value)
                continue
            headers = [(SOURCE_HEADER, f"{partition}:{offset}".encode())]
            key = m.key()
            if key is not None:
                headers.append((KEY_HEADER, key))
            ts_type, ts = m.timestamp()
            producer.produce(
                c.steps_topic,
                key=job.encode(),
                value=value,
                headers=headers,
                timestamp=ts if ts_type and ts > 0 else 0,
                on_delivery=self._delivered(job, topic, partition, offset),
            )
            flow.sent(job)
            self.copied += 1
        remaining = producer.flush(10)
        if skipped:
            self._hold(source, skipped)
        if remaining or self._failed:
            # Not acknowledged: read those records again (the processor drops what it has seen).
            for (topic, partition), offset in self._failed.items():
                source.seek(TopicPartition(topic, partition, offset))
            log.warning(
                "intake: %d copies not acknowledged; reading them again", remaining + len(self._failed)
            )
            return
        # Only the partitions this batch read: committing every assigned partition after every
        # batch wrote thousands of offsets a second to the broker with 1,000 jobs.
        source.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()], asynchronous=True)
        self._done.update(done)

    def _delivered(self, job: str, topic: str, partition: int, offset: int) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                key = (topic, partition)
                self._failed[key] = min(offset, self._failed.get(key, offset))
                self.flow.acked(job, None, None)
            else:
                self.flow.acked(job, msg.partition(), msg.offset())

        return on_delivery

    def _hold(self, source: Consumer, skipped: dict[tuple[str, int], int]) -> None:
        """Pause the jobs that reached max_ahead; what they did not copy is read again on resume."""
        for topic in {t for t, _ in skipped}:
            job = self.owned.get(topic)
            if job is None or job in self.flow.held:
                continue
            parts = [(topic, p) for p in range(self.discovery.partitions.get(topic, 1))]
            source.pause([TopicPartition(t, p) for t, p in parts])
            self.flow.hold(job, parts)
        for (topic, partition), offset in skipped.items():  # after the pause: it takes effect on resume
            source.seek(TopicPartition(topic, partition, offset))

    def _release(self, source: Consumer) -> None:
        for _job, parts in self.flow.released():
            source.resume([TopicPartition(t, p) for t, p in parts])

    def _processed_positions(self) -> dict[int, int]:
        """The processing group's committed offset per steps partition (stream/flow.py)."""
        consumer = self._positions
        if consumer is None:
            return {}
        if not self._steps_partitions:
            topic = self.config.steps_topic
            meta = consumer.list_topics(topic, timeout=5).topics[topic]
            self._steps_partitions = [TopicPartition(topic, p) for p in meta.partitions]
        return {
            tp.partition: tp.offset
            for tp in consumer.committed(self._steps_partitions, timeout=5)
            if tp.offset >= 0
        }

    def _reject_large(self, producer: Producer, job: str, m: Any, value: bytes) -> None:
        """A record over the documented limit: dead-lettered (truncated), counted, never copied."""
        c = self.config
        detail = (
            f"record of {len(value)} bytes is over the limit of {c.max_record_bytes} bytes "
            "(tensorpulse.wire.MAX_RECORD_BYTES); send fewer tensors per record"
        )
        log.warning("intake: job %s partition %d offset %d: %s", job, m.partition(), m.offset(), detail)
        producer.produce(
            DEADLETTER_TOPIC,
            key=job.encode(),
            value=envelope(
                reason="too_large",
                error=detail,
                topic=m.topic(),
                partition=m.partition(),
                offset=m.offset(),
                job=job,
                key=m.key(),
                payload=value,
            ),
        )
        if self._on_reject is not None:
            self._on_reject("too_large")

    def _tick(self, producer: Producer) -> None:
        """A tick for each owned job heard from within the horizon (clock rules evaluate on it)."""
        c = self.config
        now_mono, now = time.monotonic(), time.time()
        stamp = repr(now).encode()
        for job, seen in list(self._last_seen.items()):
            if now_mono - seen <= c.tick_horizon:
                idle = f"{now_mono - seen:.1f}".encode()
                headers = [(TICK_HEADER, stamp), (IDLE_HEADER, idle)]
                producer.produce(c.steps_topic, key=job.encode(), value=b"", headers=headers)
        producer.poll(0)
