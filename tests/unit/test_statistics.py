"""Every backend gives every declared statistic as its float64 reference does (tensorpulse/statistics.py).

Backends: the numpy path (`numpy_stats`), the torch path on CPU one tensor at a time
(`torch_stats`) and batched as the hook reduces (`reduce_many` + `transfer`), each with the numba
kernels off (TENSORPULSE_NUMBA=0) and on, the path a GPU takes run on CPU, and the numba kernels
called directly (`moments`, and the whole-job kernel behind `reduce_host_fused`). Inputs:
random, constant, empty, all-NaN, mixed NaN/inf, huge (1e30; 1e300 in float64; 3e4 in float16),
subnormal and tiny (1e-22) tensors, in float32, float64, bfloat16 and float16 (the numpy path
takes no bfloat16, the kernels only float32).

Tolerances, stated once (`TOLERANCE`): counts (n, zeros, nan, inf, nonfinite, activity) and min /
max exactly; the moments (mean, std, abs_mean, and l2, variance derived from them) relative to
the tensor's scale max(|mean|, std, abs_mean): 1e-12 where the backend accumulates in float64
(numpy; torch on float64 tensors), 1e-5 where it accumulates float32 lanes (torch and numba on
float32, bfloat16 and float16 tensors), with an absolute floor of a few of the input dtype's
smallest subnormal, below which no float result has digits. NaN where the reference is NaN, the
same inf where it is infinite.
"""

from __future__ import annotations

import importlib
import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tensorpulse import statistics as S
from tensorpulse.producers.stats_numpy import Columns, numpy_stats
from tensorpulse.report import STATS as REPORT_STATS
from tensorpulse.sinks.prometheus import EXPORTED_STATS
from tensorpulse.wire import TensorStats

torch = pytest.importorskip("torch")


def _public(name: str) -> Callable[..., Any]:
    """A function of the torch path by name, wherever its module split puts it."""
    for module in ("stats_host", "stats_fused", "stats_torch"):
        try:
            mod = importlib.import_module(f"tensorpulse.producers.{module}")
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AssertionError(f"no torch path module defines {name}")


#: Relative tolerance of the moments by how the backend accumulates (see the module docstring).
TOLERANCE = {"float64": 1e-12, "float32 lanes": 1e-5}
MOMENTS = ("mean", "std", "abs_mean")
COUNTS = ("n", "zeros", "nan", "inf")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _case(name: str, dtype: torch.dtype) -> np.ndarray:
    """Float64 values of case `name`, before the cast to `dtype`; 2-D so activity applies."""
    rng = np.random.default_rng(zlib.crc32(f"{name} {dtype}".encode()))
    tiny = float(torch.finfo(dtype).smallest_normal) * 2.0 ** -_mantissa(dtype)  # smallest subnormal
    if name == "random":
        return rng.normal(0.5, 2.0, (16, 64))
    if name == "constant":
        return np.full((8, 32), 0.3)
    if name == "empty":
        return np.zeros((0, 16))
    if name == "all_nan":
        return np.full((4, 8), math.nan)
    if name == "nan_and_inf":
        x = rng.normal(size=(6, 10))
        x[0, :3] = math.nan
        x[1, :2] = math.inf
        x[2, 0] = -math.inf
        x[3, :4] = 0.0
        return x
    if name == "inf_only":
        x = rng.normal(size=(6, 10))
        x[1, :2] = math.inf
        return x
    if name == "huge":
        scale = {torch.float16: 3e4, torch.float64: 1e300}.get(dtype, 1e30)
        return rng.normal(size=(8, 64)) * scale
    if name == "subnormal":
        return tiny * rng.integers(-7, 8, (8, 16))
    if name == "tiny":  # normal float32 values whose squares underflow float32
        return rng.normal(size=(8, 64)) * 1e-22
    raise KeyError(name)


def _mantissa(dtype: torch.dtype) -> int:
    """Explicit mantissa bits (the smallest subnormal is smallest_normal * 2**-mantissa)."""
    return {torch.float32: 23, torch.float64: 52, torch.bfloat16: 7, torch.float16: 10}[dtype]


CASES = ("random", "constant", "empty", "all_nan", "nan_and_inf", "inf_only", "huge", "subnormal", "tiny")


def _tensor(name: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(_case(name, dtype), dtype=torch.float64).to(dtype)


def _values(t: torch.Tensor) -> np.ndarray:
    """The values the statistics are defined on, in float64 (bf16/f16 widen exactly)."""
    return t.to(torch.float64).numpy()


# --- backends: each maps torch tensors to wire columns -----------------------------------------


def _numpy(ts: list[torch.Tensor], acts: list[bool], qs: list[bool]) -> Columns:
    arrays = [t.numpy() for t in ts]  # numpy's own float32 / float64 / float16
    return numpy_stats(arrays, activity=acts, quantiles=qs)


def _torch_each(ts: list[torch.Tensor], acts: list[bool], qs: list[bool]) -> Columns:
    return _public("torch_stats")(ts, activity=acts, quantiles=qs)


def _torch_many(ts: list[torch.Tensor], acts: list[bool], qs: list[bool]) -> Columns:
    host, _ = _public("transfer")(_public("reduce_many")(ts, quantiles=qs))
    return host.finish()


BACKENDS: dict[str, tuple[Callable[..., Columns], str | None]] = {
    "numpy": (_numpy, None),
    "torch-numba-off": (_torch_each, "0"),
    "torch-numba-on": (_torch_each, "1"),
    "torch-many-numba-off": (_torch_many, "0"),
    "torch-many-numba-on": (_torch_many, "1"),
    # the path a GPU takes (sums shifted by the first element, nan/inf counted up front), on CPU
    "torch-device-path": (_torch_each, "0"),
}


def _accumulates(backend: str, dtype: torch.dtype) -> str:
    return "float64" if backend == "numpy" or dtype == torch.float64 else "float32 lanes"


def _stats(cols: Columns, i: int) -> TensorStats:
    """Row i as the TensorStats a reader gets (float64 columns, before the float32 wire)."""
    mean, std, mn, mx, amean = cols.floats[i].tolist()
    return TensorStats(
        "t", "weights", int(cols.n[i]), mean, std, mn, mx, amean,
        int(cols.zeros[i]), int(cols.nan[i]), int(cols.inf[i]),
        cols.activity.get(i), cols.quantiles.get(i),
    )  # fmt: skip


def assert_statistics(got: TensorStats, x: np.ndarray, rtol: float, floor: float, what: str) -> None:
    """Every declared scalar statistic of `got` against the reference over `x` (see TOLERANCE)."""
    ref = S.reference(x)
    finite = [abs(ref[k]) for k in MOMENTS if math.isfinite(ref[k])]
    scale = max(finite, default=0.0)
    for name in S.SCALAR_NAMES:
        want, have = ref[name], getattr(got, name)
        where = f"{what}: {name} = {have!r}, reference {want!r}"
        if S.get(name).dtype is int or name in ("min", "max"):
            assert have == want or (math.isnan(have) and math.isnan(want)), where
        elif math.isnan(want):
            assert math.isnan(have), where
        elif math.isinf(want):
            assert have == want, where
        elif name == "zero_frac":
            assert have == pytest.approx(want, rel=1e-15), where
        else:
            width = scale * scale if name == "variance" else scale * math.sqrt(max(ref["n"], 1))
            if name in MOMENTS:
                width = scale
            assert have == pytest.approx(want, rel=rtol, abs=max(rtol * width, floor)), where


PARAMS = [
    pytest.param(
        backend,
        dtype,
        case,
        id=f"{backend}-{dtype}-{case}",
    )
    for backend in BACKENDS
    for dtype in DTYPES
    for case in CASES
    if not (backend == "numpy" and dtype == "bfloat16")
]


@pytest.mark.parametrize("backend, dtype, case", PARAMS)
def test_backend_gives_the_declared_statistics(backend, dtype, case, monkeypatch):
    """n, mean, std, min, max, abs_mean, zeros, nan, inf, l2, variance, zero_frac, nonfinite,
    quantiles and activity of one tensor equal the float64 reference within TOLERANCE."""
    if BACKENDS[backend][1] == "1":
        pytest.importorskip("numba")
    run, numba = BACKENDS[backend]
    if numba is not None:
        monkeypatch.setenv("TENSORPULSE_NUMBA", numba)
    if backend == "torch-device-path":
        from tensorpulse.producers import stats_torch

        monkeypatch.setattr(stats_torch, "_HOST_DEVICES", frozenset())  # its documented test switch
    t = _tensor(case, DTYPES[dtype])
    x = _values(t)
    # Twice: without and with quantiles and activity (the torch path takes other ways with them).
    cols = run([t, t], [False, True], [False, True])
    rtol = TOLERANCE[_accumulates(backend, DTYPES[dtype])]
    floor = 4 * float(torch.finfo(DTYPES[dtype]).smallest_normal) * 2.0 ** -_mantissa(DTYPES[dtype])
    for i in (0, 1):
        assert_statistics(_stats(cols, i), x, rtol, floor, f"{backend} {dtype} {case} row {i}")
    assert 0 not in cols.quantiles and 0 not in cols.activity
    want_q = S.get("quantiles").reference(x)
    got_q = cols.quantiles.get(1)
    if want_q is None:
        assert got_q is None
    else:
        np.testing.assert_allclose(got_q, want_q, rtol=1e-6, equal_nan=True, err_msg="quantiles")
    if backend != "torch-many-numba-off" and backend != "torch-many-numba-on":  # reduce_many: no activity
        assert cols.activity.get(1) == S.get("activity").reference(x), "activity"


# --- the numba kernels, called directly -------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_numba_moments_kernel_gives_the_declared_statistics(case):
    """`stats_numba.moments` (float32 only) gives the reference's moments for finite tensors, and a
    non-finite moment for a tensor holding NaN or inf (its callers then count them exactly) or
    whose float32 sums overflow (they then rescale)."""
    stats_numba = pytest.importorskip("tensorpulse.producers.stats_numba")
    pytest.importorskip("numba")
    x = _values(_tensor(case, torch.float32))
    flat = x.astype(np.float32).reshape(-1)
    if flat.size == 0:
        return  # callers never pass an empty tensor (n = 0 has every statistic 0 without a pass)
    s, ss, mn, mx, sabs, nonzero = stats_numba.moments([flat])[0].tolist()
    n = flat.size
    if not np.isfinite(flat).all():
        assert not all(math.isfinite(v) for v in (s, ss, mn, mx, sabs)), "a non-finite input must show"
        return
    if not all(math.isfinite(v) for v in (s, ss, sabs)):
        assert case == "huge", case  # float32 sums overflowed: the callers rescale (the torch path)
        return
    mean = s / n
    got = TensorStats(
        "t", "weights", n, mean, math.sqrt(max(ss / n - mean * mean, 0.0)), mn, mx, sabs / n, n - int(nonzero)
    )
    floor = 4 * float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
    assert_statistics(got, x, TOLERANCE["float32 lanes"], floor, f"moments {case}")


@pytest.mark.parametrize("case", CASES)
def test_whole_job_kernel_gives_the_declared_statistics(case, monkeypatch):
    """The kernel behind `reduce_host_fused` finishes the wire columns itself: equal to the
    reference, or None (the torch path takes over) for what it does not handle."""
    pytest.importorskip("numba")
    monkeypatch.setenv("TENSORPULSE_NUMBA", "1")
    t = _tensor(case, torch.float32)
    host = _public("reduce_host_fused")([t], [(0.0, math.inf)])
    x = _values(t)
    if host is None:
        assert x.size == 0 or not np.isfinite(x).all() or case in ("huge", "constant"), case
        return
    cols = host.finish()
    floor = 4 * float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
    assert_statistics(_stats(cols, 0), x, TOLERANCE["float32 lanes"], floor, f"host kernel {case}")
    assert cols.activity.get(0) == S.get("activity").reference(x), "activity"


def test_every_float_column_of_the_wire_is_a_declared_statistic():
    """The codec's float columns and the readers' statistic names come from the declarations."""
    from tensorpulse import wire
    from tensorpulse.rules import declarative
    from tensorpulse.rules import functional as F

    assert tuple(s.name for s in S.STATISTICS if s.wire == "f") == wire.FLOAT_COLUMNS
    assert F.FINGERPRINT_FIELDS == wire.FLOAT_COLUMNS
    assert set(declarative.STATISTICS) <= set(S.SCALAR_NAMES)
    assert set(EXPORTED_STATS) <= set(S.SCALAR_NAMES)
    assert set(REPORT_STATS) <= set(S.SCALAR_NAMES)


@pytest.mark.parametrize("name", S.SCALAR_NAMES)
def test_each_declared_statistic_is_what_readers_get_from_a_decoded_record(name):
    """Readers read a statistic as getattr(TensorStats, name): for each declared one, that is the
    reference's value after the float32 wire (sent ones) or derived from it (l2, variance, ...)."""
    from tensorpulse import wire

    x = np.random.default_rng(3).normal(1.0, 2.0, (4, 50)).astype(np.float32)
    x[0, :5] = 0.0
    cols = numpy_stats([x])
    payload = wire.encode(
        job="j", rank=0, world=1, step=1, mode="train", ts=0.0, tensors=cols.to_block(["w"], ["weights"])
    )
    (t,) = wire.decode(payload, {}).tensors
    want = S.get(name).reference(x.astype(np.float64))
    scale = float(np.abs(x).max()) * (math.sqrt(x.size) if name == "l2" else 1.0)
    scale = scale * scale if name == "variance" else scale
    assert getattr(t, name) == pytest.approx(want, rel=1e-6, abs=1e-6 * scale)
