"""The forwarder behind `tensorpulse notify`: tensorpulse.alerts -> Alertmanager and webhooks.

Delivery is at-least-once: the consumer group's offsets are committed only after every sink has
had its try at a batch, so a restart (or a crash) re-delivers what was not committed; duplicates
within one run are dropped by event id (a bounded window), and receivers can drop the rest by id.
At start, the firing set that Alertmanager needs is rebuilt by reading the topic's last
`lookback` seconds (no group, nothing committed), because events are transitions, not state.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from tensorpulse.errors import ConfigError, DecodeError
from tensorpulse.events import AlertEvent
from tensorpulse.kafka import client_config, resolve_bootstrap
from tensorpulse.topics import ALERTS_TOPIC

from .alertmanager import AlertmanagerSink, api_url
from .alerts import job_selector
from .http import DeliveryInterrupted, JsonPoster, RetryPolicy, safe_url
from .webhook import WebhookSink, parse_header

log = logging.getLogger("tensorpulse.sinks.forwarder")

DEFAULT_GROUP = "tensorpulse-notify"


@dataclass(frozen=True)
class ForwarderSettings:
    """Everything `tensorpulse notify` was told, checked once."""

    bootstrap: str | None = None
    group: str = DEFAULT_GROUP
    job_regex: str | None = None
    topic: str = ALERTS_TOPIC
    start: str = "latest"
    lookback: float | None = 7 * 24 * 3600.0
    dedupe_window: int = 10_000
    progress_interval: float = 60.0
    session_timeout_ms: int = 6000
    kafka_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.start not in ("latest", "earliest"):
            raise ConfigError(f"Expected `start` to be 'latest' or 'earliest' but got {self.start!r}")
        job_selector(self.job_regex)  # the selector of `tensorpulse alerts --job` too
        if self.dedupe_window < 1:
            raise ConfigError(f"Expected `dedupe_window` to be at least 1 but got {self.dedupe_window}")


def parse_duration(text: str) -> float | None:
    """'90s', '15m', '24h', '7d' or plain seconds -> seconds; 'all' -> None (the whole topic)."""
    text = text.strip().lower()
    if text == "all":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text)
    if not m:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 90s, 15m, 24h, 7d or 'all'")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _duration(seconds: float) -> str:
    """Seconds in the largest unit of `parse_duration` that fits (604800 -> '7d')."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class SeenIds:
    """The last `size` event ids, to drop re-deliveries within one run in constant memory."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def check_and_add(self, event_id: str) -> bool:
        """True if `event_id` was seen (and refreshes it), else remembers it and returns False."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return True
        self._ids[event_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return False


@dataclass
class ForwarderStats:
    events: int = 0
    forwarded: int = 0
    duplicates: int = 0
    filtered: int = 0
    malformed: int = 0
    sink_errors: int = 0


class Forwarder:
    """Consumes the alerts topic in a consumer group and hands each new event to every sink."""

    def __init__(
        self,
        settings: ForwarderSettings,
        *,
        alertmanager: AlertmanagerSink | None = None,
        webhooks: Sequence[WebhookSink] = (),
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if alertmanager is None and not webhooks:
            raise ConfigError("nothing to forward to: give at least one --alertmanager or --webhook URL")
        self.settings = settings
        self.alertmanager = alertmanager
        self.webhooks = list(webhooks)
        self.stop = stop or threading.Event()
        self.ready = threading.Event()
        self.clock = clock
        self.stats = ForwarderStats()
        self._seen = SeenIds(settings.dedupe_window)
        self._job_re = job_selector(settings.job_regex)
        self._start_offsets: dict[int, int] = {}

    # -- configuration -------------------------------------------------------------------------
    def _conf(self, group: str) -> dict[str, Any]:
        s = self.settings
        return client_config(
            s.bootstrap,
            {
                "group.id": group,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": s.start,
                "session.timeout.ms": s.session_timeout_ms,
                "heartbeat.interval.ms": min(1000, s.session_timeout_ms // 3),
                "fetch.wait.max.ms": 100,
                **s.kafka_config,
            },
        )

    def _decode(self, msg: Any, count: bool = True) -> AlertEvent | None:
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            log.warning("consumer error: %s", err)
            return None
        try:
            ev = AlertEvent.from_json(msg.value())
        except DecodeError as exc:
            self.stats.malformed += count
            log.warning(
                "skipping a malformed message at %s[%d]@%d: %s",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                exc,
            )
            return None
        if self._job_re is not None and not self._job_re.search(ev.job):
            self.stats.filtered += count
            return None
        return ev

    # -- start: rebuild what is firing ---------------------------------------------------------
    def rebuild(self, timeout: float = 10.0) -> int:
        """Read the lookback window (no group) into the firing set; note where the topic ended.

        Returns the number of events read. A topic that does not exist yet means nothing fired.
        """
        s = self.settings
        consumer = Consumer(self._conf(f"tensorpulse-notify-rebuild-{uuid.uuid4().hex[:8]}"))
        n = 0
        try:
            meta = consumer.list_topics(s.topic, timeout=timeout)
            t = meta.topics.get(s.topic)
            if t is None or t.error is not None or not t.partitions:
                log.info("%s does not exist yet: nothing is firing", s.topic)
                return 0
            parts = sorted(t.partitions)
            marks = {
                p: consumer.get_watermark_offsets(TopicPartition(s.topic, p), timeout=timeout) for p in parts
            }
            if s.lookback is None:
                start = {p: marks[p][0] for p in parts}
            else:
                since_ms = int((self.clock() - s.lookback) * 1000)
                found = consumer.offsets_for_times(
                    [TopicPartition(s.topic, p, since_ms) for p in parts], timeout=timeout
                )
                start = {
                    tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1] for tp in found
                }
            consumer.assign([TopicPartition(s.topic, p, start[p]) for p in parts])
            pos = dict(start)
            high = {p: marks[p][1] for p in parts}
            pending = {p for p in parts if pos[p] < high[p]}
            idle_since, patience = time.monotonic(), 5.0  # the first fetch may take a while
            while pending and time.monotonic() - idle_since < patience and not self.stop.is_set():
                msgs = consumer.consume(1000, 0.2)
                if msgs:
                    idle_since, patience = time.monotonic(), 1.0
                for m in msgs:
                    if m.error() is None:
                        pos[m.partition()] = m.offset() + 1
                        if pos[m.partition()] >= high[m.partition()]:
                            pending.discard(m.partition())
                    ev = self._decode(m, count=False)
                    if ev is None:
                        continue
                    n += 1
                    if self.alertmanager is not None:
                        self.alertmanager.remember(ev)
            # Where this read got to (not the high watermark: an open transaction may sit before it).
            self._start_offsets = pos
        finally:
            consumer.close()
        firing = len(self.alertmanager.firing) if self.alertmanager is not None else 0
        log.info("read %d recent alert event(s) from %s: %d alert(s) firing", n, s.topic, firing)
        return n

    # -- the loop ------------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = consumer.committed(partitions, timeout=10)
        for tp in committed:
            if tp.offset < 0 and self.settings.start == "latest":
                # A new group starts where the rebuild stopped, so nothing falls in between.
                tp.offset = self._start_offsets.get(tp.partition, OFFSET_END)
        consumer.assign(committed)
        log.info(
            "consuming %s as group %s from %s",
            self.settings.topic,
            self.settings.group,
            ", ".join(
                f"[{tp.partition}]@{tp.offset if tp.offset >= 0 else self.settings.start}" for tp in committed
            ),
        )
        if not self.ready.is_set():
            log.info("waiting for alert events to forward to %s (Ctrl-C or SIGTERM stops)", self.receivers())
        self.ready.set()

    def receivers(self) -> str:
        """Where events go, in words (URLs reduced to scheme, host and port)."""
        posters = list(self.alertmanager.posters) if self.alertmanager else []
        posters += [w.poster for w in self.webhooks]
        return ", ".join(p.name for p in posters)

    def deliver(self, events: list[AlertEvent]) -> None:
        """Hand events to every sink; a sink's bug is logged and counted, never fatal."""
        sinks: list[Callable[[], None]] = []
        if self.alertmanager is not None:
            am = self.alertmanager
            sinks.append(lambda: am.add(events, now=self.clock()))
        sinks += [lambda w=w: w.add(events) for w in self.webhooks]
        for run in sinks:
            try:
                run()
            except DeliveryInterrupted:
                raise
            except Exception:
                self.stats.sink_errors += 1
                log.exception("a sink failed unexpectedly; continuing with the next")
        self.stats.forwarded += len(events)

    def run(self) -> ForwarderStats:
        """Rebuild, then forward until `stop` is set; returns the counters."""
        if self.alertmanager is not None:
            for p in self.alertmanager.posters:
                p.sleep = self.stop.wait
        for w in self.webhooks:
            w.poster.sleep = self.stop.wait
        s = self.settings
        since = "all" if s.lookback is None else f"the last {_duration(s.lookback)}"
        log.info(
            "reading %s of %s at %s to rebuild what is firing", since, s.topic, resolve_bootstrap(s.bootstrap)
        )
        self.rebuild()
        if self.alertmanager is not None:
            self.alertmanager.tick(self.clock())
        consumer = Consumer(self._conf(self.settings.group))
        consumer.subscribe([self.settings.topic], on_assign=self._on_assign)
        last_progress = time.monotonic()
        try:
            while not self.stop.is_set():
                msgs = consumer.consume(500, 0.5)
                events = []
                for m in msgs:
                    ev = self._decode(m)
                    if ev is None:
                        continue
                    self.stats.events += 1
                    if self._seen.check_and_add(ev.id):
                        self.stats.duplicates += 1
                        continue
                    events.append(ev)
                if events:
                    try:
                        self.deliver(events)
                    except DeliveryInterrupted:
                        log.info(
                            "stopping mid-delivery: this batch is not committed and will be re-delivered"
                        )
                        break
                if msgs:
                    consumer.commit(asynchronous=False)
                if self.alertmanager is not None:
                    try:
                        self.alertmanager.tick(self.clock())
                    except DeliveryInterrupted:
                        break
                if time.monotonic() - last_progress >= self.settings.progress_interval:
                    last_progress = time.monotonic()
                    log.info("progress: %s", self.summary())
        finally:
            consumer.close()
        log.info("stopped: %s", self.summary())
        return self.stats

    def summary(self) -> str:
        """One line: events, duplicates, per-receiver outcomes and what is firing."""
        s = self.stats
        parts = [
            f"{s.forwarded} event(s) forwarded",
            f"{s.duplicates} duplicate(s) dropped",
            f"{s.malformed} malformed",
        ]
        if s.filtered:
            parts.append(f"{s.filtered} of other jobs")
        posters = list(self.alertmanager.posters) if self.alertmanager else []
        posters += [w.poster for w in self.webhooks]
        for p in posters:
            parts.append(
                f"{p.name}: {p.stats.delivered} ok, {p.stats.failed} failed, {p.stats.retries} retries"
            )
        if self.alertmanager is not None:
            parts.append(f"{len(self.alertmanager.firing)} firing")
        if s.sink_errors:
            parts.append(f"{s.sink_errors} sink error(s)")
        return "; ".join(parts)


def build_forwarder(
    settings: ForwarderSettings,
    *,
    alertmanager_urls: Sequence[str] = (),
    webhook_urls: Sequence[str] = (),
    webhook_headers: Sequence[str] = (),
    labels: Sequence[str] = (),
    resend_interval: float = 60.0,
    firing_ttl: float | None = 24 * 3600.0,
    generator_url: str | None = None,
    policy: RetryPolicy | None = None,
    stop: threading.Event | None = None,
) -> Forwarder:
    """Assemble the sinks from command-line values (URLs, 'Name: value' headers, key=value labels)."""
    policy = policy or RetryPolicy()
    if resend_interval <= 0:
        raise ConfigError(f"Expected `resend_interval` to be positive but got {resend_interval}")
    extra: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(
                f"invalid label {item!r}: expected key=value with key matching [A-Za-z_][A-Za-z0-9_]*"
            )
        extra[key] = value
    headers = dict(parse_header(h) for h in webhook_headers)
    am = None
    if alertmanager_urls:
        posters = [
            JsonPoster(api_url(u), policy, name=f"alertmanager {safe_url(u)}") for u in alertmanager_urls
        ]
        am = AlertmanagerSink(
            posters,
            resend_interval=resend_interval,
            firing_ttl=firing_ttl,
            extra_labels=extra,
            generator_url=generator_url,
        )
    hooks = [
        WebhookSink(JsonPoster(u, policy, headers=headers, name=f"webhook {safe_url(u)}"))
        for u in webhook_urls
    ]
    return Forwarder(settings, alertmanager=am, webhooks=hooks, stop=stop)
