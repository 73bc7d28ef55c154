"""Tensor statistics computed on the tensor's own device, with one device->host copy per step.

Why this shape: the training step must not wait for the host more than once, and the cheap
torch reductions on CPU and GPU are plain sums, dots and amin/amax over float tensors (std_mean,
count_nonzero, isnan().sum() and other bool reductions are several times slower on CPU, see
shared/bench). So:

1. `reduce_on_device(t)` queues a handful of reductions per tensor and keeps only tiny device
   tensors: [x0, sum(x - x0), sum((x - x0)^2), min, max, sum|x|] in float32 plus int64 counts
   (non-zero count as a float sum of |sign(x)|, activity histogram). Shifting by the first element x0 keeps the variance
   free of catastrophic cancellation; a constant tensor gives std exactly 0.
2. `transfer(stats, extras)` concatenates everything of one device (int64 counts travel as
   their float32 bit pattern) and copies it with ONE `.cpu()` per device; scalars such as the
   loss ride along, so nobody calls `.item()`.
3. NaN/inf are detected on the host from a non-finite sum, sum of squares, min, max or sum|x|.
   Only for those tensors a second pass computes exact nan/inf counts, or rescaled moments
   when the values were finite but their float32 sums overflowed. That pass costs a second
   device sync, and only when something is already wrong with the training run.
4. `HostStats.finish()` turns the raw host numbers into wire columns in float64 (numpy); the
   publisher runs it on its background thread.

Activation outputs are reduced inside forward hooks and the activation itself is not kept, so
there is no tensor left for a second pass: for them (`exact_nonfinite=True`) the nan/inf
counts are computed up front with float indicator sums, at the price of two extra cheap passes.
Values that are finite but overflow float32 sums (|x| > ~1e19) are not rescaled for them: their
mean / std / abs_mean may then read inf (never NaN, which would claim a NaN element).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tensorpulse.wire import ACTIVITY_EDGES

from .stats_numpy import Columns, activity_thresholds

#: Tensors larger than this are reduced in chunks, bounding the temporaries to 16 MiB (float32).
CHUNK = 1 << 22
#: Quantiles are estimated from a strided subsample of at most this many elements.
MAX_QUANTILE_SAMPLES = 16384
#: Float32 counts are exact up to 2**24; beyond that per-unit activity counts use int64.
_EXACT_F32 = 1 << 24
_NA = len(ACTIVITY_EDGES)
_HALF = (torch.float16, torch.bfloat16)


@dataclass(slots=True, eq=False)
class DeviceStats:
    """The per-tensor reductions still on the device (a few scalars), waiting for `transfer`."""

    n: int
    floats: torch.Tensor | None = None  # float32 [6]: x0, S, SS, min, max, sum|x|
    counts: torch.Tensor | None = None  # int64: nonzero (not 0, not NaN)[, nan, inf][, activity x5]
    quant: torch.Tensor | None = None  # float32 [2]: p5, p95
    units: int = 0  # > 0 when activity was computed
    exact_nonfinite: bool = False
    #: The source tensor, kept only for the rare second pass (None for activations).
    tensor: torch.Tensor | None = None

    @property
    def device(self) -> torch.device | None:
        return None if self.floats is None else self.floats.device


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

    def __len__(self) -> int:
        return len(self.n)

    def finish(self) -> Columns:
        """Mean, std, min, max, abs_mean (float64), zeros, nan, inf, as numpy's IEEE semantics give."""
        k = len(self.n)
        n = self.n.astype(np.float64)
        nn = np.maximum(n, 1.0)
        x0, s, ss, mn, mx, a = (self.raw[:, j] for j in range(6))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            m = s / nn
            mean = x0 + m
            std = np.sqrt(np.maximum(ss / nn - m * m, 0.0))
            abs_mean = a / nn
            for i, (scale, y0, ys, yss, ya) in self.rescaled.items():
                ym = ys / nn[i]
                mean[i] = scale * (y0 + ym)
                std[i] = scale * math.sqrt(max(yss / nn[i] - ym * ym, 0.0))
                abs_mean[i] = scale * (ya / nn[i])
            # Finite values whose float32 sums overflowed and could not be rescaled (activations):
            # report an infinite spread rather than NaN, which would claim a NaN element.
            overflow = (self.nan == 0) & (self.inf == 0) & ~np.isfinite(std)
            std[overflow] = math.inf
            for i in np.flatnonzero((self.nan > 0) | (self.inf > 0)):
                if self.nan[i]:
                    mean[i] = std[i] = abs_mean[i] = math.nan
                else:
                    pos, neg = mx[i] == math.inf, mn[i] == -math.inf
                    mean[i] = math.nan if pos and neg else (math.inf if pos else -math.inf)
                    std[i] = math.nan
                    abs_mean[i] = math.inf
        floats = np.stack([mean, std, mn, mx, abs_mean], axis=1) if k else np.zeros((0, 5))
        return Columns(
            self.n.astype(np.int64),
            floats,
            (self.n - self.nonzero - self.nan).astype(np.int64),
            self.nan.astype(np.int64),
            self.inf.astype(np.int64),
            dict(self.activity),
            dict(self.quantiles),
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32  # integers, bool, half, bfloat16, float8: accumulate in float32


class _DeviceConstants:
    """Small constant tensors per device, created once (an H2D copy would otherwise sync)."""

    def __init__(self, max_entries: int = 256) -> None:
        self._d: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self.max_entries = max_entries

    def get(self, key: tuple[Any, ...], values: Sequence[float], device: torch.device, dtype: torch.dtype):
        full = (str(device), dtype, *key)
        t = self._d.get(full)
        if t is None:
            t = torch.tensor(list(values), dtype=dtype, device=device)
            self._d[full] = t
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(full)
        return t


_CONSTANTS = _DeviceConstants()


def _moments(flat: torch.Tensor, ct: torch.dtype, x0: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """[S, SS, min, max, sum|x|, nonzero(, nonfinite, nan)] of one chunk as one small device tensor.

    Counts are float sums of 0/1 indicators (exact per chunk: CHUNK < 2**24). Indicators are
    built with float ops, several times faster on CPU than count_nonzero or isnan().sum() on
    real data; nan_to_num_ maps NaN to 0 wherever an op (sign) might return NaN for NaN.
    """
    xf = flat.to(ct)
    d = xf - x0
    s, ss = d.sum(), torch.dot(d, d)
    del d
    a = xf.abs()
    out = [s, ss, xf.amin(), xf.amax(), a.sum(), a.sign_().nan_to_num_(nan=0.0).sum()]
    del a
    if exact:
        out.append((xf * 0).nan_to_num_(nan=1.0).sum())  # 0 for finite, NaN for inf and NaN
        out.append(xf.clamp(-1, 1).mul_(0).nan_to_num_(nan=1.0).sum())  # clamp keeps only NaN non-finite
    return torch.stack(out)


def _activity_counts(x: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """int64 [5]: number of units (dim 1) active (> 0) in fewer than each edge of the samples."""
    units = x.shape[1]
    samples = x.numel() // units
    dims = [0, *range(2, x.ndim)]
    if samples <= _EXACT_F32:
        # clamp + sign is a fast indicator of x > 0 (nan_to_num_: NaN is not > 0, whatever
        # sign(NaN) gives on a device); float32 sums of 0/1 are exact below 2**24.
        cdt = torch.float32 if ct != torch.float64 else ct
        active = x.to(cdt).clamp(min=0).sign_().nan_to_num_(nan=0.0).sum(dim=dims)
    else:
        cdt = torch.int64
        active = (x > 0).sum(dim=dims)
    thr = _CONSTANTS.get(("act", samples), activity_thresholds(samples), x.device, cdt)
    return (active.unsqueeze(1) < thr.unsqueeze(0)).sum(dim=0)


def reduce_on_device(
    t: torch.Tensor,
    *,
    activity: bool = False,
    quantiles: bool = False,
    exact_nonfinite: bool = False,
    keep_tensor: bool | None = None,
) -> DeviceStats:
    """Queue the reductions of one tensor on its device; nothing is copied to the host.

    `activity`: per-unit activity (unit = dim 1, ndim >= 2) reduced to ACTIVITY_EDGES counts.
    `quantiles`: approximate (p5, p95): nearest-rank quantiles of a strided subsample of
    <= MAX_QUANTILE_SAMPLES elements (real values, so huge tensors cannot overflow them).
    `exact_nonfinite`: count nan/inf now (for tensors that will not exist at transfer time).
    `keep_tensor`: keep a reference for the second pass (default: unless exact_nonfinite).
    """
    x = t.detach()
    if x.is_complex():
        raise TypeError(f"complex tensors are not supported ({x.dtype})")
    n = x.numel()
    if n == 0:
        return DeviceStats(n=0)
    ct = _compute_dtype(x.dtype)
    flat = x.reshape(-1)
    x0 = flat[:1].to(ct)
    if n <= CHUNK:
        m = _moments(flat, ct, x0, exact_nonfinite)
        ints = m[5:].to(torch.int64)
    else:
        parts = torch.stack([_moments(c, ct, x0, exact_nonfinite) for c in flat.split(CHUNK)])
        m = torch.stack(
            [parts[:, 0].sum(), parts[:, 1].sum(), parts[:, 2].amin(), parts[:, 3].amax(), parts[:, 4].sum()]
        )
        ints = parts[:, 5:].to(torch.int64).sum(dim=0)
    floats = torch.cat([x0, m[:5]]).to(torch.float32)
    if exact_nonfinite:  # [nonzero, nonfinite, nan] -> [nonzero, nan, inf]
        ints = torch.stack([ints[0], ints[2], ints[1] - ints[2]])
    counts = [ints]
    units = 0
    if activity and x.ndim >= 2 and x.shape[1] > 0:
        units = x.shape[1]
        counts.append(_activity_counts(x, ct))
    quant = None
    if quantiles:
        step = -(-n // MAX_QUANTILE_SAMPLES)
        qdt = torch.float64 if ct == torch.float64 else torch.float32
        sub = flat[::step].to(qdt)
        q = _CONSTANTS.get(("q",), (0.05, 0.95), x.device, qdt)
        quant = torch.quantile(sub, q, interpolation="nearest").to(torch.float32)
    keep = (not exact_nonfinite) if keep_tensor is None else keep_tensor
    return DeviceStats(
        n=n,
        floats=floats,
        counts=torch.cat(counts).to(torch.int64),
        quant=quant,
        units=units,
        exact_nonfinite=exact_nonfinite,
        tensor=x if keep else None,
    )


def _scalar_f32(v: torch.Tensor) -> torch.Tensor:
    return v.detach().reshape(-1)[:1].to(torch.float32)


def _copy_to_host(floats: list[torch.Tensor], ints: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """One `.cpu()` for float32 and int64 parts of one device; returns (float32, int64) arrays."""
    nf = sum(int(f.numel()) for f in floats)
    parts = list(floats)
    if ints:
        parts.append(torch.cat(ints).view(torch.float32))
    host = torch.cat(parts).cpu().numpy()
    return host[:nf].astype(np.float64), np.frombuffer(host[nf:].tobytes(), dtype=np.int64)


def transfer(
    stats: Sequence[DeviceStats], extras: Sequence[torch.Tensor | float] = ()
) -> tuple[HostStats, list[float]]:
    """Copy the reductions (and scalar `extras`, e.g. the loss) to the host: one `.cpu()` per device.

    Runs the nan/inf second pass for the (rare) tensors that need it. Returns the host
    statistics and the extras as floats, in order.
    """
    k = len(stats)
    n = np.array([s.n for s in stats], dtype=np.int64)
    raw = np.zeros((k, 6), dtype=np.float64)
    nonzero = np.zeros(k, dtype=np.int64)
    nan = np.zeros(k, dtype=np.int64)
    inf = np.zeros(k, dtype=np.int64)
    activity: dict[int, tuple[int, ...]] = {}
    quantiles: dict[int, tuple[float, float]] = {}
    extra_values: list[float] = [math.nan] * len(extras)

    groups: dict[torch.device, tuple[list[int], list[int]]] = {}
    for i, s in enumerate(stats):
        if s.floats is not None:
            groups.setdefault(s.device, ([], []))[0].append(i)
    for j, e in enumerate(extras):
        if isinstance(e, torch.Tensor):
            groups.setdefault(e.device, ([], []))[1].append(j)
        else:
            extra_values[j] = float(e)

    for idx, ext in groups.values():
        floats = [stats[i].floats for i in idx]
        quant = [stats[i].quant for i in idx if stats[i].quant is not None]
        scal = [_scalar_f32(extras[j]) for j in ext]  # type: ignore[arg-type]
        fl, ints = _copy_to_host(floats + quant + scal, [stats[i].counts for i in idx])
        raw[idx] = fl[: 6 * len(idx)].reshape(-1, 6)
        off = 6 * len(idx)
        for i in idx:
            if stats[i].quant is not None:
                quantiles[i] = (float(fl[off]), float(fl[off + 1]))
                off += 2
        for j in ext:
            extra_values[j] = float(fl[off])
            off += 1
        c = 0
        for i in idx:
            s = stats[i]
            nonzero[i] = ints[c]
            c += 1
            if s.exact_nonfinite:
                nan[i], inf[i] = ints[c], ints[c + 1]
                c += 2
            if s.units:
                activity[i] = (s.units, *(int(v) for v in ints[c : c + _NA]))
                c += _NA

    host = HostStats(n, raw, nonzero, nan, inf, {}, activity, quantiles)
    _second_pass(stats, host)
    return host, extra_values


def _second_pass(stats: Sequence[DeviceStats], host: HostStats) -> None:
    """Exact nan/inf counts or rescaled moments for tensors whose first-pass sums were non-finite."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(host.raw[:, 1:]).all(axis=1)
    todo = [i for i in np.flatnonzero(bad) if stats[i].tensor is not None and not stats[i].exact_nonfinite]
    if not todo:
        return
    groups: dict[torch.device, list[tuple[int, str, float]]] = {}
    for i in todo:
        mn, mx = host.raw[i, 3], host.raw[i, 4]
        if math.isfinite(mn) and math.isfinite(mx):
            # amin/amax propagate NaN and show any inf: all elements are finite, sums overflowed.
            groups.setdefault(stats[i].device, []).append((i, "rescale", max(abs(mn), abs(mx))))
        else:
            groups.setdefault(stats[i].device, []).append((i, "count", 0.0))
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
                y0 = flat[:1].to(ct) / scale
                parts = torch.stack([_moments(c.to(ct) / scale, ct, y0) for c in flat.split(CHUNK)])
                floats.append(
                    torch.cat(
                        [y0, parts[:, 0].sum(0, True), parts[:, 1].sum(0, True), parts[:, 4].sum(0, True)]
                    ).float()
                )
        fl, iv = _copy_to_host(floats, ints)
        fo = io = 0
        for i, what, scale in items:
            if what == "count":
                host.nan[i], host.inf[i] = iv[io], iv[io + 1]
                host.nonzero[i] = iv[io + 2] - iv[io]  # count_nonzero counts NaN as non-zero
                io += 3
            else:
                y0, ys, yss, ya = fl[fo : fo + 4]
                host.rescaled[i] = (scale, float(y0), float(ys), float(yss), float(ya))
                fo += 4


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
