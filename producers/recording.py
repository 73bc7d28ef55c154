"""Recording: how training code hands tensors, labels, inputs and scalars to a Hook.

Why a module of its own: each `record_*` method reduces what it is given, at once, into the
pending record of its step (`Hook._record_for`): torch tensors on their own device
(`stats_torch`, `captures_torch`; one device->host copy per call), anything else with numpy
(`stats_numpy`); weight deltas against the previous saved step (`deltas_torch`, `sketch_torch`,
or numpy copies and sketches). Nothing here decides when a record is published or how it is
encoded (`hook.Hook`, `records`). `Recording` is mixed into `Hook`, whose state it uses
(`_accepts`, `_record_for`, the failure counters, the delta settings); like every public
method of the hook, these never raise into training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tensorpulse import wire

from . import stats_numpy
from .records import Part
from .sketch import sketch_numpy, width_for
from .stats_numpy import Columns, numpy_delta, numpy_stats


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


class Recording:
    """The `record_*` methods of `Hook` (module docstring)."""

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
                rec.parts.append(Part(names, [collection] * len(names), cols))
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
                rec.parts.append(Part(names, [collection] * len(names), host))
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
