"""Record-level blocks counted on the device: labels and confusion counts, input summaries.

Why a module of its own: these are not tensor statistics but small vectors per record (wire
`cls`, `img`, `tok`), counted on the tensor's device and copied with the step's statistics
(`stats_host.transfer(..., vectors=)`); `stats_numpy` has their host-array counterparts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensorpulse.wire import MAX_CONFUSION_CLASSES, ClassCounts, ImageSums, TokenCounts

from .stats_numpy import _channel_axis, check_channels, check_classes, check_token_values
from .stats_torch import _CONSTANTS, on_host


@dataclass(slots=True)
class Capture:
    """A small device vector for one record-level block, and how to turn its host copy into it.

    `kind` is "cls", "img" or "tok" (the wire key); `finish(host_values)` gives the wire object.
    """

    kind: str
    name: str
    values: torch.Tensor
    finish: Callable[[np.ndarray], Any]


def _bincount(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Counts of idx values in [0, size): bincount on CPU; elsewhere scatter_add, which needs no
    host sync (torch.bincount reads the largest value back to the host first)."""
    if on_host(idx.device):
        return torch.bincount(idx, minlength=size)
    out = torch.zeros(size, dtype=torch.int64, device=idx.device)
    return out.scatter_add_(0, idx, torch.ones_like(idx))


def _ids(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be integer class ids, got dtype {t.dtype}")
    return t.reshape(-1).to(torch.int64)


def class_counts_on_device(
    name: str, labels: torch.Tensor, predictions: torch.Tensor | None = None, num_classes: int | None = None
) -> Capture:
    """Label counts and (k <= 256, with predictions) k*k confusion counts, counted on the device.

    `predictions`: class ids, or 2-D scores (argmax over dim 1 on the device). k is
    `num_classes`, else the number of score columns, else the largest id + 1 (which costs a host
    sync on accelerators: pass num_classes there). Ids outside [0, k) are not counted.
    """
    y = _ids(labels.detach(), "labels")
    p = None
    if predictions is not None:
        p = predictions.detach()
        if p.ndim == 2 and (p.is_floating_point() or p.shape[1] > 1):
            if num_classes is None:
                num_classes = p.shape[1]
            p = p.argmax(dim=1)
        p = _ids(p, "predictions")
        if p.numel() != y.numel():
            raise ValueError(f"{p.numel()} predictions for {y.numel()} labels")
    if num_classes is None:
        if y.numel() == 0:
            num_classes = 0
        else:
            top = y.max() if p is None else torch.maximum(y.max(), p.max())
            num_classes = int(top) + 1
    k = check_classes(num_classes)
    valid = (y >= 0) & (y < k)
    # bins: [0, k) labels, k: labels out of range; then k*k confusion cells and one for bad pairs
    idx = torch.where(valid, y, k)
    conf = p is not None and k <= MAX_CONFUSION_CLASSES
    size = k + 1
    if conf:
        pair = valid & (p >= 0) & (p < k)
        idx = torch.cat([idx, torch.where(pair, y * k + p, k * k) + (k + 1)])
        size += k * k + 1
    counts = _bincount(idx, size)

    def finish(v: np.ndarray) -> ClassCounts:
        c = [int(x) for x in v[:size]]
        return ClassCounts(k, tuple(c[:k]), tuple(c[k + 1 : k + 1 + k * k]) if conf else None)

    return Capture("cls", name, counts, finish)


def image_sums_on_device(name: str, x: torch.Tensor, channel: int = 1) -> Capture:
    """Per-channel sums and sums of squares over every other axis of a batch of images (dim 0)."""
    x = x.detach()
    ch = _channel_axis(x.ndim, channel)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    dims = [d for d in range(x.ndim) if d != ch]
    c, images = check_channels(x.shape[ch]), x.shape[0]
    pixels = x.numel() // (c * images) if c and images else 0
    if ch == 1 and x.is_contiguous() and images and c:
        # N, C, pixels: reducing the contiguous pixel axis first is ~3x faster on CPU, no temporary
        v = x.view(images, c, -1)
        vals = torch.cat([v.sum(dim=2).sum(dim=0), torch.linalg.vector_norm(v, dim=2).square().sum(dim=0)])
    else:
        vals = torch.cat([x.sum(dim=dims), x.square().sum(dim=dims)])

    def finish(v: np.ndarray) -> ImageSums:
        return ImageSums(images, pixels, tuple(v[:c].tolist()), tuple(v[c : 2 * c].tolist()))

    return Capture("img", name, vals, finish)


def token_counts_on_device(name: str, x: torch.Tensor, values: Sequence[int]) -> Capture:
    """How many of the integer tokens in `x` equal each of `values` (one compare and sum)."""
    x = x.detach()
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"token ids must be integers, got dtype {x.dtype}")
    vals = check_token_values(values)
    total = x.numel()
    if vals and total:
        ref = _CONSTANTS.get(("tok", vals), vals, x.device, x.dtype)
        counts = torch.eq(x.reshape(-1, 1), ref).sum(dim=0)
    else:
        counts = torch.zeros(len(vals), dtype=torch.int64, device=x.device)

    def finish(v: np.ndarray) -> TokenCounts:
        got = v[: len(vals)] if total else np.zeros(len(vals))
        return TokenCounts(total, {val: int(c) for val, c in zip(vals, got, strict=True)})

    return Capture("tok", name, counts, finish)
