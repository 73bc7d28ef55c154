"""Actions for a running job (stop, checkpoint), received on the job's control topic.

Message format (JSON, UTF-8, one object per Kafka message, keyed by job id):

    {"v": 1, "action": "stop" | "checkpoint", "job": str, "rule": str, "alert_id": str,
     "step": int | null, "reason": str, "ts": float (unix seconds)}

The codec is tensorpulse.actions (re-exported here). The listener
reads the whole topic from the beginning without a consumer group (explicit assignment, no
commits), so a hook that starts after an action was sent still sees it, and it ignores actions
older than its own start (minus a grace period) so that a restarted job is not stopped by an
alert about its previous run.

Anyone who can write the topic can flood it (a broken sender, an attacker): the listener then
costs training at most a small, fixed share of one core. Its work is paced by the CPU time it
spends (`max_busy_share`, in bursts of `burst_s`), never by dropping messages, so a genuine stop
behind a flood is honoured once the messages before it are read; malformed and ignored
messages are summarised in one log line per `FLOOD_LOG_INTERVAL_S`, not one each; and a repeated
action reaches the callbacks at most once per `ACTION_INTERVAL_S`.
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

from .publisher import _LibrdkafkaLog, _Once

log = logging.getLogger("tensorpulse.producers")

#: Actions older than the listener's start minus this many seconds are ignored.
GRACE_S = 5.0
#: The listener's CPU time is at most this share of wall time (beyond a burst): a flood of control
#: messages costs a training job at most about this much of one core (bench/control_flood.py). Its
#: thread's CPU time is what is charged (`time.thread_time`: handling and librdkafka's work on its
#: behalf in `consume`), or the wall time of handling a batch where that is longer (on a busy machine
#: the thread is descheduled while it holds the GIL, and training waits that long): 0.5 % of wall is
#: 1 % of a training thread that gets half a core on a busy node, and through the GIL that time comes
#: out of training's. At about 6 us a message, 0.5 % reads some 800 flood messages a second: a
#: genuine stop behind 10,000 arrives in about 12 s on an idle machine, later on a busy one.
MAX_BUSY_SHARE = 0.005
#: CPU seconds of handling the listener may spend at once before the pacing starts (a few thousand
#: messages: ordinary traffic, a handful of actions, never waits).
BURST_S = 0.02
#: Once paced, the listener works again only when this much CPU time is owed to it, so a flood is
#: read in a couple of pieces per second (every RESUME_S / MAX_BUSY_SHARE = 0.5 s) instead of one
#: message every couple of milliseconds: each wake takes the GIL from the training thread, which then
#: waits for it again, and hundreds of those hand-overs a second cost training more than the
#: listener's own CPU time (bench/control_flood.py).
RESUME_S = 0.0025
#: Messages taken from librdkafka per `consume` call, handled and charged as one piece: one GIL
#: acquisition and one reading of the clocks per batch instead of per message.
BATCH = 256
#: librdkafka's local queue of fetched messages (kilobytes, fetched in pieces of this size; None: its
#: defaults, 64 MB or 100,000 messages): fetching stops once this much is queued, so a flood is
#: fetched about as fast as the paced listener reads it, not all at once by librdkafka's own threads,
#: whose CPU time no budget paces (bench/control_flood.py --blocks: with its defaults the process
#: spent 4-9 % more CPU per training step under a flood, bounded -0.1 to +1.7 %), and held in 1 MB,
#: not 64. Once the queue is full, librdkafka fetches again after `fetch.queue.backoff.ms` (1 s): a
#: flood is then read at about 1 MB a second at most, whatever the budget.
PREFETCH_KB: int | None = 1024
#: A flood (ignored messages, pacing) is logged once per this many seconds, with counts.
FLOOD_LOG_INTERVAL_S = 10.0
#: Another action of the same kind within this many seconds of the last one is counted, not dispatched.
ACTION_INTERVAL_S = 10.0


def group_prefix(job: str) -> str:
    """What the listener's consumer group starts with (it only finds its coordinator: no commits)."""
    return f"tensorpulse-hook-{job}-"


ActionCallback = Callable[[dict[str, Any]], None]


class WorkBudget:
    """Pacing by CPU time: work may use `share` of the wall clock, in bursts of up to `burst_s`.

    A token bucket whose tokens are CPU seconds: it refills at `share` seconds per second and
    holds at most `burst_s`. `spend(cpu_seconds, now)` charges a piece of work and returns how
    long to wait before the next one (0 while there is credit). A bucket that ran dry waits until
    it holds `resume_s` again (at most `burst_s`), so paced work comes in pieces of about that much
    CPU time rather than one small piece per refill. Pure: the caller measures and waits.
    """

    def __init__(self, share: float, burst_s: float, now: float, resume_s: float = 0.0) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"Expected `share` to be in (0, 1] but got {share}")
        if burst_s <= 0:
            raise ValueError(f"Expected `burst_s` to be positive but got {burst_s}")
        if resume_s < 0:
            raise ValueError(f"Expected `resume_s` to be at least 0 but got {resume_s}")
        self.share = share
        self.burst_s = burst_s
        self.resume_s = min(resume_s, burst_s)
        self._credit = burst_s
        self._last = now

    def spend(self, cpu_seconds: float, now: float) -> float:
        """Charge `cpu_seconds` of work done by `now`; seconds to wait before the next piece."""
        self._credit = min(self.burst_s, self._credit + max(0.0, now - self._last) * self.share) - cpu_seconds
        self._last = now
        return 0.0 if self._credit >= 0 else (self.resume_s - self._credit) / self.share


class FloodLog:
    """Log lines about control messages, at most one per kind per interval, the rest as counts.

    The first malformed message of an interval is logged with its reason; later ones, and
    messages ignored as stale or for another job, are counted and summarised in one line when
    the interval ends (`flush`), together with the time the listener spent paced.
    """

    def __init__(self, topic: str, interval_s: float, now: float) -> None:
        self.topic = topic
        self.interval_s = interval_s
        self._since = now
        self._counts: collections.Counter[str] = collections.Counter()
        self._paced_s = 0.0

    def malformed(self, exc: DecodeError) -> None:
        if not any(k.startswith("malformed") for k in self._counts):
            log.warning(
                "tensorpulse: ignoring a malformed control message on %s: %s (more within %.0f s are "
                "counted, then summarised)",
                self.topic,
                exc,
                self.interval_s,
            )
        self._counts[f"malformed ({exc.reason})"] += 1

    def ignored(self, why: str) -> None:
        self._counts[why] += 1

    def paced(self, seconds: float) -> None:
        self._paced_s += seconds

    def flush(self, now: float, force: bool = False) -> None:
        """Write the summary of the interval if it is over (or `force`), and start a new one."""
        if not force and now - self._since < self.interval_s:
            return
        logged_one = any(k.startswith("malformed") for k in self._counts)
        if self._counts or self._paced_s:
            total = sum(self._counts.values()) - (1 if logged_one else 0)
            level = logging.WARNING if logged_one or self._paced_s else logging.DEBUG
            parts = ", ".join(f"{n} {why}" for why, n in self._counts.most_common())
            log.log(
                level,
                "tensorpulse: control topic %s: %d more message(s) ignored in the last %.0f s (%s); "
                "handling paced for %.1f s to spare training",
                self.topic,
                max(0, total),
                now - self._since,
                parts or "none",
                self._paced_s,
            )
        self._since = now
        self._counts.clear()
        self._paced_s = 0.0


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
        max_busy_share: float = MAX_BUSY_SHARE,
        burst_s: float = BURST_S,
        resume_s: float = RESUME_S,
        prefetch_kb: int | None = PREFETCH_KB,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.job = validate_job(job)
        self.topic = control_topic(job, prefix)
        self.start_ts = time.time() if start_ts is None else start_ts
        self.grace_s = grace_s
        self.stop_requested = threading.Event()
        #: The most recent accepted actions (newest last).
        self.actions: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._callbacks: list[ActionCallback] = []
        #: Messages read, by what became of them: accepted, coalesced, stale, other_job, malformed.
        self.counts: collections.Counter[str] = collections.Counter()
        #: Seconds the listener has waited for its CPU budget so far: 0 until its first burst is spent.
        self.paced_s = 0.0
        #: CPU seconds of the listener's thread charged to its budget so far (bench/control_flood.py).
        self.cpu_s = 0.0
        self._clock = clock
        self._cpu_clock = cpu_clock  # the listener thread's CPU time, what the budget charges
        self._once = _Once()
        self._budget = WorkBudget(max_busy_share, burst_s, clock(), resume_s)
        self._flood = FloodLog(self.topic, FLOOD_LOG_INTERVAL_S, clock())
        self._dispatched: dict[str, float] = {}  # action kind -> when its callbacks last ran
        self._closing = threading.Event()
        self._poll = poll_interval_s
        # The Kafka properties as resolved at the edge (the hook's settings); None: resolved now.
        self._conf = client_config(bootstrap, kafka=kafka_config)
        self._conf.update(
            {
                "group.id": group_id or f"{group_prefix(job)}{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 20,
            }
        )
        if prefetch_kb is not None:
            self._conf.update(
                {
                    "queued.max.messages.kbytes": prefetch_kb,
                    "queued.min.messages": 1000,
                    "max.partition.fetch.bytes": prefetch_kb * 1024,
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
        """Decode, filter and dispatch one message; returns the action if it was accepted.

        A stop always sets `stop_requested`. An action of the same kind as one dispatched less
        than ACTION_INTERVAL_S ago is accepted but coalesced: no log line, no callbacks.
        """
        now = self._clock()
        self._flood.flush(now)
        return self._handle(payload, now)

    def _handle(self, payload: bytes, now: float) -> dict[str, Any] | None:
        """`handle` at `now`, without the flood log's interval check (done once per batch)."""
        try:
            action = decode_action(payload)
        except DecodeError as exc:
            self.counts["malformed"] += 1
            self._flood.malformed(exc)
            return None
        if action["job"] != self.job:
            self.counts["other_job"] += 1
            self._flood.ignored("for another job")
            return None
        if action["ts"] < self.start_ts - self.grace_s:
            self.counts["stale"] += 1
            self._flood.ignored("older than this run")
            return None
        self.actions.append(action)
        if action["action"] == "stop":
            self.stop_requested.set()
        last = self._dispatched.get(action["action"])
        if last is not None and now - last < ACTION_INTERVAL_S:
            self.counts["coalesced"] += 1
            self._flood.ignored(f"repeated {action['action']}")
            return action
        self._dispatched[action["action"]] = now
        self.counts["accepted"] += 1
        if action["action"] == "stop":
            log.warning(
                "tensorpulse: stop requested for job %s by rule %r (alert %s): %s",
                self.job,
                action["rule"],
                action["alert_id"],
                action["reason"],
            )
        for cb in list(self._callbacks):
            try:
                cb(action)
            except Exception:  # noqa: BLE001 - user callbacks must not kill the listener
                log.exception("tensorpulse: control action callback %r failed", cb)
        return action

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

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
                cpu = self._cpu_clock()
                batch = consumer.consume(BATCH, self._poll)
                wait = self.take(batch, cpu)
                if wait > 0 and self._closing.wait(wait):
                    break
        except Exception:  # noqa: BLE001
            log.exception("tensorpulse: control listener failed")
        finally:
            self._flood.flush(self._clock(), force=True)
            with contextlib.suppress(Exception):
                consumer.close()

    def take(self, batch: list[Any], cpu_before: float) -> float:
        """Handle a batch of Kafka messages (objects with `error()` and `value()`, as `consume`
        returns them), charge the thread's CPU time since `cpu_before` (the `consume` call included:
        librdkafka builds the messages on this thread), or the wall time of the handling if longer
        (the GIL held while descheduled), to the work budget, and return how long to wait before the
        next batch (0 while there is credit), which `paced_s` and the flood log count. Every message of the batch is handled (and counted) before any wait, so a stop in
        it is honoured at once; an empty batch costs no budget worth waiting for."""
        now = self._clock()
        self._flood.flush(now)
        for msg in batch:
            err = msg.error()
            if err is not None:
                from confluent_kafka import KafkaError

                if err.code() != KafkaError._PARTITION_EOF:
                    self._once(f"msg:{err.code()}", logging.WARNING, "tensorpulse: control topic: %s", err)
                continue
            self._handle(msg.value() or b"", now)
        cpu = self._cpu_clock() - cpu_before
        end = self._clock()
        self.cpu_s += cpu
        # The GIL is held while handling, and on a busy machine the thread may be descheduled while it
        # holds it: the wall time of the handling is then what training waits (likely why, at load
        # 10-35, a flood cost 1.26x in wall time but 1.02x in the training thread's CPU time when only
        # CPU time was charged: bench/README.md, Hostile input).
        wait = self._budget.spend(max(cpu, end - now), end)
        if wait > 0:
            self.paced_s += wait
            self._flood.paced(wait)
        return wait
