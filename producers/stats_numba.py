"""One fused pass per CPU tensor for [S, SS, min, max, sum|x|, nonzero], when numba is installed.

Why our own kernel: torch's CPU reductions each make a pass of their own, and the ones for
sum|x| and the non-zero count are slow paths (vector_norm(ord=1) and count_nonzero: 13x and 11x
a plain sum in `bench/hook_profile.py kernels`), so the six statistics cost six or more passes and a dozen calls per tensor.
This loop makes one pass over 64 lanes that LLVM vectorises (reassociation allowed, NaN
semantics kept: no `nnan`), and it runs without the GIL, so a background reduction does not
hold up the training thread. `bench/hook_profile.py kernels` timed it at 85 us for a 401k-element
tensor, against 415 us for the hook's torch path (and, in an earlier run, 118 us for this loop
with 16 lanes). `batch`
reduces all tensors of a job in one call: one GIL release, and no Python per tensor between
kernels. `_delta` does a weight delta in one pass (102 us there, 485 us for the torch pass).

Float32 tensors only (float64 ones keep the torch path). Accuracy: 64 float32 lanes per call of
at most CHUNK elements, combined in float64; the squares of a chunk of tiny values (see
`statistics.FLOAT32_TINY`: float32 squares underflow) are summed again in float64.
NaN: min and max are NaN when any element is, as torch's amin/amax give; the non-zero count
includes NaN (the caller's second pass recounts a tensor whose sum is not finite).

Optional (`pip install tensorpulse[fast]`): without numba, `available()` is False and the torch
path is used.
"""

from __future__ import annotations

import logging
import math
import os
import threading

import numpy as np

from tensorpulse.settings import NUMBA_ENV
from tensorpulse.statistics import FLOAT32_TINY

from . import code_pages

log = logging.getLogger(__name__)

#: Lanes per iteration: independent float32 accumulators, four AVX-512 registers each.
LANES = 64
#: Elements per kernel call: each lane then adds at most 2**16 values in float32 (relative error
#: about 1e-5 at worst, 1e-7 measured on normal data) and counts exactly (< 2**24).
CHUNK = 1 << 22
#: Columns per tensor: S, SS, min, max, sum|x|, non-zero count (NaN included).
WIDTH = 6

_kernel = None
_failed = False
_lock = threading.Lock()


def _moments(x, out):  # pragma: no cover - run compiled by numba
    """Writes S, SS, min, max, sum|x|, non-zero count (NaN included) of float32 `x` into `out`.

    Written so that LLVM vectorises it (measured: a second loop level, a NaN lane or a dtype
    taken from `x` each made it 5x slower): fixed float32 lanes, one flat loop.
    """
    n = x.size
    s = np.zeros(LANES, np.float32)
    ss = np.zeros(LANES, np.float32)
    a = np.zeros(LANES, np.float32)
    nz = np.zeros(LANES, np.float32)
    mn = np.full(LANES, np.inf, np.float32)
    mx = np.full(LANES, -np.inf, np.float32)
    m = n - n % LANES
    for i in range(0, m, LANES):
        for j in range(LANES):
            v = x[i + j]
            s[j] += v
            ss[j] += v * v
            a[j] += abs(v)
            nz[j] += np.float32(1.0) if v != 0 else np.float32(0.0)
            mn[j] = v if v < mn[j] else mn[j]
            mx[j] = v if v > mx[j] else mx[j]
    ts = 0.0
    tss = 0.0
    ta = 0.0
    tnz = 0.0
    lo = np.inf
    hi = -np.inf
    for j in range(LANES):
        ts += s[j]
        tss += ss[j]
        ta += a[j]
        tnz += nz[j]
        lo = min(lo, np.float64(mn[j]))
        hi = max(hi, np.float64(mx[j]))
    for i in range(m, n):
        v = np.float64(x[i])
        ts += v
        tss += v * v
        ta += abs(v)
        tnz += 1.0 if v != 0.0 else 0.0
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    if ta < FLOAT32_TINY * tnz:  # the non-zero elements' mean |x| (False for NaN and all-zero)
        # Squares of values this small are subnormal or 0 in float32 lanes: sum them again in
        # float64 (rare: only tensors of tiny values; the comparison is all others pay).
        tss = 0.0
        for i in range(n):
            v = np.float64(x[i])
            tss += v * v
    if ts != ts:  # NaN, or +inf and -inf: look for a NaN (rare, and the run is in trouble)
        for i in range(n):
            if x[i] != x[i]:
                lo = np.nan
                hi = np.nan
                break
    out[0] = ts
    out[1] = tss
    out[2] = lo
    out[3] = hi
    out[4] = ta
    out[5] = tnz


def _active_rows(x, lo, hi, counts):  # pragma: no cover - run compiled by numba
    """counts[u] += number of rows of 2-d `x` [samples, units] with lo < x[., u] < hi."""
    for i in range(x.shape[0]):
        for u in range(x.shape[1]):
            v = x[i, u]
            counts[u] += np.float32(1.0) if (v > lo and v < hi) else np.float32(0.0)


def _active_planes(x, lo, hi, counts):  # pragma: no cover - run compiled by numba
    """counts[c] += number of elements of 3-d `x` [samples, units, rest] with lo < x[., c, .] < hi."""
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            acc = np.float32(0.0)
            for r in range(x.shape[2]):
                v = x[i, c, r]
                acc += np.float32(1.0) if (v > lo and v < hi) else np.float32(0.0)
            counts[c] += acc


def _delta(x, p, rtol, out):  # pragma: no cover - run compiled by numba
    """out = [sum (x - p)^2, sum p^2, max(|x - p| - rtol |p|)] of float32 `x` against its
    previous copy `p`, then p := x: a weight delta in one pass instead of torch's nine."""
    n = x.size
    du = np.zeros(LANES, np.float32)
    pp = np.zeros(LANES, np.float32)
    ex = np.full(LANES, -np.inf, np.float32)
    r = np.float32(rtol)
    m = n - n % LANES
    for i in range(0, m, LANES):
        for j in range(LANES):
            v = x[i + j]
            q = p[i + j]
            d = v - q
            du[j] += d * d
            pp[j] += q * q
            e = abs(d) - r * abs(q)
            ex[j] = e if e > ex[j] else ex[j]
            p[i + j] = v
    tu = 0.0
    tp = 0.0
    te = -np.inf
    for j in range(LANES):
        tu += du[j]
        tp += pp[j]
        te = max(te, np.float64(ex[j]))
    for i in range(m, n):
        v = np.float64(x[i])
        q = np.float64(p[i])
        d = v - q
        tu += d * d
        tp += q * q
        e = abs(d) - rtol * abs(q)
        te = e if e > te else te
        p[i] = x[i]
    if tu != tu or not math.isfinite(tp):  # a NaN, or an inf in the copy: torch's amax gives NaN
        te = np.nan
    out[0] = tu
    out[1] = tp
    out[2] = te


def _deltas(xa, pa, sizes, rtol, chunk, out):  # pragma: no cover - run compiled by numba
    """_delta of each (x, p) pair given by address, in pieces of at most `chunk` elements."""
    part = np.empty(3)
    for i in range(sizes.size):
        n = sizes[i]
        x = carray(_f32_ptr(xa[i]), (n,))
        p = carray(_f32_ptr(pa[i]), (n,))
        acc = out[i]
        acc[0] = 0.0
        acc[1] = 0.0
        acc[2] = -np.inf
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            _kdelta(x[start:end], p[start:end], rtol, part)
            acc[0] += part[0]
            acc[1] += part[1]
            if part[2] != part[2] or part[2] > acc[2]:
                acc[2] = part[2]


def _sketches(addrs, sizes, widths, offs, signs, out):  # pragma: no cover - run compiled by numba
    """The signed bucket sketch (producers/sketch.py) of float32 tensor i (`sizes[i]` elements at
    `addrs[i]`, `widths[i]` buckets) into out[offs[i] : offs[i] + widths[i]], its sum of squares
    into out[offs[i] + widths[i]]. Float64 throughout; bucket and square sums are kept per bucket
    (vectorised updates, no reassociation), so that the same bytes give the same sketch."""
    for i in range(sizes.size):
        n = sizes[i]
        w = widths[i]
        o = offs[i]
        x = carray(_f32_ptr(addrs[i]), (n,))
        acc = out[o : o + w]
        sq = np.zeros(w)
        for j in range(w):
            acc[j] = 0.0
        for r in range(-(-n // w)):
            s = signs[r]
            start = r * w
            m = min(n - start, w)
            for j in range(m):
                v = np.float64(x[start + j])
                acc[j] += s * v
                sq[j] += v * v
        out[o + w] = sq.sum()


def _batch(addrs, sizes, chunk, out, act_of, dims, los, his, offs, counts):  # pragma: no cover - numba
    """A whole step in one call (one GIL release): moments of the float32 tensor i (`sizes[i]`
    elements at address `addrs[i]`) into out[i], in pieces of at most `chunk` elements; then the
    per-unit counts of lo[j] < x < hi[j] of tensor act_of[j], viewed as dims[j] = (samples, units,
    rest), into counts[offs[j] : offs[j] + units]."""
    part = np.empty(WIDTH)
    for i in range(sizes.size):
        n = sizes[i]
        x = carray(_f32_ptr(addrs[i]), (n,))
        acc = out[i]
        if n <= chunk:
            _kmoments(x, acc)
            continue
        acc[0] = 0.0
        acc[1] = 0.0
        acc[2] = np.inf
        acc[3] = -np.inf
        acc[4] = 0.0
        acc[5] = 0.0
        for start in range(0, n, chunk):
            _kmoments(x[start : start + chunk], part)
            acc[0] += part[0]
            acc[1] += part[1]
            acc[4] += part[4]
            acc[5] += part[5]
            # NaN propagates, as in amin / amax
            if part[2] != part[2] or part[2] < acc[2]:
                acc[2] = part[2]
            if part[3] != part[3] or part[3] > acc[3]:
                acc[3] = part[3]
    for j in range(act_of.size):
        i = act_of[j]
        samples, units, rest = dims[j, 0], dims[j, 1], dims[j, 2]
        c = counts[offs[j] : offs[j] + units]
        if rest == 1:
            _kactive_rows(carray(_f32_ptr(addrs[i]), (samples, units)), los[j], his[j], c)
        else:
            _kactive_planes(carray(_f32_ptr(addrs[i]), (samples, units, rest)), los[j], his[j], c)


def _batch_host(
    addrs, sizes, chunk, out, act_of, dims, los, his, offs, counts, thr, ratio, raw, nonzero, below, floats, zeros
):  # pragma: no cover - run compiled by numba
    """`_batch`, then what the hook keeps of its results, in the same call (no numpy call per
    result on a thread that holds the GIL). False when a result needs the torch path: a
    non-finite moment, or plain sums too close to cancellation for the variance, i.e.
    (1 + ratio) S^2 > ratio SS n. Else raw[i] = [0, S, SS, min, max, sum|x|] and nonzero[i] of
    tensor i; its wire columns, floats[i] = [mean, std, min, max, mean |x|] and zeros[i], as
    `stats_host.HostStats.finish` computes them for finite sums; and below[j, e] = the units of
    act j active in fewer than thr[j, e] samples."""
    counts[:] = 0.0
    _kbatch(addrs, sizes, chunk, out, act_of, dims, los, his, offs, counts)
    k = sizes.size
    for i in range(k):
        for c in range(5):
            if not np.isfinite(out[i, c]):
                return False
        s = out[i, 0]
        if (1.0 + ratio) * s * s > ratio * out[i, 1] * sizes[i]:
            return False
    for i in range(k):
        raw[i, 0] = 0.0
        for c in range(5):
            raw[i, c + 1] = out[i, c]
        nonzero[i] = np.int64(out[i, 5])
        n = sizes[i]
        mean = out[i, 0] / n
        var = out[i, 1] / n - mean * mean
        floats[i, 0] = mean
        floats[i, 1] = np.sqrt(var) if var > 0.0 else 0.0
        floats[i, 2] = out[i, 2]
        floats[i, 3] = out[i, 3]
        floats[i, 4] = out[i, 4] / n
        zeros[i] = n - nonzero[i]
    for j in range(act_of.size):
        for e in range(thr.shape[1]):
            t = thr[j, e]
            n = 0
            for u in range(offs[j], offs[j + 1]):
                if counts[u] < t:
                    n += 1
            below[j, e] = n
    return True


# Resolved by _batch when it compiles; set by _build() (numba is imported only then).
_f32_ptr = _kmoments = _kactive_rows = _kactive_planes = _kdelta = _kdeltas = _kbatch = carray = None
_ksketches = None
#: The compiled _batch_host (set by _build).
_host_kernel = None


def _build():
    global _f32_ptr, _kmoments, _kactive_rows, _kactive_planes, _kdelta, _kdeltas, _kbatch, _host_kernel, carray
    global _ksketches
    import numba
    from numba import njit, types
    from numba.extending import intrinsic

    @intrinsic
    def f32_ptr(typingctx, addr):
        """A float32 pointer from an integer address. Why: numba has no list-of-arrays argument
        that is free to build, and addresses let one call take every tensor of a step."""
        sig = types.CPointer(types.float32)(types.intp)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

        return sig, codegen

    fastmath = {"reassoc", "contract", "nsz", "arcp"}  # not nnan / ninf: NaN and inf stay exact
    jit = njit(nogil=True, fastmath=fastmath, boundscheck=False, cache=True)
    carray, _f32_ptr = numba.carray, f32_ptr
    _kmoments, _kactive_rows, _kactive_planes = jit(_moments), jit(_active_rows), jit(_active_planes)
    _kdelta = jit(_delta)
    # Cached too (numba's cache, beside this file or in the user's cache dir; the intrinsic is
    # inlined when they compile): a job's first save then loads them instead of compiling them,
    # which took most of the hook's start-up (`bench/hook_overhead.py`'s start-up column).
    _kdeltas = njit(nogil=True, boundscheck=False, cache=True)(_deltas)
    _ksketches = njit(nogil=True, boundscheck=False, cache=True)(_sketches)
    _kbatch = njit(nogil=True, boundscheck=False, cache=True)(_batch)
    _host_kernel = njit(nogil=True, boundscheck=False, cache=True)(_batch_host)
    return _kbatch


def _get():
    """The compiled kernel, or None (numba missing, or it failed once: logged, not retried)."""
    global _kernel, _failed
    if _kernel is not None or _failed:
        return _kernel
    with _lock:
        if _kernel is None and not _failed:
            try:
                k = _build()
                x = np.arange(40, dtype=np.float32)  # compile (or load from numba's cache) now
                _run(k, [x], [(x.reshape(4, 10), 0.0, np.inf), (x.reshape(2, 4, 5), 0.0, np.inf)])
                prev = x.copy()
                _kdeltas(np.array([_address(x)]), np.array([_address(prev)]), np.array([40]), 1e-3, CHUNK, np.empty((1, 3)))
                _ksketches(
                    np.array([_address(x)]), np.array([40]), np.array([7]), np.array([0]), np.ones(6), np.empty(8)
                )
                a = args([x], [(x.reshape(4, 10), 0.0, np.inf)])
                outs = np.empty((1, 6)), np.empty(1, np.int64), np.empty((1, 2), np.int64)
                _host_kernel(*a, np.ones((1, 2)), 16.0, *outs, np.empty((1, 5)), np.empty(1, np.int64))
                _kernel = k
            except ImportError:
                _failed = True
            except Exception as exc:  # noqa: BLE001 - any numba failure: use the torch path
                _failed = True
                log.warning("tensorpulse: numba kernel unavailable, using torch reductions: %s", exc)
            if _kernel is not None:
                _release_llvm()
    return _kernel


def _release_llvm() -> None:
    """Hands back LLVM's code pages that loading the kernels touched (producers/code_pages.py):
    about 70 MiB of resident memory that nothing runs again once the kernels are loaded."""
    import llvmlite

    released = code_pages.release(os.path.dirname(llvmlite.__file__))
    log.debug("tensorpulse: asked the kernel to reclaim %d MiB of llvmlite's pages", released >> 20)


def available() -> bool:
    return _get() is not None


def enabled() -> bool:
    """Use the kernel: numba is installed and $TENSORPULSE_NUMBA is not "0"."""
    return os.environ.get(NUMBA_ENV, "1") != "0" and available()


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def args(arrays, acts=()) -> tuple:
    """The batch kernel's arguments for 1-d C-contiguous float32 `arrays` and `acts`: (C-contiguous
    float32 array with ndim >= 2, lo, hi). The arrays must stay alive until the kernel returns."""
    addrs = [_address(a) for a in arrays] + [_address(x) for x, _, _ in acts]
    dims = [(x.shape[0], x.shape[1], x.size // (x.shape[0] * x.shape[1]), lo, hi) for x, lo, hi in acts]
    return args_at(addrs, [a.size for a in arrays], dims)


def args_at(addrs: list[int], sizes: list[int], acts: list[tuple[int, int, int, float, float]] = ()) -> tuple:
    """The batch kernel's arguments by address: `addrs` of the k moment inputs (`sizes`
    elements each) then of the activity inputs, `acts`: (samples, units, rest, lo, hi) each.
    Its outputs are args[3] (moments, [k, WIDTH] float64) and args[9] (activity counts, float32,
    act j at args[8][j] : args[8][j + 1])."""
    k, m = len(sizes), len(acts)
    act_of = np.arange(k, k + m, dtype=np.int64)
    if m:
        spec = np.array(acts, dtype=np.float64).reshape(m, 5)
        dims = spec[:, :3].astype(np.int64)
        los = spec[:, 3].astype(np.float32)
        his = spec[:, 4].astype(np.float32)
        offs = np.zeros(m + 1, np.int64)
        np.cumsum(dims[:, 1], out=offs[1:])
    else:
        dims, los, his, offs = _NO_DIMS, _NO_F32, _NO_F32, _NO_OFFS
    out = np.empty((k, WIDTH))
    counts = np.zeros(int(offs[-1]), np.float32)
    return (
        np.array(addrs, dtype=np.intp),
        np.array(sizes, dtype=np.int64),
        CHUNK,
        out,
        act_of,
        dims,
        los,
        his,
        offs,
        counts,
    )


_NO_DIMS = np.empty((0, 3), np.int64)
_NO_F32 = np.empty(0, np.float32)
_NO_OFFS = np.zeros(1, np.int64)


def outputs(a: tuple) -> tuple[np.ndarray, list[np.ndarray]]:
    """(moments, per-act counts) of a batch run with arguments `a` (see `args`)."""
    offs, counts = a[8], a[9]
    return a[3], [counts[offs[j] : offs[j + 1]] for j in range(len(offs) - 1)]


def _run(kernel, arrays, acts=()):
    """Moments of 1-d C-contiguous float32 `arrays` ([k, WIDTH] float64) and per-unit activity
    counts (float32 [units] each) of `acts`, in one kernel call."""
    a = args(arrays, acts)
    kernel(*a)
    return outputs(a)


def _need():
    k = _get()
    if k is None:
        raise RuntimeError("numba is not installed: pip install 'tensorpulse[fast]'")
    return k


def batch(
    arrays: list[np.ndarray], acts: list[tuple[np.ndarray, float, float]] = ()
) -> tuple[np.ndarray, list[np.ndarray]]:
    """`moments` of `arrays` and `active_counts` (float32) of each (array, lo, hi) of `acts`, in
    one kernel call that releases the GIL once."""
    return _run(_need(), arrays, acts)


def host_kernel():
    """The compiled `_batch_host` (see `stats_fused.reduce_host_fused`); numba must be available."""
    _need()
    return _host_kernel


def batch_at(
    addrs: list[int], sizes: list[int], acts: list[tuple[int, int, int, float, float]] = ()
) -> tuple[np.ndarray, list[np.ndarray]]:
    """`batch` by address (see `args_at`): for tensors, without a numpy view of each. Whoever owns
    the memory must keep it alive and unchanged until this returns."""
    a = args_at(addrs, sizes, acts)
    _need()(*a)
    return outputs(a)


def moments(arrays: list[np.ndarray]) -> np.ndarray:
    """[k, WIDTH] float64 statistics of k 1-d C-contiguous float32 arrays."""
    return _run(_need(), arrays)[0]


def active_counts(x: np.ndarray, lo: float = 0.0, hi: float = np.inf) -> np.ndarray:
    """Per-unit (dim 1) counts of elements with lo < x < hi, over every other dim (float64 [units]).

    `x`: C-contiguous float32 with ndim >= 2 and fewer than 2**24 elements per unit (float32
    counts stay exact); no empty dimension. NaN is in no range.
    """
    return _run(_need(), [], [(x, lo, hi)])[1][0].astype(np.float64)


def deltas_at(xaddrs: list[int], paddrs: list[int], sizes: list[int], rtol: float) -> np.ndarray:
    """[k, 3] weight deltas (see `_delta`) of float32 tensors at `xaddrs` against their copies at
    `paddrs` (`sizes` elements each), copying each tensor into its copy; one call, GIL released.
    The caller keeps both alive and the tensors unchanged until it returns."""
    _need()
    out = np.empty((len(sizes), 3))
    _kdeltas(np.array(xaddrs, np.intp), np.array(paddrs, np.intp), np.array(sizes, np.int64), float(rtol), CHUNK, out)
    return out


def sketches_at(addrs: list[int], sizes: list[int], widths: list[int], signs: np.ndarray) -> list[np.ndarray]:
    """The sketches (see producers/sketch.py) of float32 tensors at `addrs`: one [widths[i] + 1]
    float64 array each (buckets, then the sum of squares); one call, GIL released. `signs` must
    cover the longest tensor's rows. The caller keeps the tensors alive and unchanged meanwhile."""
    _need()
    w = np.array(widths, np.int64)
    offs = np.zeros(len(widths), np.int64)
    np.cumsum(w[:-1] + 1, out=offs[1:])
    out = np.empty(int(w.sum()) + len(widths))
    _ksketches(np.array(addrs, np.intp), np.array(sizes, np.int64), w, offs, signs, out)
    return [out[o : o + k + 1] for o, k in zip(offs.tolist(), widths, strict=True)]
