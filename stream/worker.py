"""The stream worker: Quix Streams consumes every job's reductions topic and drives the rules.

Quix owns consumption, per-job state (RocksDB with changelog topics, so state survives a
restart), offsets and exactly-once delivery of outputs. This module only wires it up: decode
with the shared codec (bad records go to the dead-letter topic, counted), evaluate with
`JobEvaluator`, and emit alerts, actions and metrics. Workers in one consumer group share
the jobs' partitions; run more of them to scale out.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from quixstreams import Application
from quixstreams.context import message_context
from quixstreams.models import TopicConfig
from quixstreams.state import State

from tensorpulse import wire
from tensorpulse.actions import encode_action
from tensorpulse.errors import DecodeError
from tensorpulse.kafka import client_config, redact
from tensorpulse.rules.config import RuleSpec, load_rules, rules_for_job
from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.topics import ALERTS_TOPIC, DEADLETTER_TOPIC, control_topic

from .deadletter import envelope
from .discovery import JobDiscovery
from .evaluator import JobEvaluator
from .lag import LagMonitor
from .settings import WorkerSettings

log = logging.getLogger("tensorpulse.stream")

_EVAL_KEY = "eval"


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
        self._schemas = wire.SchemaCache()
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
        watcher = threading.Thread(target=self._watch, name="tensorpulse-discovery", daemon=True)
        watcher.start()
        while not self._stop.is_set():
            prepared, self._next = self._next, None
            if prepared is not None:
                jobs, app = prepared  # built by the watcher while the previous one ran
            else:
                found = self._wait_for_jobs()
                if found is None:
                    break
                jobs, app = found, self._build(found)
            self._jobs = jobs
            self.metrics.set_jobs(jobs)
            # Order matters: clear the flag before publishing the app, so that the watcher never
            # mistakes its repeated stop of the old app for one of the new app.
            self._rebuild.clear()
            self._joined.clear()
            self._app = app
            log.info("following %d job(s): %s", len(jobs), ", ".join(sorted(jobs)))
            self.ready.set()
            app.run()
            self._app = None
            if not self._rebuild.is_set():
                break  # stopped by a signal or by stop()
        self._stop.set()
        log.info("worker stopped")

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
        )
        self._watch_assignments(app)
        self._prepare_topics(sorted(jobs), jobs)
        cfg = TopicConfig(
            num_partitions=1, replication_factor=1, extra_config={"retention.ms": str(s.retention_ms)}
        )
        alerts = app.topic(ALERTS_TOPIC, value_serializer="bytes", key_serializer="bytes", config=cfg)
        dead = app.topic(DEADLETTER_TOPIC, value_serializer="bytes", key_serializer="bytes", config=cfg)
        for job, topic_name in sorted(jobs.items()):
            source = app.topic(topic_name, value_deserializer="bytes", key_deserializer="bytes", config=cfg)
            control = app.topic(
                control_topic(job, s.topic_prefix),
                value_serializer="bytes",
                key_serializer="bytes",
                config=cfg,
            )
            out = app.dataframe(source).apply(self._processor(job), stateful=True, metadata=True)
            out.apply(lambda r: r[0], expand=True).to_topic(alerts)
            out.apply(lambda r: r[1], expand=True).to_topic(dead)
            out.apply(lambda r: r[2], expand=True).to_topic(control)
        return app

    def _watch_assignments(self, app: Application) -> None:
        """Set `_joined` when the application's consumer completes a rebalance.

        Quix Streams has no public hook for it, so this wraps its partition-assignment callback
        (quixstreams 3.x). Should that ever change, the worker falls back to a fixed grace period.
        """
        original = getattr(app, "_on_assign", None)
        if original is None:
            threading.Timer(2.0 * self.settings.session_timeout_ms / 1000, self._joined.set).start()
            return

        def on_assign(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                if self._app is app:
                    self._joined.set()

        app._on_assign = on_assign

    def _evaluator(self, job: str) -> JobEvaluator:
        ev = self._evaluators.get(job)
        if ev is None:
            ev = self._evaluators[job] = JobEvaluator(rules_for_job(self.specs, job))
        return ev

    def _processor(self, job: str) -> Callable[..., tuple[list[bytes], list[bytes], list[bytes]]]:
        def process(value: bytes, key: Any, timestamp: int, headers: Any, state: State):
            return self.process_one(job, value, key, state)

        return process

    def process_one(
        self, job: str, value: bytes, key: Any, state: State
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """Decode, evaluate, and return (alerts, dead letters, actions) to publish."""
        ctx = message_context()
        try:
            if key is not None and key != job.encode():
                raise DecodeError("wrong_key", f"record key {key!r} is not the topic's job id {job!r}")
            record = wire.decode(value, _StateSchemas(state, self._schemas))
            if record.job != job:
                raise DecodeError("job_mismatch", f"record claims job {record.job!r} on job {job!r}'s topic")
        except DecodeError as exc:
            return [], [self._reject(exc, job, key, value, ctx)], []
        now = time.time()
        self.metrics.observe(record, now)
        if record.kind == "end":
            log.info("job %s rank %d finished at step %d", job, record.rank, record.step)
            if record.rank == 0:
                self.metrics.remove_job(job)
                self.metrics.finished.inc()
            return [], [], []
        try:
            stored = state.get(_EVAL_KEY)
            # Rule state travels as JSON text: it may hold NaN/inf (they are data), which the
            # state store's own JSON serialiser would turn into null.
            eval_state = None if stored is None else json.loads(stored)
            eval_state, transitions = self._evaluator(job).process(
                eval_state, record, now=now, on_rule_error=self._on_rule_error
            )
        except Exception as exc:  # a bug here must not stop the pipeline: keep the record
            log.exception("rule evaluation failed for job %s step %d", job, record.step)
            err = DecodeError("processing_error", f"{type(exc).__name__}: {exc}")
            return [], [self._reject(err, job, key, value, ctx)], []
        state.set(_EVAL_KEY, json.dumps(eval_state, separators=(",", ":")))
        alerts, actions = [], []
        for tr in transitions:
            ev = tr.event
            alerts.append(ev.to_json())
            self.metrics.alert(ev.job, ev.rule, ev.severity, ev.status, ev.rank)
            log.warning("alert %s", ev.format())
            if tr.action in ("stop", "checkpoint"):
                actions.append(
                    encode_action(
                        tr.action, job, rule=ev.rule, alert_id=ev.id, step=ev.step, reason=ev.message
                    )
                )
                self.metrics.actions.labels(job, tr.action).inc()
            if self._on_alert is not None:
                self._on_alert(ev)
        return alerts, [], actions

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

    def _on_rule_error(self, rule: str, record: wire.StepRecord, exc: Exception) -> None:
        self.metrics.rule_errors.labels(rule).inc()
        key = f"rule:{rule}"
        if time.monotonic() - self._warned.get(key, 0.0) > 10:
            self._warned[key] = time.monotonic()
            log.error(
                "rule %s failed on job %s rank %d step %d and was reset: %s: %s",
                rule,
                record.job,
                record.rank,
                record.step,
                type(exc).__name__,
                exc,
            )

    def _on_processing_error(self, exc: Exception, row: Any, logger: logging.Logger) -> bool:
        """Last-resort boundary: a bug in a rule must not stop every other job. Count and go on."""
        self.metrics.decode_errors.labels("processing_error").inc()
        log.exception("processing failed for a record (%s); skipped", type(exc).__name__)
        return True
