"""Tensor statistics computed on the tensor's own device, with one device->host copy per step.

Why this shape: the training step must not wait for the host more than once, and the cheap
torch reductions on CPU and GPU are plain sums, dots and amin/amax over float tensors (std_mean,
count_nonzero, isnan().sum() and other bool reductions are several times slower on CPU, see
shared/bench). So:

1. `reduce_on_device(t)` queues a few reductions per chunk of a tensor and keeps only 0-d
   device scalars: S = sum(x - x0), SS = sum((x - x0)^2), min, max, sum|x| = x . sign(x) and the
   non-zero count sign(x) . sign(x). On a GPU x0 is the first element: shifting by it keeps the
   variance free of catastrophic cancellation and gives a constant tensor std exactly 0. On CPU
   (synchronous: reading a result costs no device sync) x0 = 0, which saves a write pass; the
   plain sums are checked on the host and the shifted ones recomputed for the few tensors whose
   mean dwarfs their spread (MAX_PLAIN_RATIO). Temporaries go to one reused scratch buffer per
   thread on CPU, where fresh large temporaries cost page faults on every step, and chunks are
   cache-sized there. Counts are float sums of 0/1 values, exact per chunk (< 2**24 elements).
   `reduce_many` reduces small tensors together, as the rows of one padded matrix.
2. `transfer(stats, extras)` stacks every scalar of one device (shifts, activity counts and
   scalars such as the loss ride along) and copies it with ONE `.cpu()` per device, so nobody
   calls `.item()`; chunks are combined on the host in float64.
3. NaN/inf are detected on the host from a non-finite sum, sum of squares, min, max or sum|x|.
   Only for those tensors a second pass computes exact nan/inf counts, or rescaled moments
   when the values were finite but their float32 sums overflowed. That pass costs a second
   device sync, and only when something is already wrong with the training run.
4. `HostStats.finish()` turns the raw host numbers into wire columns in float64 (numpy); the
   publisher runs it on its background thread.

With the numba kernels (`stats_numba`), CPU float32 tensors skip all of this: `reduce_host_fused`
reduces a whole job in one kernel call, which also computes the wire columns (so `finish()` has
nothing left to do), handing the rare tensor with a non-finite value or cancelling plain sums
back to the path above.

Activation outputs are reduced inside forward hooks and the activation itself is not kept, so
there is no tensor left for a second pass: for them (`exact_nonfinite=True`) the nan/inf
counts are computed up front with float indicator sums (on CPU only when sum|x| is not finite).
Values that are finite but overflow float32 sums (|x| > ~1e19) are not rescaled for them: their
mean / std / abs_mean may then read inf (never NaN, which would claim a NaN element).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tensorpulse.wire import ACTIVITY_EDGES, MAX_CONFUSION_CLASSES, ClassCounts, ImageSums, TokenCounts

from . import stats_numba
from .stats_numpy import (
    Columns,
    _channel_axis,
    activity_thresholds,
    check_channels,
    check_classes,
    check_token_values,
)

#: Tensors larger than this are reduced in chunks, bounding the temporaries to 16 MiB (float32).
CHUNK = 1 << 22
#: On CPU, chunks of this many elements (512 KiB in float32) keep a chunk and the scratch buffer
#: in the L2 cache across the handful of passes; larger chunks run at memory bandwidth.
CPU_CHUNK = 1 << 17
#: Quantiles are estimated from a strided subsample of at most this many elements.
MAX_QUANTILE_SAMPLES = 16384
#: Float32 counts are exact up to 2**24; beyond that per-unit activity counts use int64.
_EXACT_F32 = 1 << 24
_NA = len(ACTIVITY_EDGES)
#: Values per chunk: S, SS, min, max, sum|x|, nonzero.
_W = 6
_R6 = np.arange(6)
_R2 = np.arange(2)
#: Device types whose sign() maps NaN to 0 ((0 < x) - (x < 0)); elsewhere NaN signs are zeroed explicitly.
_SIGN_NAN_IS_ZERO = frozenset({"cpu", "cuda"})
#: Device types whose ops run synchronously on the host: reading a result costs no device sync,
#: so some work is decided on the host right away (tests empty this set to run the device path).
_HOST_DEVICES = frozenset({"cpu"})
#: reduce_many reduces float tensors of at most this many elements together, as matrix rows.
SMALL = 1 << 13
#: Padding allowed beyond half of a row matrix (elements).
ROWS_SLACK = 1 << 12
#: At most this many elements (padding included) in one such matrix: its temporaries (a copy,
#: the differences, the absolute values) stay bounded however many small tensors a model has.
ROWS_MAX = 1 << 20
_ROW_DTYPES = (torch.float32, torch.float64)


@dataclass(slots=True, eq=False)
class DeviceStats:
    """The per-tensor reductions still on the device (0-d scalars), waiting for `transfer`."""

    n: int
    #: 0-d device scalars: per chunk [S, SS, min, max, sum|x|, nonzero] around x0, then [not-NaN,
    #: finite] per chunk if counted, then (p5, p95) if quantiles.
    vals: list[torch.Tensor] = field(default_factory=list)
    #: [1] the shift x0 (the first element in the compute dtype); None for an empty tensor.
    x0: torch.Tensor | None = None
    chunks: int = 0
    #: For small tensors reduced together by `reduce_many`: the shared rows and this tensor's row.
    rows: _Rows | None = None
    row: int = 0
    activity: torch.Tensor | None = None  # [5] units below each activity edge
    units: int = 0  # > 0 when activity was computed
    quantiles: bool = False
    exact_nonfinite: bool = False
    #: The vals hold [not-NaN, finite] counts per chunk after the chunk rows.
    counted: bool = False
    #: S and SS are plain sums of a kept CPU tensor: `transfer` checks them for cancellation.
    check_shift: bool = False
    #: The source tensor, kept only for the rare second pass (None for activations).
    tensor: torch.Tensor | None = None
    #: [3] device values (||w - w_prev||^2, ||w_prev||^2, max(|w - w_prev| - rtol*|w_prev|)) from a
    #: DeltaTracker, the step of w_prev and the atol still to subtract from the last one.
    delta: torch.Tensor | None = None
    delta_step: int = 0
    delta_atol: float = 0.0
    #: False: `delta` is a sketch's estimate (producers/sketch.py): its third value is unused and
    #: the host gets no allclose excess.
    delta_exact: bool = True

    @property
    def device(self) -> torch.device | None:
        if self.rows is not None:
            return self.rows.x0.device
        return None if self.x0 is None else self.x0.device


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
        full = (device, dtype, *key)
        t = self._d.get(full)
        if t is None:
            with torch.inference_mode(False):
                t = torch.tensor(list(values), dtype=dtype, device=device)
            self._d[full] = t
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)
        else:
            with contextlib.suppress(KeyError):  # evicted meanwhile by another thread
                self._d.move_to_end(full)
        return t


_CONSTANTS = _DeviceConstants()
_LOCAL = threading.local()


def _scratch(role: int, m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-d work buffer of `m` elements, overwritten by the next call with the same role.

    On CPU a fresh temporary of a few hundred KiB costs page faults on every step (the allocator
    returns it to the OS), so each thread keeps one buffer per (role, dtype), at most a chunk
    long. Elsewhere the caching allocator is cheap and stream-safe: a fresh tensor.
    """
    if device.type not in _HOST_DEVICES:
        return torch.empty(m, dtype=dtype, device=device)
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    buf = bufs.get((role, dtype))
    if buf is None or buf.numel() < m:
        with torch.inference_mode(False):  # usable (out=) inside and outside inference mode
            buf = bufs[(role, dtype)] = torch.empty(m, dtype=dtype)
    return buf[:m]


@functools.lru_cache(maxsize=1024)
def _quantile_ranks(m: int) -> tuple[int, int]:
    """1-based ranks of p5 / p95 among `m` values, as numpy's method="nearest" rounds them."""
    return round((m - 1) * 0.05) + 1, round((m - 1) * 0.95) + 1


@functools.lru_cache(maxsize=1024)
def _thresholds(samples: int) -> tuple[int, ...]:
    return tuple(activity_thresholds(samples))


def _quantiles(flat: torch.Tensor, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-rank (p5, p95) of a strided subsample of <= MAX_QUANTILE_SAMPLES elements, 0-d each.

    Like torch.quantile, a NaN anywhere in the subsample makes both NaN.
    """
    n = flat.numel()
    step = -(-n // MAX_QUANTILE_SAMPLES)
    qdt = torch.float64 if ct == torch.float64 else torch.float32
    sub = flat[::step] if step > 1 else flat
    if sub.dtype != qdt:
        sub = sub.to(qdt)
    if sub.device.type not in _HOST_DEVICES:
        q = _CONSTANTS.get(("q",), (0.05, 0.95), sub.device, qdt)
        return tuple(torch.quantile(sub, q, interpolation="nearest").unbind())  # type: ignore[return-value]
    # On the host: two single-rank partitions (introselect, O(n)) instead of torch.quantile's
    # sort, several times faster; the ranks are numpy's method="nearest".
    a = sub.numpy(force=True)
    if np.isnan(a).any():
        lo = hi = math.nan
    else:
        k5, k95 = _quantile_ranks(a.size)
        part = np.partition(a, k5 - 1)[k5 - 1 :]
        lo = part[0]
        hi = np.partition(part, k95 - k5)[k95 - k5]
    return torch.tensor(float(lo), dtype=qdt), torch.tensor(float(hi), dtype=qdt)


def reduce_on_device(
    t: torch.Tensor,
    *,
    activity: bool = False,
    quantiles: bool = False,
    exact_nonfinite: bool = False,
    keep_tensor: bool | None = None,
    active_range: tuple[float, float] | None = None,
) -> DeviceStats:
    """Queue the reductions of one tensor on its device; nothing is copied to the host.

    `activity`: per-unit activity (unit = dim 1, ndim >= 2) reduced to ACTIVITY_EDGES counts; a
    unit is active in a sample when its value is > 0, or strictly inside `active_range` (lo, hi)
    when given (the non-saturated range of a tanh / sigmoid input).
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
    keep = (not exact_nonfinite) if keep_tensor is None else keep_tensor
    if not quantiles and x.dtype == torch.float32 and x.device.type in _HOST_DEVICES and stats_numba.enabled():
        fused = _reduce_fused_one(x, activity, active_range, keep, exact_nonfinite)
        if fused is not None:
            return fused
    ct = _compute_dtype(x.dtype)
    dev = x.device
    flat = x.reshape(-1)
    cpu = dev.type in _HOST_DEVICES
    # Elsewhere every reduction is queued and copied once: sums shifted by the first element and
    # nan/inf counted up front when the tensor will be gone. On CPU there is no device to wait
    # for: plain sums (no shift pass), checked for cancellation on the host -- at the transfer for
    # kept tensors, here for the others, which also count nan/inf only when sum|x| is not finite.
    check_now = cpu and (exact_nonfinite or not keep)
    shift = not cpu
    # the shift: a copy unless the tensor is kept until the transfer; 0 for plain sums
    x0 = flat[:1].to(ct, copy=not keep) if shift else _CONSTANTS.get(("zero",), (0.0,), dev, ct)
    chunk = CHUNK if not cpu else min(CHUNK, CPU_CHUNK)
    units = x.shape[1] if activity and x.ndim >= 2 and x.shape[1] > 0 else 0
    samples = n // units if units else 0
    fast_activity = 0 < samples <= _EXACT_F32
    if fast_activity:
        # chunks of whole samples (dim 0), so that per-unit sums of chunks add up
        row = n // x.shape[0]
        chunk = max(1, chunk // row) * row
        unit_shape = (-1, *x.shape[1:])
        dims = [0, *range(2, x.ndim)]
    fix_sign = exact_nonfinite and dev.type not in _SIGN_NAN_IS_ZERO
    count_now = exact_nonfinite and not cpu
    vals: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    active = None
    if n <= chunk:
        pieces: Sequence[torch.Tensor] = (flat,)
        m = n
    else:
        pieces = flat.split(chunk)
        m = chunk
    work = _scratch(0, m, ct, dev)
    conv = None if x.dtype == ct else _scratch(1, m, ct, dev)

    def chunks():
        """(chunk in the compute dtype, work buffer of its size) for each chunk."""
        for c in pieces:
            m = c.numel()
            w = work if m == work.numel() else work[:m]
            if conv is None:
                yield c, w
            else:
                xf = conv if m == conv.numel() else conv[:m]
                xf.copy_(c)
                yield xf, w

    for xf, w in chunks():
        if shift:
            # Shifting by x0 keeps the variance free of cancellation; a constant tensor gives SS = 0.
            torch.sub(xf, x0, out=w)
            vals += (w.sum(), torch.dot(w, w), xf.amin(), xf.amax())
        else:
            vals += (xf.sum(), torch.dot(xf, xf), xf.amin(), xf.amax())
        # sign(x) in {-1, 0, 1} (NaN -> 0): x . sign(x) = sum|x|, sign . sign = non-zero count.
        torch.sign(xf, out=w)
        if fix_sign:
            w.nan_to_num_(nan=0.0)
        vals += (torch.dot(xf, w), torch.dot(w, w))
        if fast_activity:
            if active_range is None:
                # clamp(sign, 0) is the indicator of x > 0 (NaN is not > 0); float sums are exact < 2**24.
                w.clamp_(min=0)
            else:
                # lo < x < hi as 0/1 floats (NaN is in no range)
                w2 = _scratch(2, w.numel(), ct, dev)
                torch.gt(xf, active_range[0], out=w)
                w.mul_(torch.lt(xf, active_range[1], out=w2))
            part = w.view(unit_shape).sum(dim=dims)
            active = part if active is None else active.add_(part)
        if count_now:
            counts += _count_nonfinite(xf, w)
    if check_now:
        got = torch.stack(vals).tolist()  # CPU values: no device sync
        if not math.isfinite(math.fsum(got[4::_W])):  # sum|x|: a NaN or inf somewhere
            counts = [v for xf, w in chunks() for v in _count_nonfinite(xf, w)]
        elif _cancels(math.fsum(got[0::_W]), math.fsum(got[1::_W]), n):
            x0 = flat[:1].to(ct, copy=True)
            for j, (xf, w) in enumerate(chunks()):
                torch.sub(xf, x0, out=w)
                vals[j * _W] = w.sum()
                vals[j * _W + 1] = torch.dot(w, w)
    counted = bool(counts)
    vals += counts
    units_counts = None
    if units:
        if active is None:  # more samples per unit than float32 counts exactly
            on = x > 0 if active_range is None else (x > active_range[0]) & (x < active_range[1])
            active = on.sum(dim=[0, *range(2, x.ndim)])
        thr = _CONSTANTS.get(("act", samples), _thresholds(samples), dev, active.dtype)
        units_counts = (active.unsqueeze(1) < thr).sum(dim=0)
    if quantiles:
        vals += _quantiles(flat, ct)
    return DeviceStats(
        n=n,
        vals=vals,
        x0=x0,
        chunks=len(pieces),
        activity=units_counts,
        units=units,
        quantiles=quantiles,
        exact_nonfinite=exact_nonfinite,
        counted=counted,
        check_shift=cpu and not check_now,
        tensor=x if keep else None,
    )


def _reduce_fused_one(
    x: torch.Tensor,
    activity: bool,
    active_range: tuple[float, float] | None,
    keep: bool,
    exact_nonfinite: bool,
) -> DeviceStats | None:
    """`reduce_on_device` of a CPU float32 tensor by the numba kernels; None: use the torch path.

    A tensor that is not kept and whose sums are not finite or lose the variance to cancellation
    (rare) goes to the torch path, which counts nan/inf and shifts there and then.
    """
    n = x.numel()
    arr = np.ascontiguousarray(x.numpy())
    m = stats_numba.moments([arr.reshape(-1)])
    s, ss, a = m[0, 0], m[0, 1], m[0, 4]
    if not keep and not (math.isfinite(s) and math.isfinite(ss) and math.isfinite(a) and not _cancels(s, ss, n)):
        return None
    units = x.shape[1] if activity and x.ndim >= 2 and x.shape[1] > 0 else 0
    counts = None
    if units:
        samples = n // units
        if samples > _EXACT_F32:
            return None
        lo, hi = active_range if active_range is not None else (0.0, math.inf)
        active = stats_numba.active_counts(arr, lo, hi)
        thr = np.asarray(_thresholds(samples))
        counts = torch.from_numpy((active[:, None] < thr[None, :]).sum(0))
    return DeviceStats(
        n=n,
        chunks=1,
        rows=_Rows(torch.from_numpy(m), torch.zeros(1, dtype=torch.float64)),
        row=0,
        activity=counts,
        units=units,
        exact_nonfinite=exact_nonfinite,
        check_shift=keep,
        tensor=x if keep else None,
    )


def _count_nonfinite(xf: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of not-NaN and of finite elements of `xf` (0-d float sums of 0/1; `w`: scratch).

    Comparison ops writing 0/1 floats: several times faster on CPU than isnan().sum() or
    count_nonzero.
    """
    notnan = torch.eq(xf, xf, out=w).sum()
    torch.mul(xf, 0, out=w)  # 0 for finite values, NaN for inf and NaN
    return notnan, torch.eq(w, 0, out=w).sum()


def _cancels(s: float, ss: float, n: int) -> bool:
    """Plain sums s = sum(x), ss = sum(x^2) lose the variance to cancellation (finite sums only)."""
    if not (math.isfinite(s) and math.isfinite(ss)):
        return False  # non-finite values or overflow: handled elsewhere
    m = s / n
    return m * m > MAX_PLAIN_RATIO * (ss / n - m * m)


class _Rows:
    """The reductions of several small tensors computed together: [k, 6] rows and [k] shifts."""

    __slots__ = ("rows", "x0")

    def __init__(self, rows: torch.Tensor, x0: torch.Tensor) -> None:
        self.rows = rows
        self.x0 = x0


class _Layouts:
    """Gather indices and masks that pad k flattened tensors into a [k, L] matrix, per size list."""

    def __init__(self, max_entries: int = 64) -> None:
        self._d: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self.max_entries = max_entries

    def get(self, sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        key = (sizes, device, dtype)
        got = self._d.get(key)
        if got is not None:
            with contextlib.suppress(KeyError):  # evicted meanwhile by another thread
                self._d.move_to_end(key)
            return got
        width = max(sizes)
        col = np.arange(width)
        starts = np.cumsum((0, *sizes[:-1]))
        n = np.array(sizes)[:, None]
        # Padding repeats each row's first element: it shifts to exactly 0 and leaves min and max
        # alone; the mask removes it from sum|x| and the non-zero count.
        index = (starts[:, None] + np.where(col < n, col, 0)).reshape(-1)
        with torch.inference_mode(False):
            got = (
                torch.from_numpy(index).to(device),
                torch.from_numpy(col < n).to(device=device, dtype=dtype),
                width,
            )
        self._d[key] = got
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)
        return got


_LAYOUTS = _Layouts()


def _reduce_rows(xs: list[torch.Tensor]) -> _Rows:
    """[S, SS, min, max, sum|x|, nonzero] of k small float tensors of one device and dtype, as rows."""
    index, mask, width = _LAYOUTS.get(tuple(x.numel() for x in xs), xs[0].device, xs[0].dtype)
    x = torch.cat([t.reshape(-1) for t in xs]).index_select(0, index).view(len(xs), width)
    d = x - x[:, :1]
    s_sum = d.sum(1)
    ss = d.mul_(d).sum(1)
    a = x.abs().mul_(mask)  # the mask drops the padding
    abs_sum = a.sum(1)
    nonzero = a.sign_().sum(1)  # |x| > 0 (sign of NaN is 0; a NaN row goes to the second pass anyway)
    return _Rows(torch.stack([s_sum, ss, x.amin(1), x.amax(1), abs_sum, nonzero], 1), x[:, 0])


def _row_groups(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Group (n, i) pairs into padded matrices that waste at most about half their elements and hold
    at most ROWS_MAX elements each."""
    groups: list[list[int]] = []
    cur: list[int] = []
    width = total = 0
    for n, i in sorted(sizes, reverse=True):
        if cur and ((len(cur) + 1) * width > 2 * (total + n) + ROWS_SLACK or (len(cur) + 1) * width > ROWS_MAX):
            groups.append(cur)
            cur, total = [], 0
        if not cur:
            width = n
        cur.append(i)
        total += n
    if cur:
        groups.append(cur)
    return groups


def _reduce_fused(xs: list[torch.Tensor]) -> _Rows:
    """[S, SS, min, max, sum|x|, nonzero] rows of CPU float32 tensors from the numba kernel.

    One fused, vectorised pass per tensor, run without the GIL (see stats_numba). Its non-zero
    count includes NaN: a tensor with a NaN goes to the second pass, which counts exactly.
    """
    # numpy views, not torch ones: a torch call releases and retakes the GIL, each a chance for a
    # handover with the training thread
    arrays = [x.numpy().reshape(-1) for x in xs]
    rows = torch.from_numpy(stats_numba.moments(arrays))
    return _Rows(rows, torch.zeros(len(xs), dtype=rows.dtype))


def _kernel_takes(t: torch.Tensor) -> bool:
    """The numba kernels read `t` by address: dense, contiguous float32 in CPU memory."""
    return (
        t.dtype is torch.float32
        and t.is_cpu
        and t.layout is torch.strided
        and t.is_contiguous()
        and not t.is_neg()  # a lazily negated view: its memory holds the values un-negated
    )


def reduce_host_fused(
    tensors: Sequence[torch.Tensor], active: Sequence[tuple[float, float] | None] | None = None
) -> HostStats | None:
    """HostStats of CPU float32 tensors from one numba kernel call, or None: use reduce_many /
    transfer then.

    Why: the offloaded hook's background work shares the GIL with training, and `reduce_many` +
    `transfer` cost a few hundred microseconds of Python per step; this is one kernel call (one
    GIL release) that also checks and arranges its results, with arguments allocated once per
    layout of tensors (`_FusedPlan`). The kernel reads the tensors by address: a few attribute
    reads per tensor, no numpy view (Python on a training thread runs on cold caches, where each
    call costs two to three times its cost in a micro-benchmark).

    `active[i]`: (lo, hi) of the per-unit activity of tensor i (unit = dim 1), or None. None is
    returned when the kernel is off, a tensor is empty, not a dense contiguous float32 CPU tensor,
    or a result needs the torch path: a non-finite value (exact nan/inf counts) or plain sums that
    lose the variance to cancellation (MAX_PLAIN_RATIO). The tensors must not change until it
    returns.
    """
    for t in tensors:
        if not _kernel_takes(t):
            return None
    if not stats_numba.enabled():  # after the check above: numba loads only for CPU float32 tensors
        return None
    layout: list[Any] = [t.numel() for t in tensors]
    if 0 in layout:
        return None
    if active is not None:
        for i, rng in enumerate(active):
            t = tensors[i]
            if rng is not None and t.dim() >= 2 and t.shape[1]:
                n, samples, units = layout[i], t.shape[0], t.shape[1]
                if n // units > _EXACT_F32:
                    return None
                layout[i] = (n, samples, units, rng[0], rng[1])
    addrs = [t.data_ptr() for t in tensors]
    key = tuple(layout)
    plans = _plans.__dict__  # per thread: a plan's scratch arrays are reused by every call
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= 64:
            plans.clear()
        plan = plans[key] = _FusedPlan(layout)
    return plan.run(addrs)


_plans = threading.local()


class _FusedPlan:
    """The fused kernel's arguments for one layout of tensors (element counts; shape and range
    of the activations), allocated once: a call then sets the addresses and allocates only its
    results. Used by one thread (see `_plans`)."""

    __slots__ = ("args", "acts", "below_shape", "k", "n", "none", "thr")

    def __init__(self, layout: list[Any]) -> None:
        sizes = [x if isinstance(x, int) else x[0] for x in layout]
        acts = [(i, x) for i, x in enumerate(layout) if not isinstance(x, int)]
        dims = [(samples, units, n // (samples * units), lo, hi) for _, (n, samples, units, lo, hi) in acts]
        self.args = stats_numba.args_at([0] * len(sizes), sizes, dims)
        self.args[4][:] = [i for i, _ in acts]  # act j reads tensor i: no second address
        self.acts = [(i, x[2]) for i, x in acts]  # (tensor, units)
        self.k = len(sizes)
        self.n = np.array(sizes, dtype=np.int64)
        self.n.flags.writeable = False  # shared by every HostStats of this plan
        self.none = np.zeros(self.k, np.int64)  # nan and inf counts: the kernel takes finite sums only
        self.none.flags.writeable = False
        self.thr = np.array([_thresholds(n // units) for _, (n, _, units, _, _) in acts], dtype=np.float64)
        self.thr = self.thr.reshape(len(acts), _NA)
        self.below_shape = (len(acts), _NA)

    def run(self, addrs: list[int]) -> HostStats | None:
        a = self.args
        a[0][:] = addrs
        k = self.k
        raw, nonzero, below = np.empty((k, 6)), np.empty(k, np.int64), np.empty(self.below_shape, np.int64)
        floats, zeros = np.empty((k, 5)), np.empty(k, np.int64)
        if not stats_numba.host_kernel()(*a, self.thr, MAX_PLAIN_RATIO, raw, nonzero, below, floats, zeros):
            return None
        activity = {i: (units, *row) for (i, units), row in zip(self.acts, below.tolist(), strict=True)}
        none = self.none
        cols = Columns(self.n, floats, zeros, none, none, activity, finite=True)
        return HostStats(self.n, raw, nonzero, none, none, {}, activity, finished=cols)


def reduce_many(
    tensors: Sequence[torch.Tensor], *, quantiles: bool | Sequence[bool] = False
) -> list[DeviceStats]:
    """`reduce_on_device` of each tensor (kept for the second pass), with fewer ops per small tensor.

    Float tensors of at most SMALL elements of one device and dtype are reduced together, as the
    rows of one padded matrix: a fixed number of ops for any number of them (per-op overhead, not
    memory traffic, is what small tensors cost). Larger tensors are reduced one by one.
    `quantiles`: for all tensors, or one flag per tensor. CPU float32 tensors go to the fused
    numba kernel when it is installed (`stats_numba`), with or without quantiles.
    """
    qs = [quantiles] * len(tensors) if isinstance(quantiles, bool) else [bool(q) for q in quantiles]
    out: list[DeviceStats | None] = [None] * len(tensors)
    xs: list[torch.Tensor] = []
    small: dict[tuple[torch.device, torch.dtype], list[tuple[int, int]]] = {}
    fused: list[int] = []
    use_fused: bool | None = None  # asked at the first CPU float32 tensor: numba loads only then
    for i, t in enumerate(tensors):
        x = t.detach()
        xs.append(x)
        n = x.numel()
        if n and x.dtype == torch.float32 and x.device.type in _HOST_DEVICES:
            if use_fused is None:
                use_fused = stats_numba.enabled()
            if use_fused:
                fused.append(i)
                continue
        if 0 < n <= SMALL and x.dtype in _ROW_DTYPES:
            small.setdefault((x.device, x.dtype), []).append((n, i))
        else:
            out[i] = reduce_on_device(x, quantiles=qs[i])
    if fused:
        # Quantile steps too: the torch path's passes over a large tensor took long enough, on the
        # background thread, for the next backward to allocate new gradients while the old ones
        # were still held (a peak of up to a model's gradients, `bench/hook_memory.py`); the
        # quantiles come from a small subsample either way.
        rows = _reduce_fused([xs[i] for i in fused])
        for r, i in enumerate(fused):
            out[i] = _row_stats(xs[i], rows, r, qs[i], check_shift=True)
    for sizes in small.values():
        for group in _row_groups(sizes):
            if len(group) == 1:
                i = group[0]
                out[i] = reduce_on_device(xs[i], quantiles=qs[i])
                continue
            rows = _reduce_rows([xs[i] for i in group])
            for r, i in enumerate(group):
                out[i] = _row_stats(xs[i], rows, r, qs[i], check_shift=False)
    return out  # type: ignore[return-value]


def _row_stats(x: torch.Tensor, rows: _Rows, row: int, quantiles: bool, *, check_shift: bool) -> DeviceStats:
    """DeviceStats of tensor `x`, reduced as row `row` of `rows` (its quantiles from a subsample)."""
    return DeviceStats(
        n=x.numel(),
        vals=list(_quantiles(x.reshape(-1), x.dtype)) if quantiles else [],
        chunks=1,
        rows=rows,
        row=row,
        quantiles=quantiles,
        tensor=x,
        check_shift=check_shift,
    )


def _scalar_1d(v: torch.Tensor) -> torch.Tensor:
    v = v.detach()
    return v.reshape(1) if v.dim() == 0 else v.reshape(-1)[:1]


def _copy_to_host(floats: list[torch.Tensor], ints: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """One `.cpu()` for float32 and int64 parts of one device; returns (float64, int64) arrays."""
    nf = sum(int(f.numel()) for f in floats)
    parts = [f.to(torch.float32) for f in floats]
    if ints:
        parts.append(torch.cat(ints).view(torch.float32))
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


#: Plain float32 sums give the variance to about 3e-7 * (1 + mean^2 / var) (relative); beyond
#: this ratio the sums are recomputed around the first element.
MAX_PLAIN_RATIO = 16.0


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
        for c in flat.split(CHUNK):
            d = c.to(ct) - x0
            parts += (d.sum(), torch.dot(d, d))
        out.append(torch.stack([x0[0], torch.stack(parts[0::2]).sum(), torch.stack(parts[1::2]).sum()]))
    # CPU tensors: numpy() reads them in place, no device copy.
    vals = torch.stack([v.to(torch.float64) for v in out]).numpy()
    raw[todo, :3] = vals


def _second_pass(stats: Sequence[DeviceStats], host: HostStats) -> None:
    """Exact nan/inf counts or rescaled moments for tensors whose first-pass sums were non-finite."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(host.raw[:, 1:]).all(axis=1)
    if not bad.any():
        return
    groups: dict[torch.device, list[tuple[int, str, float]]] = {}
    for i in np.flatnonzero(bad):
        if stats[i].tensor is None:
            continue
        mn, mx = host.raw[i, 3], host.raw[i, 4]
        if math.isfinite(mn) and math.isfinite(mx):
            # amin/amax propagate NaN and show any inf: all elements are finite, sums overflowed.
            groups.setdefault(stats[i].device, []).append((i, "rescale", max(abs(mn), abs(mx))))
        elif not stats[i].counted:
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
                rows = []
                for c in flat.split(CHUNK):
                    y = c.to(ct) / scale
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


# ---------------------------------------------------------------------------- weight deltas
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
    chunk = min(CHUNK, DELTA_CPU_CHUNK) if dev.type in _HOST_DEVICES else CHUNK
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
                elif x.device.type in _HOST_DEVICES or x.numel() > DELTA_GROUP:
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


# ---------------------------------------------------------------------------- labels and inputs
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
    if idx.device.type in _HOST_DEVICES:
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
