"""The torch side of the weight-delta sketch (definition and accuracy: producers/sketch.py).

Sketches are computed on the tensor's own device (float64 buckets, bounded scratch) or, for CPU
float32 tensors with numba installed, by one kernel call for all of them; the kept sketches stay
on that device, so a delta step costs no host sync and no copy of the weights.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from . import stats_numba
from .sketch import host_signs, width_for
from .stats_torch import DeviceStats, _kernel_takes


class _DeviceSigns:
    """The host row signs mirrored per device."""

    def __init__(self) -> None:
        self._dev: dict[torch.device, torch.Tensor] = {}

    def __call__(self, device: torch.device, m: int) -> torch.Tensor:
        t = self._dev.get(device)
        if t is None or t.numel() < m:
            with torch.inference_mode(False):
                t = torch.from_numpy(host_signs(m)).to(device)
            self._dev[device] = t
        return t


device_signs = _DeviceSigns()


#: Elements converted to float64 at a time by the torch path (its scratch: 8 bytes each).
TORCH_BLOCK = 1 << 20


def sketch(x: torch.Tensor, width: int) -> torch.Tensor:
    """`sketch.sketch_numpy` on the tensor's own device: [width + 1] float64, no host sync.

    Rows are converted to float64 a block at a time (at most TORCH_BLOCK elements), so the
    scratch stays bounded whatever the tensor's size.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    dev = flat.device
    full = n // width
    signs = device_signs(dev, full + 1)
    out = torch.zeros(width + 1, dtype=torch.float64, device=dev)
    acc, ss = out[:width], out[width:]
    rows = max(1, TORCH_BLOCK // width)
    main = flat[: full * width].view(full, width) if full else None
    for r0 in range(0, full, rows):
        r1 = min(full, r0 + rows)
        block = main[r0:r1].to(torch.float64)  # type: ignore[index]
        acc.add_(signs[r0:r1] @ block)
        v = block.view(-1)
        ss.add_(torch.dot(v, v))
    if full * width < n:
        tail = flat[full * width :].to(torch.float64)
        acc[: tail.numel()].add_(tail * signs[full])
        ss.add_(torch.dot(tail, tail))
    return out


class SketchTracker:
    """The previous sketch of each tracked tensor, to report how much it changed (see the module).

    `track` returns, per tensor, None (first sight, or a new shape/dtype/device, or a step not
    later than the kept one) or (prev_step, [||S(d)||^2, ||w_prev||^2] as a device or host
    tensor). Sketches stay on the tensor's device: nothing is copied to the host here.
    """

    def __init__(self) -> None:
        self._prev: dict[Hashable, tuple[int, tuple[int, ...], torch.dtype, torch.device, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._prev)

    def clear(self) -> None:
        self._prev.clear()

    def nbytes(self) -> int:
        """Bytes held by the kept sketches."""
        return sum(e[4].numel() * e[4].element_size() for e in self._prev.values())

    def track(
        self, step: int, keys: Sequence[Hashable], tensors: Sequence[torch.Tensor], stats: Sequence[DeviceStats]
    ) -> None:
        """Set `stats[i].delta` (an estimate: `delta_exact` False) against the sketch kept from an
        earlier step, and keep this step's sketch instead. As DeltaTracker.track: a tensor seen
        for the first time, whose shape, dtype or device changed, or a step not later than the
        kept one's gets no delta."""
        items = []
        with torch.no_grad():
            for key, t, s in zip(keys, tensors, stats, strict=True):
                x = t.detach()
                if x.numel() and not x.is_complex():
                    items.append((key, x, s))
            if not items:
                return
            new = sketches([x for _, x, _ in items])
            for (key, x, s), sk in zip(items, new, strict=True):
                got = self._prev.get(key)
                self._prev[key] = (step, tuple(x.shape), x.dtype, x.device, sk)
                if got is None or got[0] >= step or got[1:4] != (tuple(x.shape), x.dtype, x.device):
                    continue
                prev = got[4]
                d = sk[:-1] - prev[:-1]
                s.delta = torch.stack([torch.dot(d, d), prev[-1], torch.zeros((), dtype=d.dtype, device=d.device)])
                s.delta_step = got[0]
                s.delta_exact = False


def sketches(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The sketch of each tensor (`sketch`, or the numba kernel for CPU float32 ones)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    fused = [i for i, t in enumerate(tensors) if _kernel_takes(t)]
    if fused and not stats_numba.enabled():  # asked only for CPU float32 tensors: numba loads then
        fused = []
    if fused:
        widths = [width_for(tensors[i].shape) for i in fused]
        sizes = [tensors[i].numel() for i in fused]
        rows = max(-(-n // w) for n, w in zip(sizes, widths, strict=True))
        got = stats_numba.sketches_at(
            [tensors[i].data_ptr() for i in fused], sizes, widths, host_signs(rows)
        )
        for i, v in zip(fused, got, strict=True):
            out[i] = torch.from_numpy(v)
    for i, t in enumerate(tensors):
        if out[i] is None:
            out[i] = sketch(t, width_for(t.shape))
    return out  # type: ignore[return-value]
