"""Actions for a running job (stop, checkpoint), received on the job's control topic.

Message format (JSON, UTF-8, one object per Kafka message, keyed by job id):

    {"v": 1, "action": "stop" | "checkpoint", "job": str, "rule": str, "alert_id": str,
     "step": int | null, "reason": str, "ts": float (unix seconds)}

The codec is tensorpulse.actions (re-exported here). The listener
reads the whole topic from the beginning without a consumer group (explicit assignment, no
commits), so a hook that starts after an action was sent still sees it, and it ignores actions
older than its own start (minus a grace period) so that a restarted job is not stopped by an
alert about its previous run.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from tensorpulse.actions import decode_action
from tensorpulse.errors import DecodeError
from tensorpulse.kafka import client_config
from tensorpulse.topics import DEFAULT_PREFIX, control_topic, validate_job

log = logging.getLogger("tensorpulse.producers")

#: Actions older than the listener's start minus this many seconds are ignored.
GRACE_S = 5.0


def group_prefix(job: str) -> str:
    """What the listener's consumer group starts with (it only finds its coordinator: no commits)."""
    return f"tensorpulse-hook-{job}-"


ActionCallback = Callable[[dict[str, Any]], None]


class ControlListener:
    """Daemon thread that consumes the job's control topic and acts on messages for this job.

    A "stop" sets `stop_requested`; every accepted action is passed to the registered callbacks
    (on the listener's thread; their exceptions are logged, never propagated). The topic may not
    exist yet: metadata is retried about once a second.
    """

    def __init__(
        self,
        job: str,
        *,
        bootstrap: str | None = None,
        kafka_config: Mapping[str, Any] | None = None,
        prefix: str = DEFAULT_PREFIX,
        start_ts: float | None = None,
        grace_s: float = GRACE_S,
        group_id: str | None = None,
        poll_interval_s: float = 0.05,
    ) -> None:
        self.job = validate_job(job)
        self.topic = control_topic(job, prefix)
        self.start_ts = time.time() if start_ts is None else start_ts
        self.grace_s = grace_s
        self.stop_requested = threading.Event()
        #: The most recent accepted actions (newest last).
        self.actions: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._callbacks: list[ActionCallback] = []
        self._closing = threading.Event()
        self._poll = poll_interval_s
        self._conf = client_config(bootstrap, kafka_config)
        self._conf.update(
            {
                "group.id": group_id or f"{group_prefix(job)}{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 20,
            }
        )
        self._assigned = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tensorpulse-control-{job}", daemon=True)

    def start(self) -> ControlListener:
        self._thread.start()
        return self

    @property
    def assigned(self) -> bool:
        """True once the control topic was found and its partitions assigned."""
        return self._assigned.is_set()

    def on_action(self, callback: ActionCallback) -> None:
        """Call `callback(action_dict)` for every accepted action (stop and checkpoint)."""
        self._callbacks.append(callback)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (bounded by `timeout`; it is a daemon, so a stuck one cannot hold exit)."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ background thread
    def handle(self, payload: bytes) -> dict[str, Any] | None:
        """Decode, filter and dispatch one message; returns the action if it was accepted."""
        try:
            action = decode_action(payload)
        except DecodeError as exc:
            log.warning("tensorpulse: ignoring a malformed control message on %s: %s", self.topic, exc)
            return None
        if action["job"] != self.job or action["ts"] < self.start_ts - self.grace_s:
            return None
        self.actions.append(action)
        if action["action"] == "stop":
            log.warning(
                "tensorpulse: stop requested for job %s by rule %r (alert %s): %s",
                self.job,
                action["rule"],
                action["alert_id"],
                action["reason"],
            )
            self.stop_requested.set()
        for cb in list(self._callbacks):
            try:
                cb(action)
            except Exception:  # noqa: BLE001 - user callbacks must not kill the listener
                log.exception("tensorpulse: control action callback %r failed", cb)
        return action

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

        from .publisher import _LibrdkafkaLog, _Once

        once = _Once()
        conf = dict(self._conf)
        conf.update(
            # The publisher already warns about an unreachable cluster; keep this quiet.
            error_cb=lambda err: log.debug("tensorpulse: control listener: %s", err),
            logger=_LibrdkafkaLog(logging.getLogger("tensorpulse.producers.librdkafka")),
        )
        try:
            consumer = Consumer(conf)
        except Exception as exc:  # noqa: BLE001
            log.error("tensorpulse: cannot start the control listener: %s", exc)
            return
        try:
            while not self._closing.is_set():
                try:
                    md = consumer.list_topics(self.topic, timeout=1.0)
                    meta = md.topics.get(self.topic)
                    if meta is not None and meta.error is None and meta.partitions:
                        consumer.assign(
                            [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
                        )
                        self._assigned.set()
                        break
                except KafkaException as exc:
                    log.debug("control topic metadata: %s", exc)
                self._closing.wait(1.0)
            while not self._closing.is_set():
                for msg in consumer.consume(100, self._poll):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            once(f"msg:{err.code()}", logging.WARNING, "tensorpulse: control topic: %s", err)
                        continue
                    self.handle(msg.value() or b"")
        except Exception:  # noqa: BLE001
            log.exception("tensorpulse: control listener failed")
        finally:
            with contextlib.suppress(Exception):
                consumer.close()
