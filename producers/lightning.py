"""PyTorch Lightning integration: a `Callback` that runs a TorchHook inside `Trainer.fit`.

Usage::

    from tensorpulse.producers.lightning import TensorPulseCallback

    trainer = lightning.Trainer(callbacks=[TensorPulseCallback("my-job", "kafka:9092")])
    trainer.fit(model, train_loader, val_loader)

What it records, through the same TorchHook a hand-written loop uses (producers/torch.py):

- train records at optimizer steps, after `optimizer_step` (in `on_train_batch_end` of the batch
  whose optimizer step ran): with `accumulate_grad_batches=k` the step axis counts optimizer steps
  (`trainer.global_step`, from 0), not micro-batches, and the gradients are the accumulated ones.
  Weights are read after the update; gradients are those the optimizer used (unscaled, under AMP).
  Scalar "loss" is the loss Lightning returns from `training_step`, summed over the micro-batches
  of the step (Lightning divides each by k, so this is their mean), plus every metric logged with
  `self.log(...)` since the last record, under its own name;
- eval records, one per validation run (not the sanity check), at step `trainer.global_step`
  (the optimizer steps done so far, the train axis, as Overfit expects): weights, the activations
  of the first validation batch, the metrics logged during validation, and scalar "loss": the mean
  of the losses `validation_step` returned, else the logged metric `val_loss_name` ("val_loss");
- a stop action sets `trainer.should_stop`, Lightning's own way to end `fit` (it stops after the
  current batch). With several processes the flag is agreed on with the strategy's
  `reduce_boolean_decision` at every optimizer step, so that no rank leaves while the others wait
  in a collective.

Every rank publishes its own records (rank and world size from the trainer): per-rank rules need
them. The hook is made in `setup`, in each rank's process, and closed in `teardown`. `lightning` is
used if installed, else the older `pytorch_lightning` package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - exercised only with pytorch_lightning alone
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "tensorpulse.producers.lightning needs Lightning: pip install 'tensorpulse[lightning]' "
            "(or lightning / pytorch_lightning)"
        ) from exc

import torch

from .callbacks import CallbackCore, never_raises
from .torch import TorchHook

#: Lightning versions this callback is tested with: [lowest, below).
SUPPORTED = ((2, 0), (3,))


def _loss_of(outputs: Any) -> Any:
    """The loss in what `training_step` / `validation_step` returned: a tensor, or dict["loss"]."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs.detach()
    return None


class TensorPulseCallback(Callback):
    """Publishes weights, gradients, activations, the loss and logged metrics of a Lightning run.

    `job`, `bootstrap`, `save_interval` and `hook_options` are TorchHook's (e.g. `offload`,
    `include_collections`, `kafka_config`); `attach_options` go to `TorchHook.attach` (e.g.
    `{"include": "^encoder", "capture_inputs": True}`). `val_loss_name`: the logged metric used as
    the eval loss when `validation_step` returns none. The hook is `callback.hook` once `fit` has
    started (None before): use it for `record_labels` and the like inside `training_step`.
    """

    def __init__(
        self,
        job: str,
        bootstrap: str | None = None,
        *,
        save_interval: int | None = None,
        val_loss_name: str = "val_loss",
        attach_options: Mapping[str, Any] | None = None,
        **hook_options: Any,
    ) -> None:
        super().__init__()
        self.core = CallbackCore("Lightning", job, bootstrap, save_interval, hook_options, TorchHook)
        self.val_loss_name = val_loss_name
        self.attach_options = dict(attach_options or {})
        self._attached = False
        self._last_global_step = 0
        self._loss: Any = None  # summed micro-batch losses of the optimizer step being run
        self._seen: dict[str, Any] = {}  # metric name -> the value object last recorded
        self._eval_names: set[str] = set()  # metrics logged during validation
        self._before_val: dict[str, Any] = {}
        self._val_loss: Any = None
        self._val_count = 0

    @property
    def hook(self) -> TorchHook | None:
        """The TorchHook of the running fit (None before `setup` and after `teardown`)."""
        return self.core.hook

    # ------------------------------------------------------------------ lifecycle
    @never_raises
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Make the hook in this rank's process (rank and world size from the trainer)."""
        self.core.check_version("lightning", pl.__version__, *SUPPORTED)
        self.core.hook_for(trainer.global_rank, trainer.world_size)

    @never_raises
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach after the sanity check, so that its batches are not taken for validation."""
        self._attach(trainer, pl_module, training=True)
        self._last_global_step = trainer.global_step
        self._loss = None

    @never_raises
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Detach, publish what is pending and the end record."""
        hook = self.core.hook
        if hook is not None:
            hook.detach()
        self._attached = False
        self.core.close()

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, training: bool) -> None:
        hook = self.core.hook_for(trainer.global_rank, trainer.world_size)
        if hook is None or self._attached:
            return
        optimizer = None
        if training:
            optimizers = trainer.optimizers
            if len(optimizers) == 1:
                optimizer = optimizers[0]
            elif optimizers:
                self.core.say_once(
                    "optimizers",
                    "tensorpulse: %d optimizers: learning rates are not sent and weights are read on "
                    "the training thread",
                    len(optimizers),
                )
        self.core.check_parameters([(n, p.requires_grad) for n, p in pl_module.named_parameters()])
        hook.attach(pl_module, optimizer, **self.attach_options)
        self._attached = True

    # ------------------------------------------------------------------ training
    @never_raises
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After each batch: add its loss; when its optimizer step ran, record that step."""
        hook = self.core.hook
        if hook is None:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step == self._last_global_step:
            return  # a micro-batch of gradient accumulation: no optimizer step yet
        self._last_global_step = trainer.global_step
        step = trainer.global_step - 1
        loss, self._loss = self._loss, None
        if hook.should_save(step, "train"):
            hook.record_scalars(step, self._fresh_metrics(trainer), mode="train")
        hook.step(step, loss=loss, mode="train")
        stop = self.core.stop_requested()
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True

    def _fresh_metrics(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Metrics logged since the last record (Lightning keeps old values in callback_metrics:
        a value object not seen before is a new one), without those logged during validation."""
        fresh = {}
        for name, value in trainer.callback_metrics.items():
            if name in self._eval_names or self._seen.get(name) is value:
                continue
            self._seen[name] = value
            fresh[name] = value
        return self.core.scalars(fresh)

    # ------------------------------------------------------------------ validation
    @never_raises
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note the metrics logged so far (what validation logs is what changes)."""
        if trainer.sanity_checking:
            return
        self._attach(trainer, pl_module, training=False)  # trainer.validate() without fit
        self._before_val = dict(trainer.callback_metrics)
        self._val_loss, self._val_count = None, 0

    @never_raises
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Add up the losses `validation_step` returns (on the device, no sync)."""
        if trainer.sanity_checking:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            self._val_loss = loss if self._val_loss is None else self._val_loss + loss
            self._val_count += 1

    @never_raises
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One eval record for the whole validation run, at the current optimizer step."""
        hook = self.core.hook
        if trainer.sanity_checking or hook is None:
            return
        before = self._before_val
        logged = {k: v for k, v in trainer.callback_metrics.items() if k not in before or before[k] is not v}
        self._eval_names.update(logged)
        loss = self._val_loss / self._val_count if self._val_count else logged.get(self.val_loss_name)
        step = trainer.global_step
        if hook.should_save(step, "eval"):
            hook.record_scalars(step, self.core.scalars(logged), mode="eval")
        hook.step(step, loss=loss, mode="eval")
        hook.publish(step, "eval")  # at the end of its evaluation, not with the next record
        self._val_loss, self._val_count = None, 0


__all__ = ["SUPPORTED", "TensorPulseCallback"]
