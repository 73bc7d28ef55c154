"""The stream worker: Quix Streams consumes every job's reductions topic and drives the rules.

Quix owns consumption, per-job state (RocksDB with changelog topics, so state survives a
restart), offsets and exactly-once delivery of outputs. This module only wires it up: decode
with the shared codec (bad records go to the dead-letter topic, counted), evaluate with
`JobEvaluator`, and emit alerts, actions and metrics. Workers in one consumer group share
the jobs' partitions; run more of them to scale out.

Two kinds of rule need more than one job's record at a time: clock rules (StalledTrainingRule)
are ticked by a timer between records (design and guarantees: stream/clock.py), and cross-run
rules (SimilarAcrossRuns) get other jobs' records through an internal topic (stream/crossrun.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from quixstreams import Application
from quixstreams.context import message_context
from quixstreams.models import TopicConfig
from quixstreams.state import State
from quixstreams.state.rocksdb import RocksDBOptions

from tensorpulse import wire
from tensorpulse.actions import encode_action
from tensorpulse.errors import DecodeError
from tensorpulse.kafka import client_config, redact
from tensorpulse.rules.config import RuleSpec, load_rules, rules_for_job
from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.topics import ALERTS_TOPIC, DEADLETTER_TOPIC, control_topic, validate_job

from .clock import ClockMirror, clock_interval, data_partitions
from .crossrun import KeyedValue, crossrun_topic, forward_payload
from .deadletter import envelope
from .discovery import JobDiscovery
from .evaluator import JobEvaluator, Transition, is_cross_run
from .lag import LagMonitor
from .published import PublishedAlerts, fence
from .settings import WorkerSettings

log = logging.getLogger("tensorpulse.stream")

_EVAL_KEY = "eval"

#: One RocksDB store per job partition holds a few KB of rule state, so RocksDB's defaults
#: (64 MB memtables x 3, a 1 GB block cache) only make memory grow with the number of jobs
#: until the first flush, an hour or more later (bench/load.py soak measured 3.5-7 MB/min).
ROCKSDB_OPTIONS = RocksDBOptions(
    write_buffer_size=512 << 10,
    max_write_buffer_number=2,
    target_file_size_base=8 << 20,
    block_cache_size=8 << 20,
    max_total_wal_size=16 << 20,
)


class _StateSchemas(MutableMapping[tuple[str, int, int], Any]):
    """Announced tensor names, cached in memory and persisted in the job's Quix state."""

    def __init__(self, state: State, cache: wire.SchemaCache) -> None:
        self._state, self._cache = state, cache

    def __getitem__(self, key: tuple[str, int, int]) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            value = self._state.get(f"schema:{key[1]}:{key[2]}")
            if value is None:
                raise
            self._cache[key] = value
            return value

    def __setitem__(self, key: tuple[str, int, int], value: Any) -> None:
        if self._cache.get(key) != value:
            self._state.set(f"schema:{key[1]}:{key[2]}", [list(value[0]), list(value[1])])
        self._cache[key] = value

    def __delitem__(self, key: tuple[str, int, int]) -> None:
        self._cache.pop(key, None)
        self._state.delete(f"schema:{key[1]}:{key[2]}")

    def __iter__(self):
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)


class Worker:
    """Runs until stopped; rebuilds its Quix application when a new job topic appears."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        metrics: WorkerMetrics | None = None,
        on_alert: Callable[[Any], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.specs: list[RuleSpec] = load_rules(settings.rules_file)
        self._evaluators: dict[str, JobEvaluator] = {}
        self._cross_evaluators: dict[str, JobEvaluator] = {}
        self._cross_specs = [s for s in self.specs if is_cross_run(s)]
        self._crossrun_topic = crossrun_topic(settings.group)
        self._targets: dict[str, list[tuple[str, list[RuleSpec]]]] = {}
        self._clock = ClockMirror()
        self._clock_every = clock_interval(self.specs)
        self._owning = threading.Event()  # partitions assigned (cleared from a revoke to the next assign)
        self._direct: Producer | None = None  # the clock timer's own producer
        self._schemas = wire.SchemaCache()
        self._published = PublishedAlerts()
        self._on_alert = on_alert
        self._stop = threading.Event()
        self._rebuild = threading.Event()
        self._app: Application | None = None
        self._jobs: dict[str, str] = {}
        self._next: tuple[dict[str, str], Application] | None = None  # built ahead by the watcher
        self._warned: dict[str, float] = {}
        self.ready = threading.Event()  # set once the first application is running
        self._joined = threading.Event()  # the running application completed a group join
        base = client_config(settings.bootstrap, settings.kafka_config)
        self._base_config = base
        self._discovery = JobDiscovery(base, settings.topic_prefix, settings.jobs_regex)
        self._lag = LagMonitor(base, settings.group, self.metrics)

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        """Block until `stop()` (or SIGINT/SIGTERM)."""
        s = self.settings
        log.info(
            "worker starting: group=%s rules=%s kafka=%s",
            s.group,
            [x.name for x in self.specs],
            redact(self._base_config),
        )
        if s.guarantee == "exactly-once":
            self._take_over()
        watcher = threading.Thread(target=self._watch, name="tensorpulse-discovery", daemon=True)
        watcher.start()
        if self._clock_every is not None:
            threading.Thread(target=self._clock_loop, name="tensorpulse-clock", daemon=True).start()
        backoff = 1.0
        while not self._stop.is_set():
            prepared, self._next = self._next, None
            if prepared is not None:
                jobs, app = prepared  # built by the watcher while the previous one ran
            else:
                found = self._wait_for_jobs()
                if found is None:
                    break
                try:
                    jobs, app = found, self._build(found)
                except Exception as exc:  # the broker went away between listing and building
                    log.warning("building the stream application failed (%s); retrying in %.0fs", exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
            self._jobs = jobs
            self._targets = {}
            self.metrics.set_jobs(jobs)
            # Order matters: clear the flag before publishing the app, so that the watcher never
            # mistakes its repeated stop of the old app for one of the new app.
            self._rebuild.clear()
            self._joined.clear()
            self._app = app
            log.info("following %d job(s): %s", len(jobs), ", ".join(sorted(jobs)))
            self.ready.set()
            try:
                app.run()
                backoff = 1.0
            except Exception as exc:  # noqa: BLE001
                # A broker outage longer than the transaction timeout fails the open
                # transaction, and Quix gives up. Start again from the last commit: state comes
                # back from the store and changelog, offsets from the group, nothing is lost.
                self._app = None
                if self._stop.is_set():
                    break
                self.metrics.restarts.inc()
                log.error(
                    "stream application failed (%s: %s); restarting from the last commit in %.0fs",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                self._next = None
                if s.guarantee == "exactly-once":
                    self._take_over()
                continue
            self._app = None
            if not self._rebuild.is_set():
                break  # stopped by a signal or by stop()
        self._stop.set()
        if self._direct is not None:
            self._direct.flush(5)
        log.info("worker stopped")

    def _take_over(self) -> None:
        """Fence this worker's crashed former self, then note the alerts it already published."""
        s = self.settings
        try:
            fence(self._base_config, s.transactional_id())
            n = self._published.scan(self._base_config, ALERTS_TOPIC)
            log.info("took over %s; %d recent alert id(s) on %s", s.transactional_id(), n, ALERTS_TOPIC)
        except Exception as exc:  # the broker may be down at start: Quix retries, we carry on
            log.warning("could not check for a previous run's open transaction: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        app = self._app
        if app is not None:
            app.stop()

    def _wait_for_jobs(self) -> dict[str, str] | None:
        logged = False
        while not self._stop.is_set():
            try:
                jobs = self._discovery.jobs()
            except Exception as exc:  # broker unreachable: keep trying, say so once
                if not logged:
                    log.warning("cannot list topics on %s yet: %s", self.settings.bootstrap, exc)
                    logged = True
                jobs = {}
            if jobs:
                return jobs
            if not logged:
                log.info("no job topics yet under prefix %r; waiting", self.settings.topic_prefix)
                logged = True
            self._stop.wait(self.settings.discovery_interval)
        return None

    def _watch(self) -> None:
        """Discovery and lag polling; asks the application to rebuild when the job set grows."""
        next_lag = 0.0
        while not self._stop.wait(self.settings.discovery_interval):
            app = self._app
            if app is None:
                continue
            if self._rebuild.is_set():
                # A stop that reaches Quix before its run() started is forgotten: repeat it until
                # the main loop has switched to the prepared application.
                app.stop()
                continue
            try:
                jobs = self._discovery.jobs()
            except Exception as exc:
                log.debug("topic listing failed: %s", exc)
                continue
            new = sorted(set(jobs) - set(self._jobs))
            if new and not self._joined.is_set():
                # Leaving a group in the middle of its first join can wedge a broker's group
                # (seen on Tansu); wait for the running application's join to complete.
                continue
            if new:
                log.info("new job(s): %s; re-subscribing", ", ".join(new))
                # Build the next application (which creates its topics) while this one still
                # runs: the switch-over then costs only the group rejoin.
                try:
                    self._next = (jobs, self._build(jobs))
                except Exception as exc:
                    log.warning("preparing the application for %s failed (%s); retrying", new, exc)
                    continue
                self._rebuild.set()
                app.stop()
            if time.monotonic() >= next_lag:
                next_lag = time.monotonic() + self.settings.lag_interval
                self._lag.poll(self._jobs)

    def _prepare_topics(self, new: list[str], jobs: dict[str, str]) -> None:
        """Create jobs' control and changelog topics in one batch, ahead of Quix (1 s per topic).

        The changelog name follows Quix Streams 3.x (`changelog__<group>--<topic>--default`); should
        it ever differ, Quix simply creates its own and only this shortcut is lost.
        """
        s, d = self.settings, self._discovery
        d.ensure_topics([control_topic(j, s.topic_prefix) for j in new], s.retention_ms)
        for j in new:
            topic = jobs[j]
            d.ensure_topics(
                [f"changelog__{s.group}--{topic}--default"],
                s.retention_ms,
                partitions=d.partitions.get(topic, 1),
                compact=True,
            )
        if self._cross_specs:
            d.ensure_topics([self._crossrun_topic], s.retention_ms)
            d.ensure_topics(
                [f"changelog__{s.group}--{self._crossrun_topic}--default"], s.retention_ms, compact=True
            )

    # ------------------------------------------------------------------ the pipeline
    def _build(self, jobs: dict[str, str]) -> Application:
        s = self.settings
        consumer_extra = {
            "session.timeout.ms": s.session_timeout_ms,
            "heartbeat.interval.ms": min(1000, s.session_timeout_ms // 3),
            "fetch.wait.max.ms": 10,
            **{k: v for k, v in self._base_config.items() if k != "bootstrap.servers"},
        }
        producer_extra = {
            "linger.ms": 5,
            "compression.type": "lz4",
            # A stable id: a restarted worker fences its crashed self and aborts the transaction it
            # left open (Quix would pick a random id, leaving it to the broker's timeout).
            **(
                {"transactional.id": s.transactional_id(), "transaction.timeout.ms": s.transaction_timeout_ms}
                if s.guarantee == "exactly-once"
                else {}
            ),
            **{k: v for k, v in self._base_config.items() if k != "bootstrap.servers"},
        }
        app = Application(
            broker_address=s.bootstrap,
            consumer_group=s.group,
            auto_offset_reset=s.auto_offset_reset,
            processing_guarantee=s.guarantee,
            commit_interval=s.commit_interval,
            state_dir=str(Path(s.state_dir)),
            consumer_extra_config=consumer_extra,
            producer_extra_config=producer_extra,
            loglevel=os.environ.get("TENSORPULSE_QUIX_LOGLEVEL", s.loglevel),
            on_processing_error=self._on_processing_error,
            consumer_poll_timeout=0.1,  # also bounds how long a stop (for a rebuild) takes
            rocksdb_options=ROCKSDB_OPTIONS,
        )
        self._watch_assignments(app)
        self._prepare_topics(sorted(jobs), jobs)
        cfg = TopicConfig(
            num_partitions=1,
            replication_factor=s.replication_factor,
            extra_config={"retention.ms": str(s.retention_ms)},
        )
        alerts = app.topic(ALERTS_TOPIC, value_serializer="bytes", key_serializer="bytes", config=cfg)
        dead = app.topic(DEADLETTER_TOPIC, value_serializer="bytes", key_serializer="bytes", config=cfg)
        cross = None
        if self._cross_specs:
            cross = app.topic(
                self._crossrun_topic,
                value_deserializer="bytes",
                key_deserializer="bytes",
                value_serializer=KeyedValue(),
                key_serializer="bytes",
                config=cfg,
            )
        controls = {}
        for job, topic_name in sorted(jobs.items()):
            source = app.topic(topic_name, value_deserializer="bytes", key_deserializer="bytes", config=cfg)
            control = controls[job] = app.topic(
                control_topic(job, s.topic_prefix),
                value_serializer="bytes",
                key_serializer="bytes",
                config=cfg,
            )
            out = app.dataframe(source).apply(self._processor(job), stateful=True, metadata=True)
            out.apply(lambda r: r[0], expand=True).to_topic(alerts)
            out.apply(lambda r: r[1], expand=True).to_topic(dead)
            out.apply(lambda r: r[2], expand=True).to_topic(control)
            if cross is not None:
                out.apply(lambda r: r[3], expand=True).to_topic(cross, key=lambda m: m[0])
        if cross is not None:
            # Cross-run rules: both sides of every comparison arrive here keyed by the job they alert on.
            out = app.dataframe(cross).apply(self._cross_processor, stateful=True, metadata=True)
            out.apply(lambda r: r[0], expand=True).to_topic(alerts)
            out.apply(lambda r: r[1], expand=True).to_topic(dead)
            acts = out.apply(lambda r: r[2], expand=True)
            acts = acts.filter(lambda v: json.loads(v).get("job") in controls)
            acts.to_topic(lambda v, k, ts, h: controls[json.loads(v)["job"]])
        return app

    def _watch_assignments(self, app: Application) -> None:
        """Set `_joined` when the application's consumer completes a rebalance.

        Quix Streams has no public hook for it, so this wraps its partition-assignment callback
        (quixstreams 3.x). Should that ever change, the worker falls back to a fixed grace period.
        """
        original = getattr(app, "_on_assign", None)
        if original is None:
            threading.Timer(2.0 * self.settings.session_timeout_ms / 1000, self._joined.set).start()
            self._owning.set()  # no hook: the clock mirror is then never pruned on rebalances
            return

        def on_assign(consumer: Any, partitions: list[Any], *args: Any, **kwargs: Any) -> Any:
            try:
                return original(consumer, partitions, *args, **kwargs)
            finally:
                if self._app is app:
                    self._joined.set()
                if partitions:  # the full assignment (Quix uses the eager "range" strategy)
                    gone = self._clock.retain(data_partitions(partitions, self._jobs.values()))
                    if gone:
                        log.info("no longer watching %s for stalls (partitions moved)", ", ".join(gone))
                    self._owning.set()

        def revoked(original_cb: Callable[..., Any]) -> Callable[..., Any]:
            def on_revoke(*args: Any, **kwargs: Any) -> Any:
                self._owning.clear()  # the timer waits for the next assignment
                return original_cb(*args, **kwargs)

            return on_revoke

        app._on_assign = on_assign
        for name in ("_on_revoke", "_on_lost"):
            cb = getattr(app, name, None)
            if cb is not None:
                setattr(app, name, revoked(cb))

    def _evaluator(self, job: str) -> JobEvaluator:
        """The evaluator of a job's own topic: every rule that applies to it but the cross-run ones."""
        ev = self._evaluators.get(job)
        if ev is None:
            specs = [s for s in rules_for_job(self.specs, job) if not is_cross_run(s)]
            ev = self._evaluators[job] = JobEvaluator(specs)
        return ev

    def _cross_evaluator(self, job: str) -> JobEvaluator:
        """The evaluator of a job's cross-run rules (run in the crossrun stream)."""
        ev = self._cross_evaluators.get(job)
        if ev is None:
            specs = [s for s in rules_for_job(self._cross_specs, job)]
            ev = self._cross_evaluators[job] = JobEvaluator(specs)
        return ev

    def _targets_of(self, job: str) -> list[tuple[str, list[RuleSpec]]]:
        """(job A, A's cross-run specs that need `job`'s records) for every followed job A."""
        found = self._targets.get(job)
        if found is None:
            found = []
            own = list(self._cross_evaluator(job).specs)
            if own:
                found.append((job, own))
            for other in sorted(self._jobs):
                specs = self._cross_evaluator(other).watches(job) if other != job else []
                if specs:
                    found.append((other, specs))
            self._targets[job] = found
        return found

    def _forwards(self, job: str, record: wire.StepRecord) -> list[tuple[bytes, bytes]]:
        """(key, value) messages for the crossrun topic: `record` for each job that compares with it."""
        if not self._cross_specs or record.kind != "step":
            return []
        out = []
        for target, specs in self._targets_of(job):
            payload = forward_payload(record, specs)
            if payload is not None:
                out.append((target.encode(), payload))
        return out

    def _processor(self, job: str) -> Callable[..., tuple[list[Any], ...]]:
        def process(value: bytes, key: Any, timestamp: int, headers: Any, state: State):
            return self.process_one(job, value, key, state)

        return process

    def process_one(
        self, job: str, value: bytes, key: Any, state: State
    ) -> tuple[list[bytes], list[bytes], list[bytes], list[tuple[bytes, bytes]]]:
        """Decode, evaluate, and return (alerts, dead letters, actions, crossrun messages) to publish."""
        ctx = message_context()
        try:
            if key is not None and key != job.encode():
                raise DecodeError("wrong_key", f"record key {key!r} is not the topic's job id {job!r}")
            record = wire.decode(value, _StateSchemas(state, self._schemas))
            if record.job != job:
                raise DecodeError("job_mismatch", f"record claims job {record.job!r} on job {job!r}'s topic")
        except DecodeError as exc:
            return [], [self._reject(exc, job, key, value, ctx)], [], []
        now = time.time()
        self.metrics.observe(record, now)
        ev = self._evaluator(job)
        transitions: list[Transition] = []
        if record.kind == "end":
            log.info("job %s rank %d finished at step %d", job, record.rank, record.step)
        if record.kind == "step" or ev.has_clock:  # an end record matters only to clock rules
            try:
                # Clock rules: the timer may have changed their slots since this job's last record,
                # so the mirror is laid over the stored state, and refreshed after (stream/clock.py).
                with self._clock.lock if ev.has_clock else contextlib.nullcontext():
                    stored = state.get(_EVAL_KEY)
                    # Rule state travels as JSON text: it may hold NaN/inf (they are data), which the
                    # state store's own JSON serialiser would turn into null.
                    eval_state = None if stored is None else json.loads(stored)
                    if ev.has_clock:
                        eval_state = self._clock.overlay(job, eval_state)
                    eval_state, transitions = ev.process(
                        eval_state, record, now=now, on_rule_error=self._on_rule_error
                    )
                    if ev.has_clock:
                        self._clock.remember(job, (ctx.topic, ctx.partition), ev.clock_slots(eval_state))
            except Exception as exc:  # a bug here must not stop the pipeline: keep the record
                log.exception("rule evaluation failed for job %s step %d", job, record.step)
                err = DecodeError("processing_error", f"{type(exc).__name__}: {exc}")
                return [], [self._reject(err, job, key, value, ctx)], [], []
            state.set(_EVAL_KEY, json.dumps(eval_state, separators=(",", ":")))
        alerts, actions = self._emit(transitions)
        if record.kind == "end" and record.rank == 0:
            self.metrics.remove_job(job)
            self.metrics.finished.inc()
        return alerts, [], actions, self._forwards(job, record)

    def _cross_processor(
        self, value: bytes, key: Any, timestamp: int, headers: Any, state: State
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """A forwarded record in the key context of the job it is compared for (stream/crossrun.py)."""
        ctx = message_context()
        target = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        try:
            try:
                validate_job(target)
            except Exception as exc:
                raise DecodeError("wrong_key", f"crossrun key {key!r} is not a job id") from exc
            record = wire.decode(value)
        except DecodeError as exc:
            return [], [self._reject(exc, target, key, value, ctx)], []
        ev = self._cross_evaluator(target)
        now = time.time()
        try:
            stored = state.get(_EVAL_KEY)
            eval_state = None if stored is None else json.loads(stored)
            if record.job == target:
                eval_state, transitions = ev.process(
                    eval_state, record, now=now, on_rule_error=self._on_rule_error
                )
            else:
                eval_state, transitions = ev.process_other(
                    eval_state, target, record, now=now, on_rule_error=self._on_rule_error
                )
        except Exception as exc:
            log.exception("cross-run evaluation failed for job %s (record of %s)", target, record.job)
            err = DecodeError("processing_error", f"{type(exc).__name__}: {exc}")
            return [], [self._reject(err, target, key, value, ctx)], []
        state.set(_EVAL_KEY, json.dumps(eval_state, separators=(",", ":")))
        alerts, actions = self._emit(transitions)
        return alerts, [], actions

    def _emit(self, transitions: list[Transition]) -> tuple[list[bytes], list[bytes]]:
        """Encode alert events and actions, and count and log them (every path that alerts uses this)."""
        alerts, actions = [], []
        for tr in transitions:
            ev = tr.event
            if ev.id in self._published:  # already published by a crashed predecessor (see published.py)
                self._published.suppressed += 1
                self.metrics.redeliveries.inc()
                continue
            alerts.append(ev.to_json())
            self.metrics.alert(ev.job, ev.rule, ev.severity, ev.status, ev.rank)
            log.warning("alert %s", ev.format())
            if tr.action in ("stop", "checkpoint"):
                actions.append(
                    encode_action(
                        tr.action, ev.job, rule=ev.rule, alert_id=ev.id, step=ev.step, reason=ev.message
                    )
                )
                self.metrics.actions.labels(ev.job, tr.action).inc()
            if self._on_alert is not None:
                self._on_alert(ev)
        return alerts, actions

    # ------------------------------------------------------------------ clock rules
    def _clock_loop(self) -> None:
        """Tick clock rules of the mirrored jobs; publish their transitions with our own producer."""
        assert self._clock_every is not None
        while not self._stop.wait(self._clock_every):
            if self._app is None or not self._owning.is_set():
                continue
            try:
                transitions = self._clock.tick(
                    self._evaluator, time.time(), on_rule_error=self._on_rule_error
                )
                if transitions:
                    self._publish_direct(transitions)
            except Exception:  # never let the timer die: the next tick tries again
                log.exception("clock tick failed")

    def _publish_direct(self, transitions: list[Transition]) -> None:
        if self._direct is None:
            self._direct = Producer(
                {**self._base_config, "enable.idempotence": True, "linger.ms": 5, "acks": "all"}
            )
        for tr in transitions:
            alerts, actions = self._emit([tr])
            job = tr.event.job
            for payload in alerts:
                self._direct.produce(ALERTS_TOPIC, key=job.encode(), value=payload)
            for payload in actions:
                self._direct.produce(
                    control_topic(job, self.settings.topic_prefix), key=job.encode(), value=payload
                )
        self._direct.flush(10)

    def _reject(self, exc: DecodeError, job: str, key: Any, value: Any, ctx: Any) -> bytes:
        self.metrics.decode_errors.labels(exc.reason).inc()
        self.metrics.deadletters.labels(exc.reason).inc()
        where = f"job {job!r} topic {ctx.topic} partition {ctx.partition} offset {ctx.offset}"
        last = self._warned.get(exc.reason, 0.0)
        if time.monotonic() - last > 10:  # one line per reason per 10 s, the counter has the rest
            self._warned[exc.reason] = time.monotonic()
            log.warning(
                "rejected record (%s) at %s: %s; sent to %s", exc.reason, where, exc.detail, DEADLETTER_TOPIC
            )
        payload = value if isinstance(value, (bytes, bytearray)) else repr(value).encode()
        return envelope(
            reason=exc.reason,
            error=exc.detail,
            topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
            job=job,
            key=key,
            payload=bytes(payload),
        )

    def _on_rule_error(self, rule: str, record: wire.StepRecord | None, exc: Exception) -> None:
        self.metrics.rule_errors.labels(rule).inc()
        key = f"rule:{rule}"
        if time.monotonic() - self._warned.get(key, 0.0) > 10:
            self._warned[key] = time.monotonic()
            where = (
                "a clock tick"
                if record is None
                else f"job {record.job} rank {record.rank} step {record.step}"
            )
            log.error("rule %s failed on %s and was reset: %s: %s", rule, where, type(exc).__name__, exc)

    def _on_processing_error(self, exc: Exception, row: Any, logger: logging.Logger) -> bool:
        """Last-resort boundary: a bug in a rule must not stop every other job. Count and go on."""
        self.metrics.decode_errors.labels("processing_error").inc()
        log.exception("processing failed for a record (%s); skipped", type(exc).__name__)
        return True
