"""The stream worker: one static Quix Streams application over the group's steps topic.

Data flow (docs/architecture.md): the intake (stream/intake.py) copies every job's records, from
its first one, into `tensorpulse.steps.<group>`, keyed by job; this application consumes that one
topic in the worker group, so a new job never changes its subscription and never rebalances it.
Quix owns consumption, state (RocksDB with a changelog topic, keyed by job), offsets and
exactly-once delivery of the outputs. This module runs the worker (the intake's thread, the
application, restarted after a failure) and processes each message: decode with the shared codec
(bad records go to the dead-letter topic, counted), drop copies already evaluated, evaluate with
`JobEvaluator` over the job's state entries (stream/state.py). The application's topology is in
stream/topology.py, what becomes of alerts and errors in stream/outcomes.py, the signal handling
in stream/signals.py. Workers in one group share the steps topic's partitions; run more of them
to scale out.

Two kinds of rule need more than one job's record at a time: clock rules (StalledTrainingRule)
are evaluated on ticks that the intake sends down each job's partition (stream/clock.py), and
cross-run rules (SimilarAcrossRuns) get other jobs' records through an internal topic
(stream/crossrun.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from quixstreams import Application
from quixstreams.context import message_context
from quixstreams.state import State

from tensorpulse import wire
from tensorpulse.errors import DecodeError
from tensorpulse.kafka import client_config, redact
from tensorpulse.rules.config import RuleSpec, load_rules, rules_for_job
from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.topics import ALERTS_TOPIC, reductions_topic, validate_job

from .clock import clock_interval, clock_thresholds, housekeeping_interval, tick_horizon
from .crossrun import Forward, ended_state, forward_payload, job_over_notice, job_over_reason, late_comparison
from .evaluator import JobEvaluator, Transition, is_cross_run
from .flow import Progress
from .intake import IDLE_HEADER, KEY_HEADER, SOURCE_HEADER, TICK_HEADER, Intake, IntakeConfig, source_group
from .lag import LagMonitor
from .outcomes import LIMIT_OF_REASON, Outcomes, Source
from .published import PublishedAlerts, fence
from .scalars import ScalarNames
from .settings import WorkerSettings
from .signals import SHUTDOWN_S, StopSignals
from .state import JobStore, Layout, StoredSchemas, unstale
from .topology import ROCKSDB_OPTIONS, build_application

#: Importable from here as before the split (tests, bench/worker_profile.py).
__all__ = ["LIMIT_OF_REASON", "ROCKSDB_OPTIONS", "SHUTDOWN_S", "Source", "Worker"]

log = logging.getLogger("tensorpulse.stream")

_EVAL_KEY = "eval"  # the cross-run stream's one state entry per job
_OVER_KEY = "over"  # in the cross-run stream once the job is over: crossrun.ended_state

#: What the processor returns: (alerts, dead letters, actions, crossrun messages) to publish.
Outputs = tuple[list[bytes], list[bytes], list[bytes], list[Forward]]
_NOTHING: Outputs = ([], [], [], [])


def _seconds(value: Any) -> float | None:
    """A header's b"<seconds>" as a finite float (None when absent or not a number)."""
    try:
        seconds = float(bytes(value).decode())
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    return seconds if math.isfinite(seconds) else None


class Worker:
    """Runs until stopped: the intake thread, and the stream application (restarted if it fails)."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        metrics: WorkerMetrics | None = None,
        on_alert: Callable[[Any], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics(max_scalars_per_job=settings.max_scalars_per_job)
        self.specs: list[RuleSpec] = load_rules(settings.rules_file)
        self.metrics.init_rules(self.specs)  # rule error counters at 0 (and per job, alert counters)
        self._evaluators: dict[str, JobEvaluator] = {}
        self._layouts: dict[str, Layout] = {}  # per job, beside its evaluator (stream/state.py)
        self._cross_evaluators: dict[str, JobEvaluator] = {}
        self._cross_checked: set[str] = set()  # jobs whose stored cross-run state was checked
        self._cross_specs = [s for s in self.specs if is_cross_run(s)]
        self._targets: dict[str, list[tuple[str, list[RuleSpec]]]] = {}
        self._schemas = wire.SchemaCache()
        self._published = PublishedAlerts()
        self.out = Outcomes(self.metrics, self._published, on_alert)
        self._stop = threading.Event()
        self._stopped = threading.Event()  # run() has finished
        self._signals = StopSignals(self.stop, self._stop, self._stopped)
        self._app: Application | None = None
        self._jobs: dict[str, str] = {}
        #: Per job, the scalar names admitted (at most max_scalars_per_job), kept in its state.
        self._scalars = ScalarNames(settings.max_scalars_per_job)
        self.ready = threading.Event()  # set once the stream application is built and starting
        self.progress = Progress()  # how far the processor is: the intake's flow control reads it
        base = client_config(settings.bootstrap, kafka=settings.kafka_config)  # resolved at the edge
        self._base_config = base
        own_specs = [s for s in self.specs if not is_cross_run(s)]
        clock_every = clock_interval(own_specs)
        idle = settings.job_idle_timeout_s
        housekeeping = housekeeping_interval(min(settings.state_retention_s, idle or math.inf))
        if idle and any(t >= idle for t in clock_thresholds(own_specs)):
            log.warning(
                "job_idle_timeout_s=%g is not longer than a clock rule's threshold (%s): a silent job "
                "counts as ended, and its alerts resolve, before that rule can report it stalled",
                idle,
                ", ".join(f"{t:g} s" for t in clock_thresholds(own_specs)),
            )
        self.intake = Intake(
            IntakeConfig(
                group=settings.group,
                topic_prefix=settings.topic_prefix,
                jobs_regex=settings.jobs_regex,
                shards=settings.intake_shards,
                discovery_interval=settings.discovery_interval,
                max_record_bytes=wire.MAX_RECORD_BYTES,
                topic_config=settings.topic_config(),
                replication_factor=settings.replication_factor,
                # Ticks serve the clock rules, the idle timeout and the removal of ended jobs' state.
                tick_interval=min(clock_every or math.inf, housekeeping),
                tick_horizon=tick_horizon(own_specs, settings.state_retention_s, idle),
                max_jobs=settings.max_jobs,
                max_ahead=settings.max_ahead_per_job,
            ),
            base,
            on_jobs=self._jobs_changed,
            on_reject=self.out.count_reject,
            on_refused=self.metrics.limits.labels("jobs_per_worker").inc,
            progress=self.progress,
        )
        self._lag = LagMonitor(base, source_group(settings.group), self.metrics)
        self._intake_thread = threading.Thread(
            target=self.intake.run, args=(self._stop,), name="tensorpulse-intake", daemon=True
        )

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
        self._signals.install()
        if s.guarantee == "exactly-once":
            self._take_over()
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self.intake.create_topics(s.partitions)
                break
            except Exception as exc:  # the broker may still be starting
                log.warning("cannot create the worker's topics yet (%s); retrying in %.0fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        self._intake_thread.start()
        threading.Thread(target=self._watch_lag, name="tensorpulse-lag", daemon=True).start()
        backoff = 1.0
        while not self._stop.is_set():
            try:
                app = build_application(
                    s,
                    self._base_config,
                    self.intake.config.steps_topic,
                    process=self._process,
                    cross=self._cross_processor if self._cross_specs else None,
                    on_processing_error=self.out.processing_error,
                )
            except Exception as exc:  # the broker went away
                log.warning("building the stream application failed (%s); retrying in %.0fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._app = app
            self.ready.set()
            try:
                app.run()
                backoff = 1.0
            except Exception as exc:  # noqa: BLE001
                # A broker outage longer than the transaction timeout fails the open
                # transaction, and Quix gives up. Start again from the last commit: state comes
                # back from the store and changelog, offsets from the group, nothing is lost.
                self._app = None
                self._signals.install()  # Quix's handlers stop only the application that failed
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
                if s.guarantee == "exactly-once" and not self._stop.is_set():
                    self._take_over()
                continue
            break  # app.run() returned: stopped by a signal or by stop()
        self._app = None
        self._stop.set()
        if self._intake_thread.is_alive():
            # Let the intake finish its round and leave the shard group, so that the other
            # workers take its jobs now rather than after the session timeout.
            self._intake_thread.join(10)
        log.info("worker stopped")
        self._stopped.set()

    def _take_over(self) -> None:
        """Fence this worker's crashed former self, then note the alerts it already published."""
        s = self.settings
        try:
            fence(self._base_config, s.transactional_id())
            n = self._published.scan(self._base_config, ALERTS_TOPIC)
            log.info(
                "fenced the transactions of a previous run of this worker (transactional id %s); "
                "%d alert id(s) already on %s will not be published again",
                s.transactional_id(),
                n,
                ALERTS_TOPIC,
            )
        except Exception as exc:  # the broker may be down at start: Quix retries, we carry on
            log.warning("could not check for a previous run's open transaction: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        app = self._app
        if app is not None:
            app.stop()

    def _jobs_changed(self, jobs: dict[str, str], owned: int) -> None:
        """The intake found the job set, or its share of it, changed (on its thread; plain rebinds only)."""
        self._jobs = jobs
        self._targets = {}
        self.metrics.jobs.set(owned)

    def _watch_lag(self) -> None:
        while not self._stop.wait(self.settings.lag_interval):
            self._lag.poll(self._jobs, self.intake.discovery.partitions)

    @property
    def evaluating(self) -> frozenset[str]:
        """The jobs whose rule evaluators this worker holds now: the live jobs it has seen (an
        ended job's go with its series; for tests and debugging)."""
        return frozenset(self._evaluators) | frozenset(self._cross_evaluators)

    def _evaluator(self, job: str) -> JobEvaluator:
        """The evaluator of a job's own topic: every rule that applies to it but the cross-run ones."""
        ev = self._evaluators.get(job)
        if ev is None:
            specs = [s for s in rules_for_job(self.specs, job) if not is_cross_run(s)]
            ev = self._evaluators[job] = JobEvaluator(specs)
            self._layouts[job] = Layout(ev.specs)
        return ev

    def _store(self, job: str, state: State) -> JobStore:
        """The job's state entries, laid out for its rule set."""
        self._evaluator(job)
        return JobStore(
            state,
            self._layouts[job],
            on_stale=lambda rule, key, problem: self.out.stale_state(job, rule, key, problem),
        )

    def _cross_evaluator(self, job: str) -> JobEvaluator:
        """The evaluator of a job's cross-run rules (run in the crossrun stream)."""
        ev = self._cross_evaluators.get(job)
        if ev is None:
            ev = self._cross_evaluators[job] = JobEvaluator(rules_for_job(self._cross_specs, job))
        return ev

    def _targets_of(self, job: str) -> list[tuple[str, list[RuleSpec]]]:
        """(job A, A's cross-run specs that need `job`'s records) for every followed job A."""
        targets = self._targets
        found = targets.get(job)
        if found is None:
            found = []
            own = list(self._cross_evaluator(job).specs)
            if own:
                found.append((job, own))
            for other in sorted(self._jobs):
                specs = self._cross_evaluator(other).watches(job) if other != job else []
                if specs:
                    found.append((other, specs))
            targets[job] = found
        return found

    def _forwards(self, job: str, record: wire.StepRecord) -> list[Forward]:
        """Messages for the crossrun topic: `record` for each job that compares with it."""
        if not self._cross_specs or record.kind != "step":
            return []
        out = []
        for target, specs in self._targets_of(job):
            payload = forward_payload(record, specs)
            if payload is not None:
                out.append(Forward(target.encode(), payload))
        return out

    def _job_over(self, job: str, step: int, now: float, reason: str) -> list[Forward]:
        """The job-over notice for the crossrun topic, if the job has cross-run rules to resolve."""
        if not self._cross_specs or not self._cross_evaluator(job).specs:
            return []
        return [job_over_notice(job, step, now, reason)]

    # ------------------------------------------------------------------ one message of the steps topic
    def _process(self, value: bytes, key: Any, timestamp: int, headers: Any, state: State) -> Outputs:
        """A copy of a job's record (or a tick) in the job's key context."""
        meta = dict(headers or ())
        ctx = message_context()
        self.progress.took(ctx.partition, ctx.offset)
        try:
            job = validate_job(key.decode() if isinstance(key, bytes) else str(key))
        except Exception:  # not written by an intake: nothing to evaluate, nothing to name
            self.out.count_reject("wrong_key")
            return _NOTHING
        tick = meta.get(TICK_HEADER)
        if tick is not None:
            return self._tick(job, tick, state, meta.get(IDLE_HEADER))
        try:
            partition, _, offset = bytes(meta[SOURCE_HEADER]).decode().partition(":")
            src = Source(reductions_topic(job, self.settings.topic_prefix), int(partition), int(offset))
        except (KeyError, ValueError):
            src = Source(ctx.topic, ctx.partition, ctx.offset)
        else:
            store = self._store(job, state)
            if src.offset <= store.seen_offset(src.partition):
                self.metrics.duplicates.inc()  # a second copy of a record already evaluated
                return _NOTHING
            store.set_offset(src.partition, src.offset)
            return self.process_one(job, value, meta.get(KEY_HEADER), state, src, store)
        return self.process_one(job, value, meta.get(KEY_HEADER), state, src)

    def process_one(
        self, job: str, value: bytes, key: Any, state: State, src: Source, store: JobStore | None = None
    ) -> Outputs:
        """Decode, evaluate, and return (alerts, dead letters, actions, crossrun messages) to publish.

        `store`: the job's `JobStore` over `state`, when the caller has made it already."""
        try:
            if key is not None and key != job.encode():
                raise DecodeError("wrong_key", f"record key {key!r} is not the topic's job id {job!r}")
            record = wire.decode(value, StoredSchemas(state, self._schemas))
            if record.job != job:
                raise DecodeError("job_mismatch", f"record claims job {record.job!r} on job {job!r}'s topic")
            if record.rank >= self.settings.max_ranks_per_job:
                raise DecodeError(
                    "too_many_ranks",
                    f"rank {record.rank} of a job of {record.world}: this worker evaluates ranks "
                    f"0-{self.settings.max_ranks_per_job - 1} of a job (setting max_ranks_per_job)",
                )
        except DecodeError as exc:
            return [], [self.out.reject(exc, job, key, value, src)], [], []
        record = self._admit_scalars(job, record, state)
        now = time.time()
        self.metrics.observe(record, now)
        ev = self._evaluator(job)
        if store is None:
            store = self._store(job, state)
        transitions: list[Transition] = []
        job_over: list[Forward] | None = None
        if record.kind == "end":
            log.info("job %s rank %d finished at step %d", job, record.rank, record.step)
            store.mark_ended(record.rank, now)
        else:
            store.resume(record.rank)  # a record after the rank's end (or idle timeout): it runs again
        if record.kind in ("step", "end"):  # an end record resolves its rank's alerts
            try:
                store.add_rank(record.rank)
                eval_state = store.load([record.rank])
                eval_state, transitions = ev.process(
                    eval_state,
                    record,
                    now=now,
                    on_rule_error=self.out.rule_error,
                    rank_states=lambda rule: store.rule_states(rule, eval_state),
                )
                store.save(eval_state, [record.rank])
                self.out.too_large(job, store)
                if record.kind == "end" and store.all_ended() is not None:
                    # The cross-rank rules' alerts resolve now (the ranks' resolved above), the
                    # cross-run rules' in the crossrun stream.
                    reason = "every rank of the job finished"
                    transitions += self._end_job(job, store, [], now, reason)
                    job_over = self._job_over(job, record.step, now, reason)
            except Exception as exc:  # a bug here must not stop the pipeline: keep the record
                log.exception("rule evaluation failed for job %s step %d", job, record.step)
                err = DecodeError("processing_error", f"{type(exc).__name__}: {exc}")
                return [], [self.out.reject(err, job, key, value, src)], [], []
        alerts, actions = self.out.emit(transitions)
        if job_over is not None:  # after the resolved events: their counters go with the job's other series
            self._forget(job)
            return alerts, [], actions, job_over
        return alerts, [], actions, self._forwards(job, record)

    def _admit_scalars(self, job: str, record: wire.StepRecord, state: State) -> wire.StepRecord:
        """`record` without the scalars whose names are beyond the job's first max_scalars_per_job
        (stream/scalars.py: the admitted names are kept in the job's state, the same on every worker)."""
        limit = self.settings.max_scalars_per_job
        dropped = self._scalars.admit(job, record.scalars, state)
        if not dropped:
            return record
        self.metrics.limits.labels("scalars_per_job").inc(len(dropped))
        key = f"scalars:{job}"
        if self.out.due(key, 60):
            log.error(
                "job %s sends more than %d scalar names (setting max_scalars_per_job): scalars with "
                "new names are dropped before evaluation and export, %d in this record (e.g. %r)",
                job,
                limit,
                len(dropped),
                dropped[0][:80],
            )
        out = set(dropped)
        return dataclasses.replace(record, scalars={k: v for k, v in record.scalars.items() if k not in out})

    def _forget(self, job: str) -> None:
        """A job is over: its Prometheus series, its admitted scalar names and its evaluators go
        (they hold no state of their own: a job that publishes again gets new ones on demand), so
        a worker that sees thousands of short jobs keeps memory for the live ones only."""
        self.metrics.remove_job(job)
        self.metrics.finished.inc()
        self._scalars.forget(job)
        self.out.forget(f"scalars:{job}")
        self._evaluators.pop(job, None)
        self._layouts.pop(job, None)
        self._cross_evaluators.pop(job, None)

    def _tick(self, job: str, stamp: Any, state: State, idle: Any = None) -> Outputs:
        """Clock rules at the tick's time; a job silent for `job_idle_timeout_s` (`idle`: the
        intake's seconds since its last record) ended; an ended job's state removed once its
        retention passed."""
        try:
            now = float(bytes(stamp).decode())
            if not math.isfinite(now):
                raise ValueError(stamp)
        except (TypeError, ValueError, UnicodeDecodeError):
            self.out.count_reject("bad_tick")
            return _NOTHING
        ev = self._evaluator(job)
        store = self._store(job, state)
        ranks = store.ranks()
        if not ranks:
            return _NOTHING
        ended_at = store.all_ended()
        if ended_at is not None:
            if now - ended_at >= self.settings.state_retention_s:
                store.delete_all()
                self.metrics.states_removed.inc()
                log.info("job %s: every rank ended; its state is removed (state_retention_s)", job)
            return _NOTHING
        silent = _seconds(idle)
        timeout = self.settings.job_idle_timeout_s
        if timeout > 0 and silent is not None and silent >= timeout:
            reason = f"no record for {silent:.0f} s (job_idle_timeout_s={timeout:g}): the job counts as ended"
            transitions = self._end_job(job, store, ranks, now, reason)
            store.end_all(ranks, now)
            log.info("job %s: %s; %d alert(s) resolved", job, reason, len(transitions))
            alerts, actions = self.out.emit(transitions)
            self._forget(job)
            return alerts, [], actions, self._job_over(job, 0, now, reason)
        if not ev.has_clock:
            return _NOTHING
        eval_state = store.load(ranks, groups=("clock",))
        eval_state, transitions = ev.check_idle(eval_state, job, now, on_rule_error=self.out.rule_error)
        store.save(eval_state, ranks, groups=("clock",))
        alerts, actions = self.out.emit(transitions)
        return alerts, [], actions, []

    def _end_job(
        self, job: str, store: JobStore, ranks: list[int], now: float, reason: str
    ) -> list[Transition]:
        """Resolve what still fires for a job that is over: the job-level slots, and those of `ranks`."""
        eval_state = store.load(ranks)
        eval_state, transitions = self._evaluator(job).end_job(eval_state, job, now, reason=reason)
        store.save(eval_state, ranks)
        return transitions

    def _cross_processor(
        self, value: bytes, key: Any, timestamp: int, headers: Any, state: State
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """A forwarded record in the key context of the job it is compared for (stream/crossrun.py)."""
        ctx = message_context()
        return self.cross_one(value, key, headers, state, Source(ctx.topic, ctx.partition, ctx.offset))

    def _cross_state(self, job: str, ev: JobEvaluator, eval_state: Any) -> Any:
        """The job's stored cross-run state, each slot checked once per worker against its rule's
        declared State: one of another layout starts fresh (stream/state.py says why)."""
        if eval_state is None or job in self._cross_checked:
            return eval_state
        rules = {s.name: s.rule for s in ev.specs}
        slots = eval_state.get("r", {})
        for key, slot in list(slots.items()):
            name = key.rpartition("|")[0]
            if name in rules:
                slots[key], problem = unstale(rules[name], slot)
                if problem is not None:
                    self.out.stale_state(job, name, _EVAL_KEY, problem)
        self._cross_checked.add(job)
        return eval_state

    def cross_one(
        self, value: bytes, key: Any, headers: Any, state: State, src: Source
    ) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """Evaluate one crossrun message for the job of its key: a record of that job or of another, or
        the notice that the job is over (its firing cross-run alerts resolve, its series go)."""
        target = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        try:
            try:
                validate_job(target)
            except Exception as exc:
                raise DecodeError("wrong_key", f"crossrun key {key!r} is not a job id") from exc
            record = wire.decode(value)
        except DecodeError as exc:
            return [], [self.out.reject(exc, target, key, value, src)], []
        ev = self._cross_evaluator(target)
        now = time.time()
        over = job_over_reason(headers) if record.job == target else None
        try:
            eval_state = self._cross_state(target, ev, state.get(_EVAL_KEY))
            if over is not None:
                eval_state, transitions = ev.end_job(eval_state, target, now, reason=over)
                state.set(_OVER_KEY, ended_state(over))
            elif record.job == target:
                if state.get(_OVER_KEY):
                    state.delete(_OVER_KEY)  # the job publishes again: compare it with the others again
                eval_state, transitions = ev.process(
                    eval_state, record, now=now, on_rule_error=self.out.rule_error
                )
            else:
                eval_state, transitions = ev.process_other(
                    eval_state, target, record, now=now, on_rule_error=self.out.rule_error
                )
        except Exception as exc:
            log.exception("cross-run evaluation failed for job %s (record of %s)", target, record.job)
            err = DecodeError("processing_error", f"{type(exc).__name__}: {exc}")
            return [], [self.out.reject(err, target, key, value, src)], []
        ended = state.get(_OVER_KEY) if record.job != target else None
        if ended and transitions:  # another job's record for a step the job published, after its end
            eval_state, transitions, ended = late_comparison(ev, eval_state, target, transitions, ended, now)
            state.set(_OVER_KEY, ended)
        state.set(_EVAL_KEY, eval_state)
        alerts, actions = self.out.emit(transitions)
        if over is not None:  # after the resolved events, as for the job's own alerts
            self.metrics.remove_job(target)
        return alerts, [], actions
