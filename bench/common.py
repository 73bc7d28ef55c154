"""Shared pieces of the benchmarks: the models of the peer measurements and a broker to publish to."""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Iterator

import torch
from torch import nn


def make_model(kind: str) -> nn.Module:
    """The two models the peer overhead table was measured on."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )
    raise ValueError(f"unknown model {kind!r}: mlp or cnn")


def make_batches(kind: str, n: int = 8, batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    shape = (batch, 784) if kind == "mlp" else (batch, 3, 32, 32)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    """The given cluster, $KAFKA_BOOTSTRAP, or an embedded Tansu broker for the run."""
    bootstrap = bootstrap or os.environ.get("KAFKA_BOOTSTRAP")
    if bootstrap:
        yield bootstrap
        return
    from tensorpulse.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b.bootstrap


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.median(values)
