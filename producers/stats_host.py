"""Handing the device reductions to the host: one copy per device, then wire columns.

Why a module of its own: what `stats_torch` queues on a device is useless until it reaches the
host, and how it gets there decides what a saved step costs the training thread:

1. `transfer(stats, extras)` stacks every scalar of one device (shifts, activity counts and
   scalars such as the loss ride along) and copies it with ONE `.cpu()` per device, so nobody
   calls `.item()`; chunks are combined on the host in float64.
2. NaN/inf are detected on the host from a non-finite sum, sum of squares, min, max or sum|x|.
   Only for those tensors a second pass computes exact nan/inf counts, or rescaled moments
   when the values were finite but their float32 sums overflowed, or so tiny (see
   `statistics.FLOAT32_TINY`) that their float32 squares underflowed. That pass costs a second
   device sync, and only when something is already wrong with the training run.
3. `HostStats.finish()` turns the raw host numbers into wire columns in float64 (numpy); the
   publisher runs it on its background thread.

With the numba kernels, CPU float32 tensors skip all of this: `stats_fused.reduce_host_fused`
reduces a whole job in one kernel call, which also computes the wire columns (so `finish()` has
nothing left to do), handing the rare tensor with a non-finite value or cancelling plain sums
back to the path above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tensorpulse.statistics import FLOAT32_TINY

from . import stats_torch
from .stats_numpy import Columns
from .stats_torch import _NA, _R2, _R6, _W, MAX_PLAIN_RATIO, DeviceStats, _compute_dtype, reduce_on_device


@dataclass(slots=True)
class HostStats:
    """Raw host copies of the device reductions of K tensors; `finish()` gives wire columns."""

    n: np.ndarray  # int64 [K]
    raw: np.ndarray  # float64 [K, 6]: x0, S, SS, min, max, sum|x|
    nonzero: np.ndarray  # int64 [K]: elements that are neither 0 nor NaN
    nan: np.ndarray  # int64 [K]
    inf: np.ndarray  # int64 [K]
    #: i -> (scale, y0, S, SS, sum|y|) of y = x / scale, for finite tensors whose sums overflowed.
    rescaled: dict[int, tuple[float, ...]] = field(default_factory=dict)
    activity: dict[int, tuple[int, ...]] = field(default_factory=dict)
    quantiles: dict[int, tuple[float, float]] = field(default_factory=dict)
    #: i -> (prev_step, ||w - w_prev||, ||w_prev||, allclose excess, None for a sketched delta)
    deltas: dict[int, tuple[int, float, float, float | None]] = field(default_factory=dict)
    #: Host copies (float64) of the `vectors` passed to `transfer`, in order.
    vectors: list[np.ndarray] = field(default_factory=list)
    #: The wire columns when whoever made these already computed them (`reduce_host_fused`).
    finished: Columns | None = None

    def __len__(self) -> int:
        return len(self.n)

    def finish(self) -> Columns:
        """Mean, std, min, max, abs_mean (float64), zeros, nan, inf, as numpy's IEEE semantics give.

        Runs on the publisher thread, which competes with training for the GIL: a fixed number of
        vectorised numpy calls, Python loops only over rescaled or non-finite rows (rare).
        """
        if self.finished is not None:
            return self.finished
        k = len(self.n)
        raw = self.raw
        floats = np.empty((k, 5), dtype=np.float64)
        nn = np.maximum(self.n, 1)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            m = raw[:, 1] / nn
            np.add(raw[:, 0], m, out=floats[:, 0])
            var = raw[:, 2] / nn
            var -= m * m
            np.sqrt(np.maximum(var, 0.0, out=var), out=floats[:, 1])
            floats[:, 2:4] = raw[:, 3:5]
            np.divide(raw[:, 5], nn, out=floats[:, 4])
            mean, std, mn, mx, abs_mean = floats.T
            for i, (scale, y0, ys, yss, ya) in self.rescaled.items():
                ym = ys / nn[i]
                mean[i] = scale * (y0 + ym)
                std[i] = scale * math.sqrt(max(yss / nn[i] - ym * ym, 0.0))
                abs_mean[i] = scale * (ya / nn[i])
            bad = None
            if self.nan.any() or self.inf.any():
                bad = (self.nan > 0) | (self.inf > 0)
            if not np.isfinite(std).all():
                # Finite values whose float32 sums overflowed and could not be rescaled
                # (activations): report an infinite spread rather than NaN, which would claim a
                # NaN element.
                over = ~np.isfinite(std) if bad is None else ~bad & ~np.isfinite(std)
                std[over] = math.inf
            if bad is not None:
                for i in np.flatnonzero(bad):
                    if self.nan[i]:
                        mean[i] = std[i] = abs_mean[i] = math.nan
                    else:
                        pos, neg = mx[i] == math.inf, mn[i] == -math.inf
                        mean[i] = math.nan if pos and neg else (math.inf if pos else -math.inf)
                        std[i] = math.nan
                        abs_mean[i] = math.inf
        return Columns(
            self.n,
            floats,
            self.n - self.nonzero - self.nan,
            self.nan,
            self.inf,
            dict(self.activity),
            dict(self.quantiles),
            dict(self.deltas),
        )


def _scalar_1d(v: torch.Tensor) -> torch.Tensor:
    v = v.detach()
    return v.reshape(1) if v.dim() == 0 else v.reshape(-1)[:1]


def _copy_to_host(floats: list[torch.Tensor], ints: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """One `.cpu()` for the float and int64 parts of one device; returns (float64, int64) arrays.

    Floats travel as float32 unless one is float64 (the sums of a float64 tensor keep their
    digits: 1e300 values rescaled lost 1e-7 of their mean in float32), and then all as float64.
    """
    nf = sum(int(f.numel()) for f in floats)
    fdt = torch.float64 if any(f.dtype == torch.float64 for f in floats) else torch.float32
    parts = [f.to(fdt) for f in floats]
    if ints:
        parts.append(torch.cat(ints).view(fdt))
    host = torch.cat(parts).cpu().numpy()
    return host[:nf].astype(np.float64), np.frombuffer(host[nf:].tobytes(), dtype=np.int64)


def transfer(
    stats: Sequence[DeviceStats],
    extras: Sequence[torch.Tensor | float] = (),
    *,
    vectors: Sequence[torch.Tensor] = (),
) -> tuple[HostStats, list[float]]:
    """Copy the reductions (and scalar `extras`, e.g. the loss) to the host: one `.cpu()` per device.

    Runs the nan/inf second pass for the (rare) tensors that need it. Returns the host
    statistics and the extras as floats, in order. `vectors` (small 1-d device tensors such as
    label counts) ride along in the same copy and come back, as float64, in `HostStats.vectors`
    (values beyond 2**24 lose precision when a float32 copy carries them).
    """
    k = len(stats)
    n = np.fromiter((s.n for s in stats), dtype=np.int64, count=k)
    raw = np.zeros((k, 6), dtype=np.float64)
    nonzero = np.zeros(k, dtype=np.int64)
    nan = np.zeros(k, dtype=np.int64)
    inf = np.zeros(k, dtype=np.int64)
    activity: dict[int, tuple[int, ...]] = {}
    quantiles: dict[int, tuple[float, float]] = {}
    deltas: dict[int, tuple[int, float, float, float | None]] = {}
    extra_values: list[float] = [math.nan] * len(extras)
    vector_values: list[np.ndarray] = [np.zeros(0)] * len(vectors)

    groups: dict[torch.device, tuple[list[int], list[int], list[int]]] = {}
    for i, s in enumerate(stats):
        if s.n:
            dev = s.device
            g = groups.get(dev)  # type: ignore[arg-type]
            if g is None:
                g = groups[dev] = ([], [], [])  # type: ignore[index]
            g[0].append(i)
    for j, e in enumerate(extras):
        if isinstance(e, torch.Tensor):
            if e.numel():
                groups.setdefault(e.device, ([], [], []))[1].append(j)
        else:
            extra_values[j] = float(e)
    for j, v in enumerate(vectors):
        if v.numel():
            groups.setdefault(v.device, ([], [], []))[2].append(j)

    for idx, ext, vix in groups.values():
        # ONE copy of: section A, the 0-d scalars of every tensor, stacked; section B, 1-d pieces
        # (x0 shifts, row blocks of small tensors, activity counts, extras), concatenated.
        scal: list[torch.Tensor] = []
        vecs: list[torch.Tensor] = []
        nb = 0  # length of section B so far
        rowoff: list[int] = []  # offset of every chunk's [S, SS, min, max, sum|x|, nonzero]
        rowb: list[bool] = []  # ... in section B (else A)
        seg: list[int] = []  # each tensor's first entry in rowoff
        x0_at: list[int] = []  # in section B
        xrow: list[int] = []  # exact_nonfinite tensors: [not-NaN, finite] of every chunk (A)
        xseg: list[int] = []
        exact: list[int] = []  # positions in idx
        quant: list[tuple[int, int]] = []  # (tensor, offset of p5 in A)
        acts: list[tuple[int, int]] = []  # (tensor, offset of its activity counts in B)
        dels: list[tuple[int, int]] = []  # (tensor, offset of its 3 delta values in B)
        plain: list[int] = []  # unshifted sums
        blocks: dict[int, tuple[int, int]] = {}
        for p, i in enumerate(idx):
            s = stats[i]
            seg.append(len(rowoff))
            if s.rows is None:
                a = len(scal)
                scal += s.vals
                end = a + s.chunks * _W
                if s.chunks == 1:
                    rowoff.append(a)
                    rowb.append(False)
                else:
                    rowoff += range(a, end, _W)
                    rowb += [False] * s.chunks
                if s.counted:
                    exact.append(p)
                    xseg.append(len(xrow))
                    xrow += range(end, end + 2 * s.chunks, 2)
                    end += 2 * s.chunks
                if s.quantiles:
                    quant.append((i, end))
                vecs.append(s.x0)  # type: ignore[arg-type]
                x0_at.append(nb)
                nb += 1
            else:
                at = blocks.get(id(s.rows))
                if at is None:
                    r = s.rows
                    vecs += (r.rows.view(-1), r.x0)
                    at = blocks[id(r)] = (nb, nb + r.rows.numel())
                    nb = at[1] + r.x0.numel()
                rowoff.append(at[0] + s.row * _W)
                rowb.append(True)
                x0_at.append(at[1] + s.row)
                if s.quantiles:
                    quant.append((i, len(scal)))
                    scal += s.vals
            if s.activity is not None:
                acts.append((i, nb))
                vecs.append(s.activity)
                nb += _NA
            if s.delta is not None:
                dels.append((i, nb))
                vecs.append(s.delta)
                nb += 3
            if s.check_shift:
                plain.append(i)
        vecs += [_scalar_1d(extras[j]) for j in ext]  # type: ignore[arg-type]
        vecs += [vectors[j].detach().reshape(-1) for j in vix]
        ns = len(scal)
        host = torch.cat([torch.stack(scal), *vecs] if scal else vecs).cpu().numpy().astype(np.float64)

        if idx:
            ia = np.array(idx)
            ro = np.array(rowoff) + ns * np.array(rowb)
            rows = host[ro[:, None] + _R6]  # [chunks, 6]
            if len(ro) > len(idx):  # some tensors came in several chunks: combine them
                sg = np.array(seg)
                mins = np.minimum.reduceat(rows[:, 2], sg)  # NaN propagates, as in amin / amax
                maxs = np.maximum.reduceat(rows[:, 3], sg)
                rows = np.add.reduceat(rows, sg, axis=0)
                rows[:, 2] = mins
                rows[:, 3] = maxs
            raw[ia, 0] = host[np.array(x0_at) + ns]
            raw[ia, 1:] = rows[:, :5]
            nonzero[ia] = rows[:, 5]
            if exact:
                xr = host[np.array(xrow)[:, None] + _R2]
                if len(xrow) > len(exact):
                    xr = np.add.reduceat(xr, np.array(xseg), axis=0)
                ei = ia[exact]
                nan[ei] = n[ei] - xr[:, 0]
                inf[ei] = xr[:, 0] - xr[:, 1]
        for i, q in quant:
            quantiles[i] = (float(host[q]), float(host[q + 1]))
        for i, a in acts:
            activity[i] = (stats[i].units, *(int(v) for v in host[ns + a : ns + a + _NA]))
        for i, d in dels:
            s = stats[i]
            upd, prev, ex = host[ns + d : ns + d + 3]
            excess = float(ex) - s.delta_atol if s.delta_exact else None
            deltas[i] = (s.delta_step, math.sqrt(upd), math.sqrt(prev), excess)
        off = ns + nb
        for j in ext:
            extra_values[j] = float(host[off])
            off += 1
        for j in vix:
            m = vectors[j].numel()
            vector_values[j] = host[off : off + m]
            off += m
        if plain:
            _reshift(stats, raw, n, np.array(plain))

    hs = HostStats(n, raw, nonzero, nan, inf, {}, activity, quantiles, deltas, vector_values)
    _second_pass(stats, hs)
    return hs, extra_values


def _reshift(stats: Sequence[DeviceStats], raw: np.ndarray, n: np.ndarray, idx: np.ndarray) -> None:
    """Shifted S, SS for the (CPU) tensors `idx` whose plain sums lose the variance to cancellation."""
    s, ss = raw[idx, 1], raw[idx, 2]
    nn = n[idx]
    with np.errstate(over="ignore", invalid="ignore"):
        m = s / nn
        # not-finite sums are left to the second pass
        todo = idx[np.isfinite(ss) & np.isfinite(s) & (m * m > MAX_PLAIN_RATIO * (ss / nn - m * m))]
    if not len(todo):
        return
    out = []
    for i in todo:
        x = stats[i].tensor
        flat = x.reshape(-1)  # type: ignore[union-attr]
        ct = _compute_dtype(flat.dtype)
        x0 = flat[:1].to(ct)
        parts = []
        for c in flat.split(stats_torch.CHUNK):
            d = c.to(ct) - x0
            parts += (d.sum(), torch.dot(d, d))
        out.append(torch.stack([x0[0], torch.stack(parts[0::2]).sum(), torch.stack(parts[1::2]).sum()]))
    # CPU tensors: numpy() reads them in place, no device copy.
    vals = torch.stack([v.to(torch.float64) for v in out]).numpy()
    raw[todo, :3] = vals


def _second_pass(stats: Sequence[DeviceStats], host: HostStats) -> None:
    """Exact nan/inf counts, or moments of the values scaled by a power of two near 1 / max|x|, for
    tensors whose first-pass sums were non-finite (a NaN or inf, or finite values whose sums
    overflowed) or whose float32 squares underflowed (see FLOAT32_TINY)."""
    raw = host.raw
    # The common case in two tests: every sum finite, and no tensor whose non-zero elements have a
    # mean |x| below FLOAT32_TINY (a NaN fails both; an all-zero tensor passes: 0 >= 0).
    tiny_sum = FLOAT32_TINY * host.nonzero
    if np.isfinite(raw[:, 1:]).all() and (raw[:, 5] >= tiny_sum).all():
        return
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(raw[:, 1:]).all(axis=1) | ~(raw[:, 5] >= tiny_sum)
    groups: dict[torch.device, list[tuple[int, str, float]]] = {}
    for i in np.flatnonzero(bad):
        s = stats[i]
        if s.tensor is None:
            continue
        mn, mx = raw[i, 3], raw[i, 4]
        if np.isfinite(raw[i, 1:]).all():
            # tiny values: float64 sums did not underflow, nor did the numba rows (stats_numba sums
            # a tiny chunk's squares again in float64; its rows come as float64)
            if _compute_dtype(s.tensor.dtype) == torch.float64 or (
                s.rows is not None and s.rows.rows.dtype == torch.float64
            ):
                continue
            groups.setdefault(s.device, []).append((i, "rescale", max(abs(mn), abs(mx))))
        elif math.isfinite(mn) and math.isfinite(mx):
            # amin/amax propagate NaN and show any inf: all elements are finite, sums overflowed.
            groups.setdefault(s.device, []).append((i, "rescale", max(abs(mn), abs(mx))))
        elif not s.counted:
            groups.setdefault(s.device, []).append((i, "count", 0.0))
    for items in groups.values():
        floats: list[torch.Tensor] = []
        ints: list[torch.Tensor] = []
        for i, what, scale in items:
            flat = stats[i].tensor.reshape(-1)  # type: ignore[union-attr]
            if what == "count":
                ints += [torch.isnan(flat).sum().reshape(1), torch.isinf(flat).sum().reshape(1)]
                ints.append(torch.count_nonzero(flat).reshape(1))  # exact, whatever sign(NaN) gives
            else:
                ct = _compute_dtype(flat.dtype)
                up, up2, _ = _pow2_scale(scale)
                y0 = flat[:1].to(ct, copy=True).mul_(up).mul_(up2)
                rows = []
                for c in flat.split(stats_torch.CHUNK):
                    y = c.to(ct, copy=True).mul_(up).mul_(up2)
                    d = y - y0
                    rows.append(torch.stack([d.sum(), torch.dot(d, d), y.abs().sum()]))
                floats.append(torch.cat([y0, torch.stack(rows).sum(0)]))
        fl, iv = _copy_to_host(floats, ints)
        fo = io = 0
        for i, what, scale in items:
            if what == "count":
                host.nan[i], host.inf[i] = iv[io], iv[io + 1]
                host.nonzero[i] = iv[io + 2] - iv[io]  # count_nonzero counts NaN as non-zero
                io += 3
            else:
                y0, ys, yss, ya = fl[fo : fo + 4]
                host.rescaled[i] = (_pow2_scale(scale)[2], float(y0), float(ys), float(yss), float(ya))
                fo += 4


def _pow2_scale(maxabs: float) -> tuple[float, float, float]:
    """(up, up2, scale): y = x * up * up2 puts max|x| in [0.5, 1), and x = y * scale, exactly.

    Powers of two, so scaling rounds nothing; two factors, so that each is a normal float32 even
    for a subnormal max|x| (2**149 overflows float32, and so would 1 / max|x| there).
    """
    e = math.frexp(maxabs)[1]
    half = -e // 2
    return 2.0**half, 2.0 ** (-e - half), 2.0**e


def torch_stats(
    tensors: Sequence[torch.Tensor],
    *,
    activity: Sequence[bool] | None = None,
    quantiles: Sequence[bool] | None = None,
) -> Columns:
    """Statistics of `tensors` with one device->host copy per device (convenience for tests and tools)."""
    stats = [
        reduce_on_device(
            t,
            activity=bool(activity and activity[i]),
            quantiles=bool(quantiles and quantiles[i]),
        )
        for i, t in enumerate(tensors)
    ]
    host, _ = transfer(stats)
    return host.finish()
