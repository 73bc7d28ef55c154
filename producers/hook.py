"""The framework-neutral hook: record tensors and scalars per step, publish one record per step.

Contract with training code: the constructor raises ConfigError for misconfiguration (invalid
job id, rank, schedule, Kafka settings); after that nothing raises into training. Runtime
failures are caught, logged once and counted; if computing statistics itself fails, the hook
disables itself rather than fail again on every step.

Besides tensor statistics a record can carry record-level blocks (docs/wire-format.md): label
and confusion counts (`record_labels`), input image channel sums and token counts
(`record_inputs`) and small named vectors (`record_vector`, e.g. XGBoost feature importances).
"""

from __future__ import annotations

import atexit
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorpulse import wire
from tensorpulse.errors import ConfigError
from tensorpulse.topics import control_topic, reductions_topic, validate_job

from . import stats_numpy
from .control import ControlListener
from .publisher import (
    CONTROL_RETENTION_MS,
    MAX_QUEUED_BYTES,
    REDUCTIONS_RETENTION_MS,
    ProduceFn,
    Publisher,
    TopicSpec,
)
from .schedule import SaveConfig
from .settings import HookSettings
from .sketch import sketch_numpy, width_for
from .stats_numpy import Columns, numpy_delta, numpy_stats

log = logging.getLogger("tensorpulse.producers")

#: A queued record's memory, for the publisher's byte bound: per tensor, its host statistics
#: (about 12 float64 / int64 values in numpy arrays, plus dict entries for the rare columns);
#: per record, the objects around them.
TENSOR_HOST_BYTES = 128
RECORD_OVERHEAD_BYTES = 2048

ActionCallback = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class _Part:
    names: list[str]
    collections: list[str]
    stats: Any  # Columns, or stats_host.HostStats (finished on the publisher thread)


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
    classes: dict[str, wire.ClassCounts] = field(default_factory=dict)
    images: dict[str, wire.ImageSums] = field(default_factory=dict)
    tokens: dict[str, wire.TokenCounts] = field(default_factory=dict)
    vectors: dict[str, wire.Vector] = field(default_factory=dict)
    #: captures_torch.Capture objects still on a device (label counts, input sums), copied at publish.
    captures: list[Any] = field(default_factory=list)
    #: The optimizer did not apply this step (a GradScaler skipped it): wire `skip`.
    skipped: bool = False
    #: Whether the record's weights were read after the optimizer applied this step's gradients
    #: (TorchHook knows; None: unknown, and no order of its non-finite tensors is sent). See
    #: `_nonfinite_order`.
    weights_after: bool | None = None

    def has_data(self) -> bool:
        return bool(
            self.parts
            or self.scalars
            or self.scalar_tensors
            or self.captures
            or self.classes
            or self.images
            or self.tokens
            or self.vectors
        )

    def add_host_block(self, kind: str, name: str, value: Any) -> None:
        """Store a finished record-level block under its wire key ("cls", "img" or "tok")."""
        {"cls": self.classes, "img": self.images, "tok": self.tokens}[kind][name] = value

    def nbytes(self) -> int:
        """About what this record holds in memory while it waits to be published: its host
        statistics per tensor, its scalars and blocks (names are shared with the hook, not
        counted). What bounds the publisher's queue in bytes (`max_queued_bytes`)."""
        tensors = sum(len(p.names) for p in self.parts)
        blocks = len(self.classes) + len(self.images) + len(self.tokens) + len(self.vectors)
        return RECORD_OVERHEAD_BYTES + TENSOR_HOST_BYTES * tensors + 100 * len(self.scalars) + 1024 * blocks


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


class Hook:
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
            kafka_config=settings.kafka_config,
            max_queued=max_queued,
            max_queued_bytes=max_queued_bytes,
            sizeof=_Record.nbytes,
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

    # ------------------------------------------------------------------ recording
    def record(
        self,
        step: int,
        tensors: Mapping[str, Any],
        *,
        mode: str = "train",
        collection: str = "default",
        active_range: tuple[float, float] | None = None,
    ) -> None:
        """Add statistics of `tensors` ({name: tensor}) to the record of (step, mode).

        Torch tensors are reduced on their device with one device->host copy per call; anything
        else with `__array__` is reduced with numpy. Collection "activations" adds per-unit
        activity; "gradients" adds p5/p95 during the first `quantile_steps` saved train steps;
        collections in `track_deltas` add the change since the previous saved train step.
        `active_range` (lo, hi): activity counts a unit active where lo < x < hi instead of x > 0
        (tanh / sigmoid inputs, e.g. "<layer>/Tanh_input" with (-9.4999, 9.4999)). Collections the
        hook does not want (`wants_collection`, e.g. gradients outside train) are skipped.
        """
        if not (self._accepts(step, mode) and self.wants_collection(collection, mode)):
            return
        try:
            rec = self._record_for(step, mode)
            quant = collection == "gradients" and self._quantiles_now(mode)
            act = collection == "activations"
            deltas = collection in self.track_deltas and self._deltas_now(mode)
            torch_items = [(k, v) for k, v in tensors.items() if _is_torch(v)]
            other_items = [(k, v) for k, v in tensors.items() if not _is_torch(v)]
            if other_items:
                cols = numpy_stats(
                    [v for _, v in other_items],
                    activity=[act] * len(other_items),
                    quantiles=[quant] * len(other_items),
                    active_range=active_range,
                )
                names = [str(k) for k, _ in other_items]
                if deltas:
                    self._numpy_deltas(step, collection, other_items, cols)
                rec.parts.append(_Part(names, [collection] * len(names), cols))
            if torch_items:
                from . import stats_host, stats_torch

                stats = [
                    stats_torch.reduce_on_device(v, activity=act, quantiles=quant, active_range=active_range)
                    for _, v in torch_items
                ]
                if deltas:
                    self._delta_tracker().track(
                        step,
                        [(collection, str(k)) for k, _ in torch_items],
                        [v for _, v in torch_items],
                        stats,
                    )
                host, _ = stats_host.transfer(stats)
                names = [str(k) for k, _ in torch_items]
                rec.parts.append(_Part(names, [collection] * len(names), host))
        except Exception as exc:  # noqa: BLE001
            self._fail("computing statistics", exc)

    def _delta_tracker(self) -> Any:
        if self._torch_deltas is None:
            if self.delta_method == "exact":
                from .deltas_torch import DeltaTracker

                self._torch_deltas = DeltaTracker(*self.delta_tolerance)
            else:
                from .sketch_torch import SketchTracker

                self._torch_deltas = SketchTracker()
        return self._torch_deltas

    def _numpy_deltas(self, step: int, collection: str, items: list[tuple[Any, Any]], cols: Columns) -> None:
        """Deltas of host arrays against their copies (or sketches) from the previous saved step."""
        rtol, atol = self.delta_tolerance
        for i, (name, value) in enumerate(items):
            key = (collection, str(name))
            x = np.asarray(value)
            if x.dtype.kind not in "biuf" or x.size == 0:
                continue
            got = self._numpy_prev.get(key)
            if self.delta_method == "exact":
                kept = np.array(x, copy=True)
            else:
                kept = sketch_numpy(x, width_for(x.shape))
            self._numpy_prev[key] = (step, kept, x.shape)
            if got is None or got[0] >= step or got[2] != x.shape:
                continue
            if self.delta_method == "exact":
                cols.deltas[i] = (got[0], *numpy_delta(x, got[1], rtol, atol))
            else:
                d = kept[:-1] - got[1][:-1]
                cols.deltas[i] = (got[0], math.sqrt(d @ d), math.sqrt(got[1][-1]), None)

    def record_labels(
        self,
        labels: Any,
        predictions: Any = None,
        *,
        num_classes: int | None = None,
        name: str = "labels",
        step: int | None = None,
        mode: str | None = None,
    ) -> None:
        """Count this step's labels (and, with predictions, the confusion counts): wire `cls`.

        `labels`: 1-D integer class ids; `predictions`: class ids or 2-D logits/probabilities
        (argmax over dim 1). Torch tensors are counted on their device and copied with the step's
        statistics. k = `num_classes`, else the number of score columns, else the largest id + 1
        (pass num_classes on a GPU: finding the largest id costs a device sync). Confusion
        counts are sent for k <= 256, label counts only above. `step` defaults to the step being
        recorded (`_implicit_step`), `mode` to "train" (TorchHook: the model's mode).
        """
        step, mode = self._resolve(step, mode)
        if not self._accepts(step, mode):
            return
        try:
            rec = self._record_for(step, mode)
            if _is_torch(labels) or _is_torch(predictions):
                import torch

                from .captures_torch import class_counts_on_device

                if not isinstance(labels, torch.Tensor):
                    labels = torch.as_tensor(np.asarray(labels))
                if predictions is not None and not isinstance(predictions, torch.Tensor):
                    predictions = torch.as_tensor(np.asarray(predictions), device=labels.device)
                rec.captures.append(class_counts_on_device(str(name), labels, predictions, num_classes))
            else:
                rec.classes[str(name)] = stats_numpy.class_counts(labels, predictions, num_classes)
        except Exception as exc:  # noqa: BLE001
            self._note("record_labels", exc)

    def record_inputs(
        self,
        x: Any,
        name: str = "inputs",
        *,
        kind: str = "auto",
        channel: int = 1,
        token_values: Sequence[int] = (0,),
        step: int | None = None,
        mode: str | None = None,
    ) -> None:
        """Summarise a batch of model inputs: image channel sums (`img`) or token counts (`tok`).

        kind "images": a float batch of >= 3 dimensions with channels on axis `channel`; per
        channel the sum and sum of squares over every other axis, and the number of images.
        kind "tokens": integer ids; how many equal each of `token_values`, and the total.
        "auto" picks tokens for integer tensors and images for float tensors of >= 3 dimensions
        (other inputs are skipped). Torch tensors are reduced on their device. `step` and `mode`
        default as in `record_labels`.
        """
        step, mode = self._resolve(step, mode)
        if not self._accepts(step, mode):
            return
        try:
            rec = self._record_for(step, mode)
            torch_in = _is_torch(x)
            arr = x if torch_in else np.asarray(x)
            integer = (
                (not arr.is_floating_point() and not arr.is_complex())
                if torch_in
                else arr.dtype.kind in "biu"
            )
            if kind == "auto":
                kind = "tokens" if integer else "images" if arr.ndim >= 3 else "none"
            if kind == "none":
                self._log_once(
                    f"inputs-{name}",
                    logging.INFO,
                    "tensorpulse: input %r (%s, %d-D) is neither token ids nor images: not summarised",
                    name,
                    arr.dtype,
                    arr.ndim,
                )
                return
            if kind not in ("images", "tokens"):
                raise ValueError(f"kind must be 'auto', 'images' or 'tokens', got {kind!r}")
            if torch_in:
                from . import captures_torch

                if kind == "images":
                    rec.captures.append(captures_torch.image_sums_on_device(str(name), arr, channel))
                else:
                    rec.captures.append(captures_torch.token_counts_on_device(str(name), arr, token_values))
            elif kind == "images":
                rec.images[str(name)] = stats_numpy.image_sums(arr, channel)
            else:
                rec.tokens[str(name)] = stats_numpy.token_counts(arr, token_values)
        except Exception as exc:  # noqa: BLE001
            self._note("record_inputs", exc)

    def record_vector(
        self,
        step: int,
        name: str,
        values: Sequence[float],
        *,
        labels: Sequence[str] | None = None,
        mode: str = "train",
    ) -> None:
        """Add a small named float vector (wire `vec`, float32), optionally one label per value."""
        if not self._accepts(step, mode):
            return
        try:
            vals = tuple(float(v) for v in values)
            # labels beyond the wire's name limit are cut, rather than make the record undecodable
            labs = None if labels is None else tuple(str(v)[: wire.MAX_NAME_LEN] for v in labels)
            if labs is not None and len(labs) != len(vals):
                raise ValueError(f"vector {name!r}: {len(labs)} labels for {len(vals)} values")
            if len(vals) > wire.MAX_TENSORS:
                raise ValueError(
                    f"vector {name!r} has {len(vals)} values; the wire carries {wire.MAX_TENSORS}"
                )
            self._record_for(step, mode).vectors[str(name)] = wire.Vector(vals, labs)
        except Exception as exc:  # noqa: BLE001
            self._note("record_vector", exc)

    def _resolve(self, step: int | None, mode: str | None) -> tuple[Any, str]:
        mode = self._default_mode() if mode is None else mode
        return (self._implicit_step(mode) if step is None else step), mode

    def _default_mode(self) -> str:
        return "train"

    def _implicit_step(self, mode: str) -> int:
        """The step a call without `step=` belongs to: the newest pending step of `mode`, else the
        step after the last one published (0 at first). TorchHook: the step being run."""
        pending = [k[0] for k in self._pending if k[1] == mode]
        if pending:
            return max(pending)
        last = self._last_published.get(mode)
        return 0 if last is None else last + 1

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

    def _record_for(self, step: int, mode: str) -> _Record:
        """The pending record of (step, mode); earlier pending steps of the mode are published first."""
        rec = self._pending.get((step, mode))
        if rec is None:
            earlier = [k for k in self._pending if k[1] == mode and k[0] < step and not self._unfinished(*k)]
            for key in sorted(earlier):
                self._emit(self._pending.pop(key))
            rec = self._pending[(step, mode)] = _Record(step=step, mode=mode, ts=time.time())
        return rec

    def _unfinished(self, step: int, mode: str) -> bool:
        """Whether the pending record of (step, mode) still waits for data of its own (TorchHook:
        its statistics, reduced in the background, or whether the optimizer applied the step),
        so that a record of a later step must not publish it early, split in two."""
        return False

    def _emit(self, rec: _Record) -> None:
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
            block = merged.to_block(names, colls, self.delta_tolerance)
            if self._shard_marks is not None:  # FSDP2 / DTensor shards (TorchHook, producers/shards.py)
                block.shards = self._shard_marks(names)
            if rec.weights_after is not None and (block.nan is not None or block.inf is not None):
                block.nonfinite_order = _nonfinite_order(colls, block, rec.weights_after)
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
            classes=rec.classes,
            images=rec.images,
            tokens=rec.tokens,
            vectors=rec.vectors,
            skipped=rec.skipped,
        )


#: Within one training step, when each collection's values come to be, for the order of its
#: non-finite tensors: weights as the forward pass used them, activations (forward order),
#: gradients (backward order), weights after the optimizer applied the gradients.
_PHASES = {"activations": 1, "activation_inputs": 1, "gradients": 2}
_WEIGHTS = ("weights", "biases")


def _nonfinite_order(colls: list[str], block: wire.TensorBlock, weights_after: bool) -> list[int]:
    """Indices of the block's non-finite tensors in the order their values appeared (wire `t.nfo`).

    Why: a NaN spreads within one step (the forward pass into the later activations, the
    backward pass into every gradient, the optimizer's step into every weight), so the first in
    record order is often a tensor it spread to. Activations are in the order the forward pass
    produced them; gradients are taken last layer first, as autograd computes them in a model
    whose parameters are registered in forward order (an approximation: the hook does not watch
    the backward pass). Tensors of other collections are left out (they follow, in record order).
    Runs on the publisher thread, only for records that hold a non-finite value.
    """
    bad = np.zeros(len(colls), dtype=bool)
    for arr in (block.nan, block.inf):
        if arr is not None:
            bad |= np.asarray(arr) > 0
    weights = 3 if weights_after else 0
    keyed = []
    for i in np.flatnonzero(bad).tolist():
        coll = colls[i]
        phase = weights if coll in _WEIGHTS else _PHASES.get(coll)
        if phase is not None:
            keyed.append((phase, -i if phase == 2 else i, i))
    return [i for _, _, i in sorted(keyed)]


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
        {remap[i]: v for i, v in cols.deltas.items() if i in remap},
        cols.finite,
    )
    return [names[i] for i in keep], [colls[i] for i in keep], out


__all__ = ["Hook"]
