"""Reading the alerts topic: the contract every downstream consumer (CLI, webhooks, Alertmanager) uses."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from tensorpulse.errors import ConfigError, DecodeError
from tensorpulse.events import AlertEvent
from tensorpulse.kafka import client_config
from tensorpulse.rules.base import Regex, compile_regex
from tensorpulse.topics import ALERTS_TOPIC

log = logging.getLogger("tensorpulse.sinks")


def job_selector(pattern: str | None) -> Regex | None:
    """The job selector of `tensorpulse alerts --job` and `tensorpulse notify --job`: one kind for
    both, the kind the worker's `--jobs` and a rules file's `jobs:` take (a search in the job id).

    Compiled with RE2, as rule regexes are (`compile_regex`): job ids are chosen by whoever
    writes a job's records, so a backtracking pattern must not stall the forwarder."""
    if not pattern:
        return None
    try:
        return compile_regex(pattern, "--job")
    except ConfigError as exc:
        detail = str(exc).removeprefix("--job: ")
        raise ConfigError(f"invalid --job regex {pattern!r}: {detail} ('^ID$' selects exactly one job)") from exc


def read_alerts(
    bootstrap: str | None = None,
    *,
    job: str | None = None,
    jobs: Regex | None = None,
    follow: bool = False,
    idle_timeout: float = 3.0,
    from_beginning: bool = True,
    kafka_config: dict[str, Any] | None = None,
    topic: str = ALERTS_TOPIC,
    stop: threading.Event | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Iterator[AlertEvent]:
    """Yield alert events (committed ones only: read_committed) of job `job` (its exact id) or of
    the jobs `jobs` matches (`job_selector`), or of every job.

    Without `follow`, stops once nothing new arrived for `idle_timeout` seconds after reaching the
    end; `stop` ends a follow from another thread. No consumer group is joined: partitions are
    assigned directly, so reading is instant and leaves no offsets behind. `on_status` hears, in
    words, what a follow is waiting for (the topic to appear, new events once the past is read).
    """
    conf = client_config(
        bootstrap,
        {
            "group.id": f"tensorpulse-alerts-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
            **(kafka_config or {}),
        },
    )
    say = on_status or (lambda _: None)
    consumer = Consumer(conf)
    try:
        deadline = time.monotonic() + 10
        waiting = False
        while True:
            meta = consumer.list_topics(topic, timeout=5)
            t = meta.topics.get(topic)
            if t is not None and t.error is None and t.partitions:
                break
            if (not follow and time.monotonic() > deadline) or (stop is not None and stop.is_set()):
                return  # no alerts topic yet: no alert was ever raised
            if follow and not waiting:
                waiting = True
                say(
                    f"{topic} does not exist yet (no alert was raised on this cluster so far); waiting for it"
                )
            time.sleep(0.5)
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in t.partitions]
        if not from_beginning:
            parts = []
            for p in t.partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
                parts.append(TopicPartition(topic, p, high))
        consumer.assign(parts)
        shown, quiet = 0, False  # events yielded; said that the past is read
        last = time.monotonic()
        while stop is None or not stop.is_set():
            msgs = consumer.consume(500, 0.02)  # returns at the timeout when fewer: keep it short
            for m in msgs:
                if m.error():
                    if m.error().fatal():
                        raise KafkaException(m.error())
                    continue
                try:
                    ev = AlertEvent.from_json(m.value())
                except DecodeError as exc:
                    log.warning(
                        "skipping a malformed message at %s[%d]@%d: %s", topic, m.partition(), m.offset(), exc
                    )
                    continue
                if (job is None or ev.job == job) and (jobs is None or jobs.search(ev.job)):
                    shown += 1
                    yield ev
            if msgs:
                last = time.monotonic()
            elif not follow and time.monotonic() - last > idle_timeout:
                return
            elif follow and not quiet and time.monotonic() - last > min(idle_timeout, 1.0):
                quiet = True  # the past is read (nothing more came): say so once
                say(f"{shown} past event(s) read; waiting for new alert events")
    finally:
        consumer.close()
