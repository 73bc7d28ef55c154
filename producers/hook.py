"""The framework-neutral hook: record tensors and scalars per step, publish one record per step.

Contract with training code: the constructor raises ConfigError for misconfiguration (invalid
job id, rank, schedule, Kafka settings); after that nothing raises into training. Runtime
failures are caught, logged once and counted; if computing statistics itself fails, the hook
disables itself rather than fail again on every step.

Besides tensor statistics a record can carry record-level blocks (docs/wire-format.md): label
and confusion counts (`record_labels`), input image channel sums and token counts
(`record_inputs`) and small named vectors (`record_vector`, e.g. XGBoost feature importances).

This module holds what the hook is over time: its settings, the pending records of the steps
being recorded (`_record_for`), when each goes to the publisher (`publish`, `_emit`), failures
and shutdown. The rest of the hook, one job per module: `recording` (the `record_*` methods,
which reduce what they are given), `records` (a record and its encoding), `publisher` (the
thread that sends), `schedule` (which steps are saved), `control` (actions sent back).
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tensorpulse import wire
from tensorpulse.errors import ConfigError
from tensorpulse.topics import control_topic, reductions_topic, validate_job

from .control import ControlListener
from .publisher import (
    CONTROL_RETENTION_MS,
    MAX_QUEUED_BYTES,
    REDUCTIONS_RETENTION_MS,
    ProduceFn,
    Publisher,
    TopicSpec,
)
from .recording import Recording
from .records import Record, RecordEncoder
from .schedule import SaveConfig
from .settings import HookSettings

log = logging.getLogger("tensorpulse.producers")

ActionCallback = Callable[[dict[str, Any]], None]


class Hook(Recording):
    """Captures tensor statistics for a job and streams one msgpack record per step and rank to Kafka.

    Records go to `tensorpulse.topics.reductions_topic(job)`, keyed by the job id. Use it as a
    context manager, or call `close()` at the end of training (an atexit handler closes
    forgotten hooks with a short timeout). `save_config` wins over `save_interval`;
    `kafka_config` adds librdkafka properties; `produce_fn(topic, value, key)` replaces Kafka
    (tests, custom transports; no control listener then). Records waiting to be published are
    bounded by `max_queued` and `max_queued_bytes` (16 MiB), and librdkafka's own queue by 16 MiB
    (`queue.buffering.max.kbytes`, overridable in `kafka_config`); beyond them the oldest are
    dropped and counted (`stats()["dropped_queue_full"]`).

    Collections: `include_collections` (None: all) and `exclude_collections` select the tensor
    collections captured ("weights", "biases", "gradients", "activations", ...), as smdebug's
    include_collections does; scalars (loss, learning rates) are always sent. Gradients are
    captured on train steps only (SageMaker's rule: there are none worth reporting in eval).
    Which steps: `save_config` (per-mode intervals, start/end steps, explicit steps; schedule.py).

    Weight deltas: on every `delta_every`-th saved train step (10 by default), for tensors of
    the collections in `track_deltas` ("weights" by default; empty to disable), the hook reports
    how each tensor changed since the previous such step, for WeightUpdateRatio (and
    UnchangedTensor's readers of the allclose excess). `delta_method`:
    - "sketch" (the default): a signed bucket sketch of each tensor (producers/sketch.py) of at
      most 4,094 float64 values (under 1 % of a float32 tensor), kept on the tensor's own device
      instead of a copy; sends (prev_step, ||w - w_prev|| estimated within about 1-5 % (1 sigma,
      by tensor size), exactly 0 when the tensor did not change, ||w_prev|| exact) as wire `ds`.
      Time: one read of the tracked tensors per delta step.
    - "exact": a full copy of each tracked tensor on its device (the model's weights again) and
      (prev_step, ||w - w_prev||, ||w_prev||, max(|w - w_prev| - (delta_atol + delta_rtol*|w_prev|)))
      with the tolerances (wire `d`, `tol`); about eight elementwise passes per delta step.
    """

    #: names -> {row: wire `t.sh` mark} for the rows that are shards of a parameter; None: none are.
    _shard_marks: Callable[[Sequence[str]], dict[int, tuple[int, int, int, int]]] | None = None

    def __init__(
        self,
        job: str | None = None,
        bootstrap: str | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        save_config: SaveConfig | None = None,
        save_interval: int | None = None,
        topic_prefix: str | None = None,
        kafka_config: Mapping[str, Any] | None = None,
        max_queued: int = 10_000,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        announce_every: int = 100,
        enabled: bool | None = None,
        listen_for_actions: bool | None = None,
        quantile_steps: int | None = None,
        produce_fn: ProduceFn | None = None,
        track_deltas: Sequence[str] = ("weights",),
        delta_every: int | None = None,
        delta_method: str | None = None,
        delta_rtol: float = 1e-5,
        delta_atol: float = 1e-8,
        include_collections: Sequence[str] | None = None,
        exclude_collections: Sequence[str] = (),
    ) -> None:
        # Arguments left at None come from the environment, the settings file or the defaults
        # (producers/settings.py): the same script can be pointed elsewhere without an edit.
        settings = HookSettings.resolve(
            job=job,
            bootstrap=bootstrap,
            rank=rank,
            world_size=world_size,
            save_interval=save_interval,
            topic_prefix=topic_prefix,
            enabled=enabled,
            listen_for_actions=listen_for_actions,
            quantile_steps=quantile_steps,
            delta_every=delta_every,
            delta_method=delta_method,
            kafka_config=kafka_config,
        )
        self.settings = settings
        if settings.job is None:
            raise ConfigError("no job id: pass Hook(job=...) or set TENSORPULSE_JOB (or job: in $TENSORPULSE_CONFIG)")
        job, bootstrap, topic_prefix = validate_job(settings.job), settings.bootstrap, settings.topic_prefix
        self.job = job
        self.topic = reductions_topic(job, topic_prefix)
        self.control_topic = control_topic(job, topic_prefix)
        self.rank = 0 if settings.rank is None else settings.rank
        self.world_size = 1 if settings.world_size is None else settings.world_size
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} / world size {self.world_size}: expected 0 <= rank < world")
        if save_config is None:
            save_config = SaveConfig(save_interval=settings.save_interval)
        elif not isinstance(save_config, SaveConfig):
            raise ConfigError(f"save_config must be a SaveConfig, got {type(save_config).__name__}")
        self.save_config = save_config
        if announce_every < 1:
            raise ConfigError(f"announce_every must be >= 1, got {announce_every}")
        self.announce_every = announce_every
        self.quantile_steps = settings.quantile_steps
        if isinstance(track_deltas, str):
            track_deltas = (track_deltas,)
        self.track_deltas = frozenset(str(c) for c in track_deltas)
        for what, names in (
            ("include_collections", include_collections),
            ("exclude_collections", exclude_collections),
        ):
            if isinstance(names, str):
                raise ConfigError(
                    f"Expected argument `{what}` to be a list of collection names but got {names!r}"
                )
        self.include_collections = (
            None if include_collections is None else frozenset(map(str, include_collections))
        )
        self.exclude_collections = frozenset(map(str, exclude_collections))
        self.delta_every = settings.delta_every
        self.delta_method = settings.delta_method
        for what, value in (("delta_rtol", delta_rtol), ("delta_atol", delta_atol)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < float("inf")
            ):
                raise ConfigError(f"Expected argument `{what}` to be a finite number >= 0 but got {value!r}")
        self.delta_tolerance = (float(delta_rtol), float(delta_atol))
        self.started = time.time()
        # Copies (or sketches) of tracked tensors from their previous saved step (class docstring).
        self._numpy_prev: dict[tuple[str, str], tuple[int, np.ndarray, tuple[int, ...]]] = {}
        self._torch_deltas: Any = None  # DeltaTracker or SketchTracker, created on first use

        self._enabled = settings.enabled
        self._closed = False
        self._pending: dict[tuple[int, str], Record] = {}
        self._seq = 0
        self._published = 0
        self._train_saves = 0  # saved train records with tensors so far (for quantile_steps)
        self._last_published: dict[str, int] = {}
        self._errors = 0
        self._skipped_bad_calls = 0
        self._logged: set[str] = set()
        self._callbacks: list[ActionCallback] = []
        self._encoder = RecordEncoder(job, self.rank, self.world_size, announce_every, self.delta_tolerance)

        self._publisher: Publisher | None = None
        self._listener: ControlListener | None = None
        self._atexit: Callable[[], Any] | None = None
        if not self._enabled:
            return
        self._publisher = Publisher(
            self.topic,
            key=self.job,
            bootstrap=bootstrap,
            kafka_config=settings.kafka_config,
            max_queued=max_queued,
            max_queued_bytes=max_queued_bytes,
            sizeof=Record.nbytes,
            encode=self._encode,
            topics=[
                TopicSpec(self.topic, retention_ms=REDUCTIONS_RETENTION_MS),
                TopicSpec(self.control_topic, retention_ms=CONTROL_RETENTION_MS),
            ],
            produce_fn=produce_fn,
            name=f"tensorpulse-{self.job}-r{self.rank}",
        )
        if settings.listen_for_actions and produce_fn is None:
            self._listener = ControlListener(
                self.job,
                bootstrap=bootstrap,
                kafka_config=settings.kafka_config,
                prefix=topic_prefix,
                start_ts=self.started,
            )
            for cb in self._callbacks:
                self._listener.on_action(cb)
            self._listener.start()
        ref = weakref.ref(self)
        self._atexit = lambda: (h := ref()) is not None and h.close(timeout=5.0)
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ schedule & state
    @property
    def enabled(self) -> bool:
        """False when constructed disabled, after a statistics failure, or after close()."""
        return self._enabled and not self._closed

    def wants_collection(self, collection: str, mode: str = "train") -> bool:
        """True if tensors of `collection` are captured in `mode` (include/exclude; gradients: train only)."""
        if collection == "gradients" and mode != "train":
            return False
        if self.include_collections is not None and collection not in self.include_collections:
            return False
        return collection not in self.exclude_collections

    def should_save(self, step: int, mode: str = "train") -> bool:
        """True if `step` of `mode` is captured (always False when the hook is disabled)."""
        return self._enabled and not self._closed and self.save_config.should_save(step, mode)

    @property
    def should_stop(self) -> bool:
        """True once a "stop" action for this job arrived on the control topic."""
        return self._listener is not None and self._listener.stop_requested.is_set()

    def on_action(self, callback: ActionCallback) -> None:
        """Call `callback(action)` (on the listener thread) for each stop/checkpoint action."""
        self._callbacks.append(callback)
        if self._listener is not None:
            self._listener.on_action(callback)

    def publish(self, step: int | None = None, mode: str | None = None) -> None:
        """Hand pending records (all, or those of `step` and/or `mode`) to the publisher."""
        if step is not None and mode is not None:  # the per-step call: at most one record
            rec = self._pending.pop((step, mode), None)
            if rec is not None:
                self._emit(rec)
            return
        keys = sorted(
            (k for k in self._pending if (step is None or k[0] == step) and (mode is None or k[1] == mode)),
            key=lambda k: (k[0], k[1]),
        )
        for key in keys:
            self._emit(self._pending.pop(key))

    def flush(self, timeout: float = 10.0) -> int:
        """Publish pending records and wait (bounded) for delivery; returns the records still undelivered."""
        self.publish()
        return 0 if self._publisher is None else self._publisher.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Publish pending records and an end record, flush (bounded by `timeout`), stop threads. Idempotent."""
        if self._closed:
            return
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            self.publish()
            if self._publisher is not None:
                step = max(self._last_published.values(), default=0)
                end = Record(step=step, mode="global", ts=time.time(), kind="end")
                end.scalars = {"records": float(self._published + 1)}
                self._emit(end)
        except Exception as exc:  # noqa: BLE001
            self._note("close", exc)
        self._closed = True
        if self._atexit is not None:
            atexit.unregister(self._atexit)
        if self._listener is not None:
            self._listener.close(timeout=0.0)  # it is a daemon; it notices within ~0.2 s
        if self._publisher is not None:
            self._publisher.close(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close(timeout=max(0.0, min(1.0, deadline - time.monotonic())))

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Counters: published (records handed to the publisher), sent, dropped, errors, ..."""
        p = self._publisher.stats() if self._publisher is not None else {}
        dropped = p.get("dropped_queue_full", 0) + p.get("dropped_delivery", 0)
        return {
            "enabled": self.enabled,
            "published": self._published,
            "pending_records": len(self._pending),
            "enqueued": p.get("enqueued", 0),
            "sent": p.get("sent", 0),
            "dropped": dropped,
            "dropped_queue_full": p.get("dropped_queue_full", 0),
            "dropped_delivery": p.get("dropped_delivery", 0),
            "errors": self._errors + p.get("errors", 0),
            "bad_calls": self._skipped_bad_calls,
            "in_flight": p.get("pending", 0),
            # Control messages read, by outcome (accepted, coalesced, stale, other_job, malformed).
            "control": dict(self._listener.counts) if self._listener is not None else {},
        }

    # ------------------------------------------------------------------ internals (training thread)
    def _accepts(self, step: Any, mode: Any) -> bool:
        """True if data for (step, mode) is to be recorded: hook live, arguments valid, a saved step."""
        return (
            self._enabled
            and not self._closed
            and self._valid(step, mode)
            and self.save_config.should_save(step, mode)
        )

    def _valid(self, step: Any, mode: Any) -> bool:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or mode not in wire.MODES:
            self._skipped_bad_calls += 1
            self._log_once(
                "bad_call",
                logging.WARNING,
                "tensorpulse: ignoring a call with step=%r mode=%r (step must be an int >= 0, mode one of %s)",
                step,
                mode,
                wire.MODES,
            )
            return False
        return True

    def _quantiles_now(self, mode: str) -> bool:
        return mode == "train" and self._train_index() < self.quantile_steps

    def _train_index(self) -> int:
        """How many saved train records with tensors came before the one being made now."""
        return self._train_saves

    def _deltas_now(self, mode: str) -> bool:
        """Weight deltas on every `delta_every`-th saved train step (the first one included)."""
        return mode == "train" and self._train_index() % self.delta_every == 0

    def _record_for(self, step: int, mode: str) -> Record:
        """The pending record of (step, mode); earlier pending steps of the mode are published first."""
        rec = self._pending.get((step, mode))
        if rec is None:
            earlier = [k for k in self._pending if k[1] == mode and k[0] < step and not self._unfinished(*k)]
            for key in sorted(earlier):
                self._emit(self._pending.pop(key))
            rec = self._pending[(step, mode)] = Record(step=step, mode=mode, ts=time.time())
        return rec

    def _unfinished(self, step: int, mode: str) -> bool:
        """Whether the pending record of (step, mode) still waits for data of its own (TorchHook:
        its statistics, reduced in the background, or whether the optimizer applied the step),
        so that a record of a later step must not publish it early, split in two."""
        return False

    def _emit(self, rec: Record) -> None:
        if self._publisher is None:
            return
        if rec.kind == "step" and not rec.has_data():
            return  # nothing was captured (e.g. statistics failed): no empty records
        if rec.scalar_tensors or rec.captures:
            try:
                from . import stats_host

                names = list(rec.scalar_tensors)
                caps = rec.captures
                host, values = stats_host.transfer(
                    [], [rec.scalar_tensors[n] for n in names], vectors=[c.values for c in caps]
                )
                rec.scalars.update(zip(names, values, strict=True))
                for c, v in zip(caps, host.vectors, strict=True):
                    rec.add_host_block(c.kind, c.name, c.finish(v))
            except Exception as exc:  # noqa: BLE001
                self._note("scalars", exc)
            rec.scalar_tensors = {}
            rec.captures = []
        rec.seq = self._seq
        self._seq += 1
        self._published += 1
        if rec.kind == "step":
            self._last_published[rec.mode] = max(rec.step, self._last_published.get(rec.mode, rec.step))
            if rec.mode == "train" and rec.parts:
                self._train_saves += 1
        self._publisher.submit(rec)

    def _log_once(self, key: str, level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        if key in self._logged:
            log.debug(msg, *args)
            return
        self._logged.add(key)
        log.log(level, msg, *args, exc_info=exc_info)

    def _note(self, where: str, exc: BaseException) -> None:
        """A runtime failure that does not disable the hook: count it, log the first one."""
        self._errors += 1
        self._log_once(where, logging.WARNING, "tensorpulse: %s failed: %s", where, exc, exc_info=exc)

    def _fail(self, where: str, exc: BaseException) -> None:
        """Statistics failed: disable capture (training goes on), keep publishing what is queued."""
        self._errors += 1
        self._enabled = False
        self._log_once(
            "fail",
            logging.ERROR,
            "tensorpulse: %s failed, hook disabled for job %s (training continues): %s",
            where,
            self.job,
            exc,
            exc_info=exc,
        )

    # ------------------------------------------------------------------ encoding (publisher thread)
    def _encode(self, rec: Record) -> bytes:
        return self._encoder.encode(rec, self._shard_marks)


__all__ = ["Hook"]
