"""The framework-neutral hook: record tensors and scalars per step, publish one record per step.

Contract with training code: the constructor raises ConfigError for misconfiguration (invalid
job id, rank, schedule, Kafka settings); after that nothing raises into training. Runtime
failures are caught, logged once and counted; if computing statistics itself fails, the hook
disables itself rather than fail again on every step.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorpulse import wire
from tensorpulse.errors import ConfigError
from tensorpulse.topics import DEFAULT_PREFIX, control_topic, reductions_topic, validate_job

from .control import ControlListener
from .publisher import CONTROL_RETENTION_MS, REDUCTIONS_RETENTION_MS, ProduceFn, Publisher, TopicSpec
from .schedule import SaveConfig
from .stats_numpy import Columns, numpy_stats

log = logging.getLogger("tensorpulse.producers")

ActionCallback = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class _Part:
    names: list[str]
    collections: list[str]
    stats: Any  # Columns, or stats_torch.HostStats (finished on the publisher thread)


@dataclass(slots=True)
class _Record:
    """A record being assembled on the training thread, encoded later on the publisher thread."""

    step: int
    mode: str
    ts: float
    kind: str = "step"
    seq: int = 0
    parts: list[_Part] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    scalar_tensors: dict[str, Any] = field(default_factory=dict)


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from exc


class Hook:
    """Captures tensor statistics for a job and streams one msgpack record per step and rank to Kafka.

    Records go to `tensorpulse.topics.reductions_topic(job)`, keyed by the job id. Use it as a
    context manager, or call `close()` at the end of training (an atexit handler closes
    forgotten hooks with a short timeout). `save_config` wins over `save_interval`;
    `kafka_config` adds librdkafka properties; `produce_fn(topic, value, key)` replaces Kafka
    (tests, custom transports; no control listener then).
    """

    def __init__(
        self,
        job: str,
        bootstrap: str | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        save_config: SaveConfig | None = None,
        save_interval: int = 1,
        topic_prefix: str = DEFAULT_PREFIX,
        kafka_config: Mapping[str, Any] | None = None,
        max_queued: int = 10_000,
        announce_every: int = 100,
        enabled: bool = True,
        listen_for_actions: bool = True,
        quantile_steps: int = 10,
        produce_fn: ProduceFn | None = None,
    ) -> None:
        self.job = validate_job(job)
        self.topic = reductions_topic(job, topic_prefix)
        self.control_topic = control_topic(job, topic_prefix)
        rank = _env_int("RANK") if rank is None else rank
        world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
        self.rank = 0 if rank is None else int(rank)
        self.world_size = 1 if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} / world size {self.world_size}: expected 0 <= rank < world")
        if save_config is None:
            if isinstance(save_interval, bool) or not isinstance(save_interval, int) or save_interval < 1:
                raise ConfigError(f"save_interval must be an integer >= 1, got {save_interval!r}")
            save_config = SaveConfig(save_interval=save_interval)
        elif not isinstance(save_config, SaveConfig):
            raise ConfigError(f"save_config must be a SaveConfig, got {type(save_config).__name__}")
        self.save_config = save_config
        if announce_every < 1:
            raise ConfigError(f"announce_every must be >= 1, got {announce_every}")
        if quantile_steps < 0:
            raise ConfigError(f"quantile_steps must be >= 0, got {quantile_steps}")
        self.announce_every = announce_every
        self.quantile_steps = quantile_steps
        self.started = time.time()

        self._enabled = bool(enabled)
        self._closed = False
        self._pending: dict[tuple[int, str], _Record] = {}
        self._seq = 0
        self._published = 0
        self._train_saves = 0  # saved train records with tensors so far (for quantile_steps)
        self._last_published: dict[str, int] = {}
        self._errors = 0
        self._skipped_bad_calls = 0
        self._logged: set[str] = set()
        self._callbacks: list[ActionCallback] = []
        # Encoder state: touched only on the publisher thread.
        self._announced: OrderedDict[int, int] = OrderedDict()
        self._schema_ids: dict[tuple[tuple[str, ...], tuple[str, ...]], int] = {}

        self._publisher: Publisher | None = None
        self._listener: ControlListener | None = None
        self._atexit: Callable[[], Any] | None = None
        if not self._enabled:
            return
        self._publisher = Publisher(
            self.topic,
            key=self.job,
            bootstrap=bootstrap,
            kafka_config=kafka_config,
            max_queued=max_queued,
            encode=self._encode,
            topics=[
                TopicSpec(self.topic, retention_ms=REDUCTIONS_RETENTION_MS),
                TopicSpec(self.control_topic, retention_ms=CONTROL_RETENTION_MS),
            ],
            produce_fn=produce_fn,
            name=f"tensorpulse-{self.job}-r{self.rank}",
        )
        if listen_for_actions and produce_fn is None:
            self._listener = ControlListener(
                self.job,
                bootstrap=bootstrap,
                kafka_config=kafka_config,
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

    # ------------------------------------------------------------------ recording
    def record(
        self, step: int, tensors: Mapping[str, Any], *, mode: str = "train", collection: str = "default"
    ) -> None:
        """Add statistics of `tensors` ({name: tensor}) to the record of (step, mode).

        Torch tensors are reduced on their device with one device->host copy per call; anything
        else with `__array__` is reduced with numpy. Collection "activations" adds per-unit
        activity; "gradients" adds p5/p95 during the first `quantile_steps` saved train steps.
        """
        if not self._accepts(step, mode):
            return
        try:
            rec = self._record_for(step, mode)
            quant = collection == "gradients" and self._quantiles_now(mode)
            act = collection == "activations"
            torch_items = [(k, v) for k, v in tensors.items() if _is_torch(v)]
            other_items = [(k, v) for k, v in tensors.items() if not _is_torch(v)]
            if other_items:
                cols = numpy_stats(
                    [v for _, v in other_items],
                    activity=[act] * len(other_items),
                    quantiles=[quant] * len(other_items),
                )
                names = [str(k) for k, _ in other_items]
                rec.parts.append(_Part(names, [collection] * len(names), cols))
            if torch_items:
                from . import stats_torch

                stats = [
                    stats_torch.reduce_on_device(v, activity=act, quantiles=quant) for _, v in torch_items
                ]
                host, _ = stats_torch.transfer(stats)
                names = [str(k) for k, _ in torch_items]
                rec.parts.append(_Part(names, [collection] * len(names), host))
        except Exception as exc:  # noqa: BLE001
            self._fail("computing statistics", exc)

    def record_scalars(self, step: int, values: Mapping[str, Any], *, mode: str = "train") -> None:
        """Add scalars (floats or 1-element tensors; tensors are copied at publish, without .item())."""
        if not self._accepts(step, mode):
            return
        try:
            rec = self._record_for(step, mode)
            for name, value in values.items():
                if _is_torch(value):
                    rec.scalar_tensors[str(name)] = value.detach()
                else:
                    rec.scalars[str(name)] = float(value)
        except Exception as exc:  # noqa: BLE001
            self._note("record_scalars", exc)

    def publish(self, step: int | None = None, mode: str | None = None) -> None:
        """Hand pending records (all, or those of `step` and/or `mode`) to the publisher."""
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
                end = _Record(step=step, mode="global", ts=time.time(), kind="end")
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
        return mode == "train" and self._train_saves < self.quantile_steps

    def _record_for(self, step: int, mode: str) -> _Record:
        """The pending record of (step, mode); earlier pending steps of the mode are published first."""
        rec = self._pending.get((step, mode))
        if rec is None:
            earlier = [k for k in self._pending if k[1] == mode and k[0] < step]
            for key in sorted(earlier):
                self._emit(self._pending.pop(key))
            rec = self._pending[(step, mode)] = _Record(step=step, mode=mode, ts=time.time())
        return rec

    def _emit(self, rec: _Record) -> None:
        if self._publisher is None:
            return
        if rec.kind == "step" and not (rec.parts or rec.scalars or rec.scalar_tensors):
            return  # nothing was captured (e.g. statistics failed): no empty records
        if rec.scalar_tensors:
            try:
                from . import stats_torch

                names = list(rec.scalar_tensors)
                _, values = stats_torch.transfer([], [rec.scalar_tensors[n] for n in names])
                rec.scalars.update(zip(names, values, strict=True))
            except Exception as exc:  # noqa: BLE001
                self._note("scalars", exc)
            rec.scalar_tensors = {}
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
    def _encode(self, rec: _Record) -> bytes:
        block = None
        if rec.parts:
            names: list[str] = []
            colls: list[str] = []
            cols = []
            for part in rec.parts:
                names += part.names
                colls += part.collections
                cols.append(part.stats if isinstance(part.stats, Columns) else part.stats.finish())
            merged = Columns.concat(cols)
            names, colls, merged = _dedupe(names, colls, merged)
            block = merged.to_block(names, colls)
        announce = False
        sid = None
        if block is not None:
            key = (tuple(block.names), tuple(block.collections))
            sid = self._schema_ids.get(key)
            if sid is None:
                if len(self._schema_ids) >= 256:
                    self._schema_ids.clear()
                sid = self._schema_ids[key] = wire.schema_id(block.names, block.collections)
            last = self._announced.get(sid)
            announce = last is None or rec.seq - last >= self.announce_every
            if announce:
                self._announced[sid] = rec.seq
                self._announced.move_to_end(sid)
                while len(self._announced) > 256:
                    self._announced.popitem(last=False)
        return wire.encode(
            job=self.job,
            rank=self.rank,
            world=self.world_size,
            step=rec.step,
            mode=rec.mode,
            ts=rec.ts,
            seq=rec.seq,
            kind=rec.kind,
            scalars=rec.scalars,
            tensors=block,
            announce=announce,
            sid=sid,
        )


def _dedupe(names: list[str], colls: list[str], cols: Columns) -> tuple[list[str], list[str], Columns]:
    """Keep the last row of each (collection, name): recording a name twice in a step overwrites it."""
    keys = list(zip(colls, names, strict=True))
    if len(set(keys)) == len(keys):
        return names, colls, cols
    last = {k: i for i, k in enumerate(keys)}
    keep = sorted(last.values())
    remap = {old: new for new, old in enumerate(keep)}
    out = Columns(
        cols.n[keep],
        cols.floats[keep],
        cols.zeros[keep],
        cols.nan[keep],
        cols.inf[keep],
        {remap[i]: v for i, v in cols.activity.items() if i in remap},
        {remap[i]: v for i, v in cols.quantiles.items() if i in remap},
    )
    return [names[i] for i in keep], [colls[i] for i in keep], out


__all__ = ["Hook"]
