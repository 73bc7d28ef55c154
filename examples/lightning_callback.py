"""A tiny Lightning run reported by tensorpulse; `--nan-step N` breaks a weight at optimizer step N.

    tensorpulse broker --port 9092 &  tensorpulse stream --bootstrap 127.0.0.1:9092 &
    python examples/lightning_callback.py --nan-step 20        # ExplodingTensor fires at step 20
    tensorpulse alerts --bootstrap 127.0.0.1:9092

Needs `pip install 'tensorpulse[lightning]'`.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tensorpulse.producers.lightning import TensorPulseCallback


class Regressor(L.LightningModule):
    def __init__(self, nan_step: int | None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
        self.nan_step = nan_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # called as self(x) below: the hook captures activations of this pass

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == self.nan_step:
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_mse", loss)  # logged metrics become scalars of the step's record
        return loss  # the record's "loss"

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)  # the eval record's "loss" (mean over the run)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--job", default="lightning-example")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nan-step", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    y = x[:, :1] * 2 + 0.1 * torch.randn(2048, 1)
    trainer = L.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=2,  # the step axis counts optimizer steps, not these micro-batches
        val_check_interval=20,
        callbacks=[TensorPulseCallback(args.job, args.bootstrap)],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
    )
    data = TensorDataset(x, y)
    trainer.fit(Regressor(args.nan_step), DataLoader(data, batch_size=16), DataLoader(data, batch_size=256))


if __name__ == "__main__":
    main()
