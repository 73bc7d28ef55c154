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
2. The host side (`stats_host`): `transfer` copies every device's scalars with ONE `.cpu()`,
   runs the rare second pass for non-finite tensors, and `HostStats.finish()` gives wire columns.

The producer's modules by job, for the tensors of a torch model: this one reduces on the
device; `stats_host` hands off to the host; `stats_fused` reduces a whole job of CPU float32
tensors in one numba call (`stats_numba` holds the kernels); `deltas_torch` tracks weight
deltas; `captures_torch` counts labels and summarises inputs.

Activation outputs are reduced inside forward hooks and the activation itself is not kept, so
there is no tensor left for a second pass: for them (`exact_nonfinite=True`) the nan/inf
counts are computed up front with float indicator sums (on CPU only when sum|x| is not finite).
Values that are finite but overflow float32 sums (|x| > ~1e19) are not rescaled for them: their
mean / std / abs_mean may then read inf (never NaN, which would claim a NaN element); nor are
values whose float32 squares underflow (|x| < ~1e-19): their std may read low, down to 0.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tensorpulse.wire import ACTIVITY_EDGES

from . import stats_numba
from .stats_numpy import activity_thresholds

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
#: Plain float32 sums give the variance to about 3e-7 * (1 + mean^2 / var) (relative); beyond
#: this ratio the sums are recomputed around the first element.
MAX_PLAIN_RATIO = 16.0


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


def on_host(device: torch.device) -> bool:
    """Whether ops on `device` run synchronously on the host, so that reading a result costs no
    device sync (`_HOST_DEVICES`; the other modules ask here, so that tests can empty it)."""
    return device.type in _HOST_DEVICES


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
