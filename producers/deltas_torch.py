"""Weight deltas of torch tensors: how each tracked tensor changed since its previous saved step.

Why a module of its own: it keeps state across steps (a device copy of every tracked tensor),
which the per-step reductions of `stats_torch` do not; its results ride along in the step's one
host copy (`DeviceStats.delta`, read by `stats_host.transfer`). The sketched alternative, which
keeps a small sketch instead of a copy, is `sketch_torch.SketchTracker`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from . import stats_numba, stats_torch
from .stats_torch import DeviceStats, _compute_dtype, _kernel_takes, _scratch, on_host

#: CPU chunk of the delta pass: it touches four buffers (w, w_prev and two scratch), so a smaller
#: chunk than CPU_CHUNK keeps them in L2 (measured: 64 Ki elements ~10 % faster than 128 Ki).
DELTA_CPU_CHUNK = 1 << 16
#: Off the host, tensors of at most this many elements in all are handled together by
#: multi-tensor (torch._foreach_*) kernels: a fixed number of kernel launches per group instead
#: of ~9 per tensor; the group's temporaries are two float copies of its tensors.
DELTA_GROUP = 1 << 24


def _delta(x: torch.Tensor, prev: torch.Tensor, rtol: float) -> torch.Tensor:
    """[3] device values: ||x - prev||^2, ||prev||^2, max(|x - prev| - rtol*|prev|); then prev := x.

    Chunked like reduce_on_device (cache-sized chunks and reused scratch buffers on CPU), so
    that each chunk is read from memory once; no host sync.
    """
    ct = _compute_dtype(x.dtype)
    dev = x.device
    flat, pflat = x.reshape(-1), prev.view(-1)
    n = flat.numel()
    chunk = min(stats_torch.CHUNK, DELTA_CPU_CHUNK) if on_host(dev) else stats_torch.CHUNK
    parts: list[torch.Tensor] = []
    for start in range(0, n, chunk):
        c, p = flat[start : start + chunk], pflat[start : start + chunk]
        m = c.numel()
        cf, pf = (c, p) if c.dtype == ct else (c.to(ct), p.to(ct))
        w, w2 = _scratch(2, m, ct, dev), _scratch(3, m, ct, dev)
        torch.sub(cf, pf, out=w)
        parts += (torch.dot(w, w), torch.dot(pf, pf))
        w.abs_()
        torch.abs(pf, out=w2)
        parts.append(torch.add(w, w2, alpha=-rtol, out=w).amax())
        p.copy_(c)
    v = torch.stack(parts)
    if len(parts) > 3:
        v = v.view(-1, 3)
        v = torch.stack([v[:, 0].sum(), v[:, 1].sum(), v[:, 2].amax()])
    return v


def _delta_group(xs: list[torch.Tensor], prevs: list[torch.Tensor], rtol: float) -> torch.Tensor:
    """[k, 3] rows of _delta's values for k tensors of one device, with multi-tensor kernels."""
    ct = _compute_dtype(xs[0].dtype)
    cs = [x.reshape(-1) if x.dtype == ct else x.reshape(-1).to(ct) for x in xs]
    ps = [p.view(-1) if p.dtype == ct else p.view(-1).to(ct) for p in prevs]
    d = torch._foreach_sub(cs, ps)
    upd = torch.stack(torch._foreach_norm(d))
    prev = torch.stack(torch._foreach_norm(ps))
    torch._foreach_abs_(d)
    torch._foreach_add_(d, torch._foreach_abs(ps), alpha=-rtol)
    excess = torch.stack(torch._foreach_max(d))
    torch._foreach_copy_(prevs, xs)
    return torch.stack([upd.square(), prev.square(), excess.to(upd.dtype)], dim=1)


class DeltaTracker:
    """Device copies of tracked tensors at their previous saved step, to report how they changed.

    Memory: one copy of every tracked tensor, on its own device and in its own dtype. The
    change is computed on the device and rides along in the step's one host transfer.
    """

    def __init__(self, rtol: float, atol: float) -> None:
        self.rtol = float(rtol)
        self.atol = float(atol)
        self._prev: dict[Hashable, tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._prev)

    def clear(self) -> None:
        """Drop every copy (e.g. when the hook attaches to another model)."""
        self._prev.clear()

    def track(
        self,
        step: int,
        keys: Sequence[Hashable],
        tensors: Sequence[torch.Tensor],
        stats: Sequence[DeviceStats],
    ) -> None:
        """Set `stats[i].delta` against the copy from an earlier step and keep a copy of this one.

        A tensor seen for the first time, or whose shape, dtype or device changed, or a step that
        is not later than the copy's, gets no delta (its copy is refreshed).
        """
        groups: dict[
            tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, torch.Tensor, DeviceStats]]
        ] = {}
        # CPU float32 tensors: one numba call for all (one pass each instead of nine torch ops)
        fused: list[tuple[torch.Tensor, torch.Tensor, DeviceStats]] | None = (
            [] if any(_kernel_takes(t) for t in tensors) and stats_numba.enabled() else None
        )
        with torch.no_grad():
            for key, t, s in zip(keys, tensors, stats, strict=True):
                x = t.detach()
                if x.numel() == 0 or x.is_complex():
                    continue
                got = self._prev.get(key)
                if (
                    got is None
                    or got[0] >= step
                    or got[1].shape != x.shape
                    or got[1].dtype != x.dtype
                    or got[1].device != x.device
                ):
                    with torch.inference_mode(False):
                        buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
                    buf.copy_(x)
                    self._prev[key] = (step, buf)
                    continue
                s.delta_step = got[0]
                s.delta_atol = self.atol
                self._prev[key] = (step, got[1])
                if fused is not None and _kernel_takes(x):
                    fused.append((x, got[1], s))
                elif on_host(x.device) or x.numel() > DELTA_GROUP:
                    s.delta = _delta(x, got[1], self.rtol)
                else:
                    groups.setdefault((x.device, x.dtype), []).append((x, got[1], s))
            if fused:
                rows = stats_numba.deltas_at(
                    [x.data_ptr() for x, _, _ in fused],
                    [p.data_ptr() for _, p, _ in fused],
                    [x.numel() for x, _, _ in fused],
                    self.rtol,
                )
                for r, (_, _, s) in zip(torch.from_numpy(rows), fused, strict=True):
                    s.delta = r
            for items in groups.values():
                start = 0
                while start < len(items):
                    # groups of at most DELTA_GROUP elements bound the temporaries
                    end, size = start, 0
                    while end < len(items) and (end == start or size + items[end][0].numel() <= DELTA_GROUP):
                        size += items[end][0].numel()
                        end += 1
                    part = items[start:end]
                    rows = _delta_group([x for x, _, _ in part], [p for _, p, _ in part], self.rtol)
                    for r, (_, _, s) in enumerate(part):
                        s.delta = rows[r]
                    start = end
