"""Keras 3 integration: a `keras.callbacks.Callback` that publishes through the framework-neutral Hook.

Usage::

    from tensorpulse.producers.keras import TensorPulseCallback

    model.fit(x, y, epochs=5, callbacks=[TensorPulseCallback("my-job", "kafka:9092")])

What it records, with `Hook.record` / `record_scalars` (producers/hook.py): torch tensors are
reduced on their device, the jax and TensorFlow backends' arrays through numpy.

- train records at optimizer steps (`model.optimizer.iterations`, from 0: with the optimizer's
  `gradient_accumulation_steps` the micro-batches are not counted), after the batch's update:
  every float variable of the model by its Keras path ("dense/kernel" in collection "weights",
  "dense/bias" in "biases"), the gradients "gradient/<path>" where the backend leaves them on the
  variables (torch: `variable.value.grad`, from the step's backward; not with gradient
  accumulation, where they would be the last micro-batch's), and the batch's `logs` as scalars:
  "loss" and the compiled metrics (Keras reports running means over the epoch), plus "lr";
- eval records, one per evaluation (`validation_data` in `fit`, or `evaluate`), at step
  `optimizer.iterations` (the optimizer steps done so far, the train axis, as Overfit expects):
  the evaluation's loss and metrics as scalars;
- a stop action sets `model.stop_training`, Keras's own way to end `fit` (after the current batch).

Activations are not captured: Keras layers are not torch modules with forward hooks. Keras runs in
one process per host (its distribution API shards inside it), so the record's rank is the
environment's (RANK / WORLD_SIZE), as for any Hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

try:
    import keras
except ImportError as exc:  # pragma: no cover - exercised only without keras
    raise ImportError(
        "tensorpulse.producers.keras needs Keras 3: pip install 'tensorpulse[keras]' (and a backend: "
        "torch, jax or tensorflow)"
    ) from exc

from .callbacks import CallbackCore, never_raises
from .hook import Hook

#: Keras versions this callback is tested with: [lowest, below).
SUPPORTED = ((3, 0), (4,))


def _collection(path: str) -> str:
    return "biases" if path.endswith("bias") else "weights"


class TensorPulseCallback(keras.callbacks.Callback):
    """Publishes weights, gradients (torch backend), loss and metrics of a Keras 3 `fit`.

    `job`, `bootstrap`, `save_interval` and `hook_options` are the Hook's (e.g.
    `include_collections`, `kafka_config`). `callback.hook` is the Hook once training began.
    """

    def __init__(
        self,
        job: str,
        bootstrap: str | None = None,
        *,
        save_interval: int | None = None,
        **hook_options: Any,
    ) -> None:
        super().__init__()
        self.core = CallbackCore("Keras", job, bootstrap, save_interval, hook_options, Hook)
        self._last_iteration: int | None = None
        self._torch = keras.backend.backend() == "torch"
        self._fitting = False
        self._frozen = False  # no trainable variables: the optimizer never steps, batches count

    @property
    def hook(self) -> Hook | None:
        """The Hook of the running `fit` (None before it and after it ended)."""
        return self.core.hook

    # ------------------------------------------------------------------ helpers
    def _iterations(self) -> int | None:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    def _float_variables(self) -> list[Any]:
        return [v for v in self.model.variables if "float" in str(v.dtype)]

    # ------------------------------------------------------------------ training
    @never_raises
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        """Make the hook (in this process) and note the optimizer step training starts from."""
        self.core.check_version("keras", keras.__version__, *SUPPORTED)
        self.core.hook_for()
        self._fitting = True
        self._last_iteration = self._iterations()
        self._frozen = not self.model.trainable_weights
        self.core.check_parameters([(v.path, v.trainable) for v in self._float_variables()])
        optimizer = getattr(self.model, "optimizer", None)
        if self._torch and getattr(optimizer, "gradient_accumulation_steps", None):
            self.core.say_once(
                "accumulation",
                "tensorpulse: with gradient_accumulation_steps the variables hold only the last "
                "micro-batch's gradients: gradients are not sent, weights and metrics are",
            )
        elif not self._torch:
            self.core.say_once(
                "gradients",
                "tensorpulse: the %s backend does not leave gradients on the variables: weights, "
                "loss and metrics are sent, gradients are not",
                keras.backend.backend(),
            )

    @never_raises
    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        """After a batch whose optimizer step ran: weights, gradients and logs of that step."""
        hook = self.core.hook
        iteration = (self._last_iteration or 0) + 1 if self._frozen else self._iterations()
        if hook is None or iteration is None or iteration == self._last_iteration:
            return
        self._last_iteration = iteration
        step = iteration - 1
        if hook.should_save(step, "train"):
            self._record_step(hook, step, logs)
            hook.publish(step, "train")
        if self.core.stop_requested():
            self.model.stop_training = True

    def _record_step(self, hook: Hook, step: int, logs: Mapping[str, Any] | None) -> None:
        variables = self._float_variables()
        for collection in ("weights", "biases"):
            chosen = {v.path: self._value(v) for v in variables if _collection(v.path) == collection}
            if chosen:
                hook.record(step, chosen, collection=collection)
        optimizer = self.model.optimizer
        if self._torch and not getattr(optimizer, "gradient_accumulation_steps", None):
            grads = {}
            for v in variables:
                grad = v.value.grad if v.trainable else None
                if grad is not None:
                    grads[f"gradient/{v.path}"] = grad.detach()
            if grads:
                hook.record(step, grads, collection="gradients")
        scalars = self.core.scalars(logs)
        with contextlib.suppress(Exception):  # an optimizer without a readable rate: no "lr"
            scalars["lr"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        hook.record_scalars(step, scalars)

    def _value(self, variable: Any) -> Any:
        value = variable.value
        return value.detach() if self._torch else value

    @never_raises
    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        """Publish what is pending and the end record."""
        self._fitting = False
        self.core.close()

    # ------------------------------------------------------------------ evaluation
    @never_raises
    def on_test_end(self, logs: Mapping[str, Any] | None = None) -> None:
        """One eval record per evaluation: its loss and metrics, at the optimizer steps done so far."""
        hook = self.core.hook_for()
        if hook is None:
            return
        step = self._iterations() or 0
        if hook.should_save(step, "eval"):
            hook.record_scalars(step, self.core.scalars(logs), mode="eval")
            hook.publish(step, "eval")
        if not self._fitting:
            hook.flush(timeout=5.0)  # evaluate() alone: no on_train_end will close the hook


__all__ = ["SUPPORTED", "TensorPulseCallback"]
