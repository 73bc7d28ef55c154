"""Hugging Face `Trainer` integration: a `TrainerCallback` that runs a TorchHook inside `train()`.

Usage::

    from tensorpulse.producers.transformers import TensorPulseCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[TensorPulseCallback("my-job", "kafka:9092")])
    trainer.train()

What it records, through the same TorchHook a hand-written loop uses (producers/torch.py):

- train records at optimizer steps (`state.global_step`, from 0; with
  `gradient_accumulation_steps=k` the micro-batches are not counted), captured in
  `on_optimizer_step`: after the update and before the Trainer's `zero_grad`, so the gradients are
  the accumulated ones the optimizer used (clipped and unscaled, as the Trainer left them), the
  weights are read after the update. The Trainer hands its loss to callbacks only in its `logs`
  (every `logging_steps`, averaged since the last log): the record of a step that logs is held
  open until `on_log`, and the logs (loss, grad_norm, learning_rate, epoch, ...) join it as scalars.
  Set `logging_steps=1` for a loss on every record (LossNotDecreasing needs one per saved step).
  With `logging_strategy="epoch"` a record goes out one step late, when the next one starts;
- eval records, one per `evaluate()`, at step `state.global_step` (the train axis, as Overfit
  expects): weights, the activations of the first evaluation batch, and the evaluation metrics
  with their "eval_" prefix removed, so that "eval_loss" is the record's "loss";
- a stop action sets `control.should_training_stop`, the Trainer's own way to end training: it
  stops after the current step (and its logging, evaluation and saving).

Every process publishes its own records (rank `args.process_index`, world `args.world_size`). A
stop action reaches every rank within a fraction of a second, which can still fall on different
steps: under DDP a rank that stops one step before the others leaves them waiting in the next
all-reduce until the launcher ends the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import transformers
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "tensorpulse.producers.transformers needs Hugging Face transformers: "
        "pip install 'tensorpulse[transformers]'"
    ) from exc

import torch

from .callbacks import CallbackCore, never_raises
from .torch import TorchHook

#: transformers versions this callback is tested with: [lowest, below).
SUPPORTED = ((4, 40), (6,))


class TensorPulseCallback(TrainerCallback):
    """Publishes weights, gradients, activations and the logs of a Hugging Face Trainer run.

    `job`, `bootstrap`, `save_interval` and `hook_options` are TorchHook's (e.g. `offload`,
    `include_collections`, `kafka_config`); `attach_options` go to `TorchHook.attach` (e.g.
    `{"include": "^transformer\\\\.h\\\\.0"}`). `callback.hook` is the TorchHook once training began.
    """

    def __init__(
        self,
        job: str,
        bootstrap: str | None = None,
        *,
        save_interval: int | None = None,
        attach_options: Mapping[str, Any] | None = None,
        **hook_options: Any,
    ) -> None:
        self.core = CallbackCore(
            "Hugging Face Trainer", job, bootstrap, save_interval, hook_options, TorchHook
        )
        self.attach_options = dict(attach_options or {})
        self._attached: Any = None  # the model the hook is attached to
        self._held: int | None = None  # the train step whose record waits for its logs

    @property
    def hook(self) -> TorchHook | None:
        """The TorchHook of the running training (None before it and after `on_train_end`)."""
        return self.core.hook

    def _attach(self, args: TrainingArguments, model: Any, optimizer: Any) -> TorchHook | None:
        hook = self.core.hook_for(args.process_index, args.world_size)
        if hook is None or model is None or self._attached is model:
            return hook
        # The Trainer hands over accelerate's wrapper; its step hooks are the wrapped optimizer's.
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        self.core.check_parameters([(n, p.requires_grad) for n, p in model.named_parameters()])
        hook.attach(model, optimizer, **self.attach_options)
        self._attached = model
        return hook

    # ------------------------------------------------------------------ training
    @never_raises
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Make the hook in this process and attach it to the (unwrapped) model and its optimizer."""
        self.core.check_version("transformers", transformers.__version__, *SUPPORTED)
        self._attach(args, kwargs.get("model"), kwargs.get("optimizer"))
        self._held = None

    @never_raises
    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Capture the step just taken, before the Trainer zeroes the gradients; hold it for the logs."""
        hook = self.core.hook
        if hook is None:
            return
        step = state.global_step  # incremented after this event: the 0-based index of this step
        hook.step(step, mode="train", hold=True)
        self._held = step

    @never_raises
    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Publish the step now unless logs for it are coming; stop on a stop action."""
        if not (control.should_log or args.logging_strategy == "epoch"):
            self._release()
        if self.core.stop_requested():
            control.should_training_stop = True

    @never_raises
    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """An epoch that ends without logs publishes its last step now."""
        if not control.should_log:
            self._release()

    @never_raises
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """The logs of the held step join its record (evaluation metrics go to the eval record)."""
        hook = self.core.hook
        if hook is None or self._held is None:
            return
        train_logs = {k: v for k, v in (logs or {}).items() if not str(k).startswith("eval_")}
        hook.record_scalars(self._held, self.core.scalars(train_logs), mode="train")
        self._release()

    def _release(self) -> None:
        hook, step, self._held = self.core.hook, self._held, None
        if hook is not None and step is not None:
            hook.release(step, "train")

    @never_raises
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Publish what is pending and the end record; detach from the model."""
        self._release()
        hook = self.core.hook
        if hook is not None:
            hook.detach()
        self._attached = None
        self.core.close()

    # ------------------------------------------------------------------ evaluation
    @never_raises
    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """One eval record per evaluation, at the current optimizer step, published at once."""
        hook = self._attach(args, kwargs.get("model"), None) if self.core.hook is None else self.core.hook
        if hook is None:
            return
        step = state.global_step
        if hook.should_save(step, "eval"):
            hook.record_scalars(step, self.core.scalars(metrics, strip="eval_"), mode="eval")
        hook.step(step, mode="eval")
        hook.publish(step, "eval")


__all__ = ["SUPPORTED", "TensorPulseCallback"]
