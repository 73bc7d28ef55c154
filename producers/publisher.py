"""Asynchronous publishing of hook records: the training thread never waits for Kafka.

The training thread appends to a bounded deque (O(1), a short lock); a daemon thread finishes
the statistics, encodes msgpack and hands records to librdkafka. When the deque is full the
OLDEST record is dropped: fresh statistics matter more to a live debugger than old ones, and
memory stays bounded whatever happens to the broker. Every loss is counted, never raised.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorpulse.errors import ConfigError
from tensorpulse.kafka import client_config, redact

log = logging.getLogger("tensorpulse.producers")

#: Reductions are small (~30 B per tensor per step); a week of them is cheap to keep.
REDUCTIONS_RETENTION_MS = 7 * 24 * 3600 * 1000
#: Control messages matter only while the job runs.
CONTROL_RETENTION_MS = 24 * 3600 * 1000
#: Upper bound of one record on the wire (tensorpulse.wire.MAX_RECORD_BYTES) plus headroom.
MAX_MESSAGE_BYTES = 5 * 1024 * 1024
#: Bytes the publisher's own queue may hold (records not yet encoded, by their `sizeof`), and
#: librdkafka's queue (`queue.buffering.max.kbytes`, whose default is 1 GiB): during a broker
#: outage the hook's memory is bounded by these two, not by the model or the outage's length.
MAX_QUEUED_BYTES = 16 * 1024 * 1024
LIBRDKAFKA_QUEUE_KBYTES = 16 * 1024


@dataclass(frozen=True)
class TopicSpec:
    """A topic the publisher creates at start (explicit retention: some brokers need it)."""

    name: str
    retention_ms: int = REDUCTIONS_RETENTION_MS
    partitions: int = 1
    replication_factor: int = -1  # the broker's default.replication.factor
    extra: Mapping[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        conf = {
            "retention.ms": str(self.retention_ms),
            "cleanup.policy": "delete",
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
        }
        conf.update(self.extra)
        return conf


class _LibrdkafkaLog:
    """librdkafka's own log lines go to DEBUG: error_cb reports what matters, once."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def log(self, level: int, msg: str, *args: Any) -> None:
        self._log.debug("librdkafka: " + msg, *args)


class _Once:
    """Log a message the first time its key is seen, later ones at DEBUG (no log floods)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        if key in self._seen:
            log.debug(msg, *args)
            return
        if len(self._seen) < 1000:
            self._seen.add(key)
        log.log(level, msg, *args, exc_info=exc_info)


ProduceFn = Callable[[str, bytes, bytes], None]


class Publisher:
    """Bounded, drop-oldest queue in front of a confluent_kafka.Producer, drained by a daemon thread.

    `submit(item)` never blocks and never raises. Items are bytes, or any object that `encode`
    (run on the background thread) turns into bytes. The queue is bounded both in records
    (`max_queued`) and in bytes (`max_queued_bytes`, each item sized by `sizeof`: len() of bytes,
    else 0 unless given). `produce_fn(topic, value, key)` replaces
    Kafka entirely (tests, custom transports): a call that returns counts as delivered.
    The thread drains the queue in batches, every `batch_delay_s` (0: as soon as a record
    arrives), or at once when the queue is half full, on flush() and close().
    """

    def __init__(
        self,
        topic: str,
        *,
        key: bytes | str | None = None,
        bootstrap: str | None = None,
        kafka_config: Mapping[str, Any] | None = None,
        max_queued: int = 10_000,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        sizeof: Callable[[Any], int] | None = None,
        encode: Callable[[Any], bytes] | None = None,
        topics: Sequence[TopicSpec] = (),
        compression: str = "lz4",
        linger_ms: int = 10,
        message_timeout_ms: int = 60_000,
        admin_timeout_s: float = 10.0,
        produce_fn: ProduceFn | None = None,
        name: str = "tensorpulse-publisher",
        batch_delay_s: float = 0.02,
    ) -> None:
        if max_queued < 1:
            raise ConfigError(f"max_queued must be >= 1, got {max_queued}")
        if max_queued_bytes < 1:
            raise ConfigError(f"max_queued_bytes must be >= 1, got {max_queued_bytes}")
        if compression not in ("lz4", "zstd", "gzip", "snappy", "none"):
            raise ConfigError(f"unsupported compression {compression!r}: use lz4 or zstd")
        self.topic = topic
        self._key = key.encode() if isinstance(key, str) else key
        self._encode = encode
        self._topics = list(topics)
        self._admin_timeout_s = admin_timeout_s
        self._produce_fn = produce_fn
        self._batch_delay_s = max(0.0, float(batch_delay_s))
        # Wake the thread at once when the queue is this full (else it drains every batch_delay_s).
        self._wake_at = max(1, max_queued // 2) if self._batch_delay_s > 0 else 1
        self._max_queued = max_queued
        self._max_bytes = max_queued_bytes
        self._sizeof = sizeof
        self._queue: collections.deque[tuple[Any, int]] = collections.deque()  # (item, its size)
        self.queued_bytes = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy = False
        self._closed = False
        self._once = _Once()
        # Counters; each is written by one thread only (submit: training thread; rest: background).
        self.enqueued = 0
        self.dropped_queue_full = 0
        self.sent = 0
        self.dropped_delivery = 0
        self.errors = 0

        # The Kafka properties as resolved at the edge (the hook's settings); None: resolved now.
        self._base_conf = client_config(bootstrap, kafka=kafka_config)
        self._producer = None
        if produce_fn is None:
            from confluent_kafka import KafkaException, Producer

            conf: dict[str, Any] = {
                "compression.type": compression,
                "linger.ms": linger_ms,
                "acks": "all",
                # One request in flight per broker: a retried batch (say, the first produce to a
                # topic created a moment ago, whose leader the broker does not know yet) then cannot
                # land behind later steps. Rules and `top` read a rank's steps in topic order; a step
                # 0 arriving after step 19 looked like a job started over. Idempotence would keep the
                # order too, but its fatal errors would silence the hook for the rest of the run. At
                # a hook's rate (one record per step, batched by linger.ms) one in flight is plenty.
                "max.in.flight.requests.per.connection": 1,
                "batch.num.messages": 10_000,
                "message.timeout.ms": message_timeout_ms,
                "message.max.bytes": MAX_MESSAGE_BYTES,
                "queue.buffering.max.kbytes": LIBRDKAFKA_QUEUE_KBYTES,
                "client.id": name,
            }
            conf.update(self._base_conf)  # the user's settings win
            conf.update(
                error_cb=self._on_error,
                logger=_LibrdkafkaLog(logging.getLogger("tensorpulse.producers.librdkafka")),
            )
            try:
                self._producer = Producer(conf)
            except (KafkaException, ValueError, TypeError) as exc:
                raise ConfigError(f"invalid Kafka producer configuration: {exc}") from exc
            log.debug("publisher for topic %s with config %s", topic, redact(self._base_conf))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training-thread side
    def submit(self, item: Any) -> bool:
        """Queue one record; never blocks. A full queue (in records or bytes) drops, and counts,
        the oldest records; the newest is always kept."""
        if self._closed:
            return False
        if isinstance(item, (bytes, bytearray)):
            size = len(item)
        else:
            size = self._sizeof(item) if self._sizeof is not None else 0
        with self._lock:
            queue = self._queue
            queue.append((item, size))
            self.queued_bytes += size
            while len(queue) > 1 and (len(queue) > self._max_queued or self.queued_bytes > self._max_bytes):
                self.queued_bytes -= queue.popleft()[1]
                self.dropped_queue_full += 1
            self.enqueued += 1
            wake = len(queue) >= self._wake_at or self.queued_bytes >= self._max_bytes // 2
        if wake:
            self._wake.set()
        return True

    def pending(self) -> int:
        """Records queued here or inside librdkafka, not yet delivered or dropped."""
        inflight = len(self._producer) if self._producer is not None else 0
        return len(self._queue) + int(self._busy) + inflight

    def flush(self, timeout: float = 10.0) -> int:
        """Wait (at most `timeout` s) until every queued record is delivered; return how many are left."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            left = self.pending()
            if left == 0 or not self._thread.is_alive() or time.monotonic() >= deadline:
                return left
            self._wake.set()
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    def close(self, timeout: float = 10.0) -> None:
        """Flush (bounded by `timeout`), stop the thread, count what is left as dropped, log a summary."""
        if self._closed:
            return
        deadline = time.monotonic() + max(0.0, timeout)
        self.flush(max(0.0, timeout - 0.2))
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            with self._lock:
                left = len(self._queue)
                self._queue.clear()
                self.queued_bytes = 0
            self.dropped_delivery += left
            if self._producer is not None:
                try:
                    self._producer.purge(in_queue=True, in_flight=True, blocking=False)
                    self._producer.poll(0)  # delivery callbacks count the purged records as dropped
                except Exception as exc:  # noqa: BLE001 - never raise from close
                    log.debug("purge at close failed: %s", exc)
        s = self.stats()
        log.info(
            "tensorpulse publisher closed: topic=%s enqueued=%d sent=%d dropped_queue_full=%d "
            "dropped_delivery=%d errors=%d",
            self.topic,
            s["enqueued"],
            s["sent"],
            s["dropped_queue_full"],
            s["dropped_delivery"],
            s["errors"],
        )

    def stats(self) -> dict[str, int]:
        """Counters: enqueued, sent (delivered), dropped_queue_full, dropped_delivery, errors, pending."""
        return {
            "enqueued": self.enqueued,
            "sent": self.sent,
            "dropped_queue_full": self.dropped_queue_full,
            "dropped_delivery": self.dropped_delivery,
            "errors": self.errors,
            "pending": self.pending(),
        }

    # ------------------------------------------------------------------ background thread
    def _pop(self) -> Any:
        with self._lock:
            if not self._queue:
                return None
            self._busy = True
            item, size = self._queue.popleft()
            self.queued_bytes -= size
            return item

    def _run(self) -> None:
        try:
            if self._producer is not None and self._topics:
                self._create_topics()
            while not self._stop.is_set():
                item = self._pop()
                if item is None:
                    if self._batch_delay_s:
                        # Idle until the next batch (or a full queue, flush, close): waking up for
                        # every record would hand the GIL to and fro with the training thread on
                        # every step. Delivery callbacks are served once per batch.
                        if self._producer is not None:
                            self._producer.poll(0)
                        self._wake.wait(self._batch_delay_s)
                    elif self._producer is not None and len(self._producer):
                        self._producer.poll(0.01)  # serve delivery callbacks while records are in flight
                    else:
                        if self._producer is not None:
                            self._producer.poll(0)
                        self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    self._send(item)
                finally:
                    self._busy = False
            if self._producer is not None:
                self._producer.poll(0)
        except Exception as exc:  # noqa: BLE001 - the thread must report, never die silently
            self.errors += 1
            log.error("tensorpulse publisher thread failed: %s", exc, exc_info=True)

    def _send(self, item: Any) -> None:
        try:
            payload = item if isinstance(item, (bytes, bytearray)) else self._encode(item)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001
            self.errors += 1
            self.dropped_delivery += 1
            self._once(
                "encode", logging.ERROR, "tensorpulse: encoding a record failed: %s", exc, exc_info=True
            )
            return
        if self._produce_fn is not None:
            try:
                self._produce_fn(self.topic, payload, self._key)  # type: ignore[arg-type]
                self.sent += 1
            except Exception as exc:  # noqa: BLE001
                self.errors += 1
                self.dropped_delivery += 1
                self._once("produce_fn", logging.WARNING, "tensorpulse: produce_fn failed: %s", exc)
            return
        producer = self._producer
        assert producer is not None
        while True:
            try:
                producer.produce(self.topic, payload, key=self._key, on_delivery=self._on_delivery)
                break
            except BufferError:
                if self._stop.is_set():
                    self.dropped_delivery += 1
                    return
                producer.poll(0.05)  # librdkafka's queue is full: wait for deliveries
            except Exception as exc:  # noqa: BLE001 - e.g. MSG_SIZE_TOO_LARGE
                self.errors += 1
                self.dropped_delivery += 1
                self._once("produce", logging.WARNING, "tensorpulse: producing a record failed: %s", exc)
                return
        producer.poll(0)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.sent += 1
            return
        self.dropped_delivery += 1
        self._once(
            f"delivery:{err.code()}",
            logging.WARNING,
            "tensorpulse: a record to %s was not delivered: %s (further such drops are counted in stats())",
            self.topic,
            err,
        )

    def _on_error(self, err: Any) -> None:
        self.errors += 1
        self._once(f"error:{err.code()}", logging.WARNING, "tensorpulse: Kafka client error: %s", err)

    def _create_topics(self) -> None:
        """Create the topics (ignoring TopicAlreadyExists); bounded, abandoned on close."""
        from confluent_kafka import KafkaError
        from confluent_kafka.admin import AdminClient, NewTopic

        conf = dict(self._base_conf)
        conf.update(
            error_cb=lambda err: None,
            logger=_LibrdkafkaLog(logging.getLogger("tensorpulse.producers.librdkafka")),
        )
        admin = AdminClient(conf)
        new = [
            NewTopic(
                t.name,
                num_partitions=t.partitions,
                replication_factor=t.replication_factor,
                config=t.config(),
            )
            for t in self._topics
        ]
        futures = admin.create_topics(new, request_timeout=self._admin_timeout_s)
        deadline = time.monotonic() + self._admin_timeout_s + 1.0
        for name, fut in futures.items():
            while not fut.done() and not self._stop.is_set() and time.monotonic() < deadline:
                if self._producer is not None:
                    self._producer.poll(0)  # serve error callbacks meanwhile
                self._stop.wait(0.05)
            if self._stop.is_set():
                return
            if not fut.done():
                self._once(
                    f"topic:{name}",
                    logging.WARNING,
                    "tensorpulse: creating topic %s timed out; producing anyway",
                    name,
                )
                continue
            exc = fut.exception()
            if exc is None:
                log.debug("created topic %s", name)
                continue
            err = exc.args[0] if exc.args else None
            if getattr(err, "code", lambda: None)() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            self._once(
                f"topic:{name}", logging.WARNING, "tensorpulse: could not create topic %s: %s", name, exc
            )
