"""One fused pass per CPU tensor for [S, SS, min, max, sum|x|, nonzero], when numba is installed.

Why our own kernel: torch's CPU reductions each make a pass of their own, and the ones for
sum|x| and the non-zero count are slow paths (vector_norm(ord=1) and count_nonzero: 13x and 11x
a plain sum in `bench/hook_profile.py kernels`), so the six statistics cost six or more passes and a dozen calls per tensor.
This loop makes one pass over 16 lanes that LLVM vectorises (reassociation allowed, NaN
semantics kept: no `nnan`), and it runs without the GIL, so a background reduction does not
hold up the training thread. `bench/hook_profile.py kernels` on the 2-core benchmark machine:
118 us for a 401k-element float32 tensor, where the hook's torch path takes 393 us.

Float32 tensors only (float64 ones keep the torch path). Accuracy: 16 float32 lanes per call of
at most CHUNK elements, combined in float64. NaN: min and max are NaN when any element is, as
torch's amin/amax give; the non-zero count includes NaN (the caller's second pass recounts a
tensor whose sum is not finite).

Optional (`pip install tensorpulse[fast]`): without numba, `available()` is False and the torch
path is used.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

log = logging.getLogger(__name__)

#: Lanes per iteration (one AVX-512 register of float32).
LANES = 16
#: Elements per kernel call: each lane then adds at most 2**18 values in float32 (relative error
#: about 3e-5 at worst, 1e-7 measured on normal data) and counts exactly (< 2**24).
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


def _build():
    from numba import njit

    fastmath = {"reassoc", "contract", "nsz", "arcp"}  # not nnan / ninf: NaN and inf stay exact
    jit = njit(nogil=True, fastmath=fastmath, boundscheck=False, cache=True)
    return jit(_moments), jit(_active_rows), jit(_active_planes)


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
                k[0](x, np.zeros(WIDTH))
                k[1](x.reshape(4, 10), np.float32(0), np.float32(np.inf), np.zeros(10, np.float32))
                k[2](x.reshape(2, 4, 5), np.float32(0), np.float32(np.inf), np.zeros(4, np.float32))
                _kernel = k
            except ImportError:
                _failed = True
            except Exception as exc:  # noqa: BLE001 - any numba failure: use the torch path
                _failed = True
                log.warning("tensorpulse: numba kernel unavailable, using torch reductions: %s", exc)
    return _kernel


def available() -> bool:
    return _get() is not None


def enabled() -> bool:
    """Use the kernel: numba is installed and $TENSORPULSE_NUMBA is not "0"."""
    return os.environ.get("TENSORPULSE_NUMBA", "1") != "0" and available()


def moments(arrays: list[np.ndarray]) -> np.ndarray:
    """[k, WIDTH] float64 statistics of k 1-d C-contiguous float32 arrays."""
    k = _get()
    if k is None:
        raise RuntimeError("numba is not installed: pip install 'tensorpulse[fast]'")
    out = np.empty((len(arrays), WIDTH))
    part = np.empty(WIDTH)
    for i, x in enumerate(arrays):
        if x.size <= CHUNK:
            k[0](x, out[i])
            continue
        acc = out[i]
        acc[:] = (0.0, 0.0, np.inf, -np.inf, 0.0, 0.0)
        for start in range(0, x.size, CHUNK):
            k[0](x[start : start + CHUNK], part)
            acc[[0, 1, 4, 5]] += part[[0, 1, 4, 5]]
            # NaN propagates, as in amin / amax
            acc[2] = part[2] if np.isnan(part[2]) or part[2] < acc[2] else acc[2]
            acc[3] = part[3] if np.isnan(part[3]) or part[3] > acc[3] else acc[3]
    return out


def active_counts(x: np.ndarray, lo: float = 0.0, hi: float = np.inf) -> np.ndarray:
    """Per-unit (dim 1) counts of elements with lo < x < hi, over every other dim (float64 [units]).

    `x`: C-contiguous float32 with ndim >= 2 and fewer than 2**24 elements per unit (float32
    counts stay exact). NaN is in no range.
    """
    k = _get()
    if k is None:
        raise RuntimeError("numba is not installed: pip install 'tensorpulse[fast]'")
    counts = np.zeros(x.shape[1], np.float32)
    if x.ndim == 2:
        k[1](x, np.float32(lo), np.float32(hi), counts)
    else:
        k[2](x.reshape(x.shape[0], x.shape[1], -1), np.float32(lo), np.float32(hi), counts)
    return counts.astype(np.float64)
