"""Tensor statistics: the torch backend against a float64 numpy reference, and the numpy backend."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from tensorpulse.producers import stats_numpy
from tensorpulse.producers.stats_numpy import Columns, numpy_stats
from tensorpulse.wire import ACTIVITY_EDGES, FLOAT_COLUMNS

torch = pytest.importorskip("torch")
from tensorpulse.producers import stats_torch  # noqa: E402
from tensorpulse.producers.stats_host import torch_stats, transfer  # noqa: E402
from tensorpulse.producers.stats_torch import reduce_on_device  # noqa: E402

INF, NAN = math.inf, math.nan


@pytest.fixture(params=["host", "device", "fused"])
def path(request, monkeypatch):
    """The CPU path (plain sums checked on the host, host quantiles), on CPU the path a GPU takes
    (sums shifted by the first element, nan/inf of activations counted up front, torch.quantile),
    or the CPU path with float32 tensors reduced by the numba kernels (when numba is installed)."""
    if request.param == "fused":
        pytest.importorskip("numba")
        monkeypatch.setenv("TENSORPULSE_NUMBA", "1")
    else:
        monkeypatch.setenv("TENSORPULSE_NUMBA", "0")
    if request.param == "device":
        monkeypatch.setattr(stats_torch, "_HOST_DEVICES", frozenset())
    return request.param


def reference(x: np.ndarray) -> dict[str, float]:
    """Plain float64 numpy statistics of one array (population std, IEEE semantics)."""
    f = np.asarray(x, dtype=np.float64).ravel()
    if f.size == 0:
        return dict(n=0, mean=0, std=0, min=0, max=0, abs_mean=0, zeros=0, nan=0, inf=0)
    with np.errstate(all="ignore"):
        return dict(
            n=f.size,
            mean=f.mean(),
            std=f.std(),
            min=f.min(),
            max=f.max(),
            abs_mean=np.abs(f).mean(),
            zeros=int((f == 0).sum()),
            nan=int(np.isnan(f).sum()),
            inf=int(np.isinf(f).sum()),
        )


def host_array(t: torch.Tensor) -> np.ndarray:
    """The values the statistics are defined on (half/bf16 widened exactly to float32)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.numpy()


def assert_row(cols: Columns, i: int, ref: dict[str, float], rtol: float = 1e-5) -> None:
    got = dict(zip(FLOAT_COLUMNS, cols.floats[i].tolist(), strict=True))
    assert int(cols.n[i]) == ref["n"]
    assert int(cols.zeros[i]) == ref["zeros"]
    assert int(cols.nan[i]) == ref["nan"]
    assert int(cols.inf[i]) == ref["inf"]
    scale = max(abs(ref["mean"]), ref["std"], ref["abs_mean"]) if math.isfinite(ref["std"]) else 0.0
    for key in FLOAT_COLUMNS:
        want, have = ref[key], got[key]
        if math.isnan(want):
            assert math.isnan(have), (key, have, want)
        elif math.isinf(want) or key in ("min", "max"):
            assert np.float32(have) == np.float32(want), (key, have, want)  # exact on the float32 wire
        else:
            assert have == pytest.approx(want, rel=rtol, abs=rtol * scale), (key, have, want)


def test_random_tensors_match_the_float64_reference(path):
    """Random float32/float64 tensors of several shapes give the reference statistics."""
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(128, 64, generator=g) * 3 + 7,
        torch.rand(1000, generator=g, dtype=torch.float64) - 0.25,
        torch.randn(4, 3, 5, 5, generator=g) * 1e-3,
        torch.randn((), generator=g),
        torch.randn(100_000, generator=g) + 1000.0,  # large offset: cancellation would show
    ]
    cols = torch_stats(tensors)
    assert len(cols) == len(tensors)
    for i, t in enumerate(tensors):
        assert_row(cols, i, reference(t.numpy()))


def test_constant_tensor_has_exactly_zero_std(path):
    """A constant tensor gives std exactly 0 and mean exactly the constant (shifted moments)."""
    values = [0.1, 3.3, -1e6 + 0.5, 12345.678]
    tensors = [torch.full((4097,), v) for v in values] + [torch.full((64, 3), 0.7, dtype=torch.float16)]
    cols = torch_stats(tensors)
    for i, t in enumerate(tensors):
        v = float(t.reshape(-1)[0].float())
        assert cols.floats[i, 1] == 0.0
        assert cols.floats[i, 0] == v
        assert cols.floats[i, 2] == cols.floats[i, 3] == v


def test_empty_tensors_report_n_zero_and_zero_statistics(path):
    """Empty tensors yield n=0 and all statistics 0 in both backends, next to non-empty ones."""
    tensors = [torch.empty(0), torch.ones(3), torch.empty(5, 0)]
    for cols in (torch_stats(tensors), numpy_stats([t.numpy() for t in tensors])):
        assert cols.n.tolist() == [0, 3, 0]
        assert cols.floats[0].tolist() == [0.0] * 5 and cols.floats[2].tolist() == [0.0] * 5
        assert cols.floats[1].tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
        assert cols.zeros.tolist() == [0, 0, 0]


def test_integer_and_bool_tensors_are_accumulated_as_floats(path):
    """Integer and bool tensors are supported (accumulated in float32) and match the reference."""
    tensors = [torch.arange(-50, 51, dtype=torch.int64), torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool)]
    tensors.append(torch.randint(0, 7, (40, 9), dtype=torch.int32))
    cols = torch_stats(tensors)
    for i, t in enumerate(tensors):
        assert_row(cols, i, reference(t.numpy()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_are_computed_in_float32(dtype, path):
    """float16/bfloat16 tensors match the float64 reference of their exact values."""
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(300, 70, generator=g) * 4 + 2).to(dtype)
    cols = torch_stats([t, torch.zeros(10, dtype=dtype)])
    assert_row(cols, 0, reference(host_array(t)))
    assert cols.zeros[1] == 10 and cols.floats[1].tolist() == [0.0] * 5


def test_nan_and_inf_counts_are_exact_and_statistics_follow_ieee(path):
    """Tensors with NaN/inf get exact counts and the same IEEE statistics as numpy."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1000, generator=g)
    a[[3, 500, 999]] = NAN
    a[[10, 11]] = INF
    a[7] = 0.0
    b = torch.randn(64, generator=g)
    b[[0, 5]] = INF  # the first element (the shift) is non-finite too
    c = torch.randn(64, generator=g)
    c[9] = -INF
    d = torch.tensor([INF, -INF, 1.0, 0.0])
    e = torch.tensor([NAN] * 5)
    ok = torch.randn(50, generator=g)
    tensors = [a, b, c, d, e, ok]
    cols = torch_stats(tensors)
    for i, t in enumerate(tensors):
        assert_row(cols, i, reference(t.numpy()))
    assert cols.nan.tolist() == [3, 0, 0, 0, 5, 0]
    assert cols.inf.tolist() == [2, 2, 1, 2, 0, 0]
    ncols = numpy_stats([t.numpy() for t in tensors])
    assert ncols.nan.tolist() == cols.nan.tolist() and ncols.inf.tolist() == cols.inf.tolist()


def test_huge_finite_tensors_whose_sums_overflow_have_no_nonfinite_counts(path):
    """Finite values whose float32 sums overflow report nan=inf=0 and correct mean/std."""
    g = torch.Generator().manual_seed(3)
    big = (torch.rand(10_000, generator=g) * 2 - 1) * 3e38
    sq = torch.randn(5000, generator=g) * 1e25  # only the sum of squares overflows
    same = torch.full((100,), 2e38)  # the plain sum overflows
    cols = torch_stats([big, sq, same])
    assert cols.nan.tolist() == [0, 0, 0] and cols.inf.tolist() == [0, 0, 0]
    assert np.isfinite(cols.floats).all()
    for i, t in enumerate([big, sq, same]):
        assert_row(cols, i, reference(t.numpy()), rtol=1e-4)
    assert cols.floats[2, 1] == 0.0


def brute_activity(x: np.ndarray) -> tuple[int, ...]:
    """Units (axis 1) whose fraction of positive samples is below each edge, by plain loops."""
    units = x.shape[1]
    per_unit = np.moveaxis(x, 1, 0).reshape(units, -1)
    fracs = [float(np.sum(per_unit[u] > 0)) / per_unit.shape[1] for u in range(units)]
    return (units, *(sum(1 for f in fracs if f < e) for e in ACTIVITY_EDGES))


def test_activity_counts_match_a_brute_force_reference(path):
    """Per-unit activity histograms match brute force for dense, conv-shaped and edge-case inputs."""
    g = torch.Generator().manual_seed(4)
    dense = torch.relu(torch.randn(256, 40, generator=g) + torch.linspace(-4, 2, 40))
    conv = torch.relu(torch.randn(8, 16, 5, 5, generator=g) + torch.linspace(-3, 1, 16).reshape(1, 16, 1, 1))
    # 1000 samples per unit: unit u has exactly k_u positive samples, on the edges 0.001 ... 0.5
    counts = [0, 1, 2, 9, 10, 11, 49, 50, 51, 99, 100, 101, 499, 500, 501, 1000]
    edge = torch.zeros(1000, len(counts))
    for u, k in enumerate(counts):
        edge[:k, u] = 1.0
    edge[0, 0] = NAN  # NaN is not > 0
    edge[1, 0] = -1.0
    tensors = [dense, conv, edge, torch.randn(7, generator=g)]
    cols = torch_stats(tensors, activity=[True, True, True, True])
    for i, t in enumerate(tensors[:3]):
        assert cols.activity[i] == brute_activity(t.numpy()), i
    assert 3 not in cols.activity  # 1-d tensors have no units
    assert cols.activity[2] == (16, 1, 4, 7, 10, 13)
    ncols = numpy_stats([t.numpy() for t in tensors], activity=[True] * 4)
    assert ncols.activity == cols.activity


def test_activity_with_many_samples_per_unit_uses_exact_integer_counts(monkeypatch, path):
    """Above the float32-exact sample count the activity counts still match brute force."""
    monkeypatch.setattr(stats_torch, "_EXACT_F32", 100)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 12, generator=g) + torch.linspace(-3, 0.5, 12)
    cols = torch_stats([x], activity=[True])
    assert cols.activity[0] == brute_activity(x.numpy())


def test_chunked_reduction_matches_the_unchunked_one(monkeypatch, path):
    """Tensors larger than CHUNK are reduced in chunks with the same results."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10_007, generator=g) * 2 + 5
    x[17] = 0.0
    whole = torch_stats([x])
    monkeypatch.setattr(stats_torch, "CHUNK", 1000)
    chunked = torch_stats([x, torch.full((3001,), 1.5)])
    assert_row(chunked, 0, reference(x.numpy()))
    np.testing.assert_allclose(chunked.floats[0], whole.floats[0], rtol=1e-6)
    assert chunked.floats[1, 1] == 0.0 and chunked.zeros[0] == 1


def test_quantiles_come_from_a_bounded_subsample(path):
    """p5/p95 are nearest-rank quantiles of a strided subsample and close to the true quantiles."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200_000, generator=g)
    small = torch.arange(100, dtype=torch.float32)
    cols = torch_stats([x, small], quantiles=[True, True])
    p5, p95 = cols.quantiles[0]
    assert p5 == pytest.approx(-1.645, abs=0.05) and p95 == pytest.approx(1.645, abs=0.05)
    sub = x.numpy()[:: -(-x.numel() // stats_torch.MAX_QUANTILE_SAMPLES)]
    assert sub.size <= stats_torch.MAX_QUANTILE_SAMPLES
    want = np.quantile(sub, (0.05, 0.95), method="nearest")
    assert cols.quantiles[0] == pytest.approx(tuple(want))
    assert cols.quantiles[1] == pytest.approx(
        tuple(np.quantile(small.numpy(), (0.05, 0.95), method="nearest"))
    )
    assert numpy_stats([small.numpy()], quantiles=[True]).quantiles[0] == pytest.approx(cols.quantiles[1])


def test_k_tensors_and_extras_come_back_from_one_copy_without_item(monkeypatch, path):
    """Stats of k tensors plus scalar extras come from a single .cpu() call and no .item()."""
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **kw):
        calls.append(tuple(self.shape))
        return real_cpu(self, *a, **kw)

    def no_item(self):
        raise AssertionError(".item() called")

    g = torch.Generator().manual_seed(8)
    tensors = [torch.randn(50, 20, generator=g) for _ in range(7)] + [
        torch.relu(torch.randn(32, 8, generator=g))
    ]
    stats = [reduce_on_device(t) for t in tensors[:7]]
    stats.append(reduce_on_device(tensors[7], activity=True, exact_nonfinite=True))
    loss = torch.tensor(0.25)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    monkeypatch.setattr(torch.Tensor, "item", no_item)
    host, extras = transfer(stats, [loss, 3.0])
    assert len(calls) == 1
    assert extras == [0.25, 3.0]
    cols = host.finish()
    assert len(cols) == 8 and 7 in cols.activity
    for i, t in enumerate(tensors):
        assert_row(cols, i, reference(t.numpy()))


def test_nonfinite_tensors_cost_exactly_one_extra_copy(monkeypatch, path):
    """The second pass for NaN/inf runs once per device and only when something is non-finite."""
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or real_cpu(self, *a, **k))
    bad1 = torch.tensor([1.0, NAN, 2.0])
    bad2 = torch.tensor([3e38, 3e38])
    cols = torch_stats([torch.ones(4), bad1, bad2, torch.zeros(3)])
    assert len(calls) == 2
    assert cols.nan.tolist() == [0, 1, 0, 0]


def test_activation_reductions_count_nonfinite_without_keeping_the_tensor(path):
    """exact_nonfinite reductions keep no tensor reference yet report exact nan/inf counts."""
    x = torch.relu(torch.randn(16, 4))
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = NAN, INF, INF, -INF
    s = reduce_on_device(x, activity=True, exact_nonfinite=True)
    assert s.tensor is None
    cols = transfer([s])[0].finish()
    assert cols.nan.tolist() == [1] and cols.inf.tolist() == [3]
    assert cols.zeros.tolist() == [int((x == 0).sum())]
    assert cols.activity[0] == brute_activity(x.numpy())
    assert math.isnan(cols.floats[0, 0])


def test_numpy_backend_matches_the_reference_for_arrays_and_lists():
    """numpy_stats accepts arrays and lists and reproduces the float64 reference exactly."""
    rng = np.random.default_rng(9)
    arrays = [
        rng.normal(3, 2, (60, 7)),
        [1, 2, 0, 4],
        np.array([1.0, np.nan, np.inf, 0.0]),
        np.array([np.inf, 1.0]),
        np.full(10, 1e308),
    ]
    cols = numpy_stats(arrays)
    for i, a in enumerate(arrays[:4]):
        ref = reference(np.asarray(a))
        assert_row(cols, i, ref, rtol=1e-12)
    assert cols.floats[4].tolist() == [1e308, 0.0, 1e308, 1e308, 1e308]


def test_columns_convert_to_a_wire_tensor_block():
    """Columns.concat re-indexes sparse columns and to_block gives float32 rows for the wire."""
    a = numpy_stats([np.ones((4, 2))], activity=[True])
    b = numpy_stats([np.arange(5.0), np.array([np.nan])], quantiles=[True, False])
    merged = Columns.concat([a, b])
    assert merged.activity == {0: (2, 0, 0, 0, 0, 0)} and set(merged.quantiles) == {1}
    block = merged.to_block(["a", "b", "c"], ["x", "y", "y"])
    assert block.floats.dtype == np.float32 and block.floats.shape == (3, 5)
    assert block.nan is not None and block.nan.tolist() == [0, 0, 1] and block.inf is None
    assert stats_numpy.activity_thresholds(1000) == [1, 10, 50, 100, 500]
    assert stats_numpy.activity_thresholds(7) == [1, 1, 1, 1, 4]


def test_reduce_many_batches_small_tensors_and_matches_the_reference(path, monkeypatch):
    """reduce_many (small tensors as rows of one matrix) gives the reference statistics and quantiles."""
    g = torch.Generator().manual_seed(10)
    tensors = [
        torch.randn(300, 40, generator=g),  # reduced on its own
        torch.randn(512, generator=g) * 3 + 7,
        torch.full((10,), 0.1),  # constant: std exactly 0
        torch.randn(10, 51, generator=g) + 1000.0,
        torch.randn(7, generator=g, dtype=torch.float64),
        torch.zeros(5),
        torch.tensor([1.0, NAN, 2.0]),
        torch.tensor([INF, 1.0, 0.0]),  # non-finite first element (the padding)
        torch.tensor([3e38, 3e38, 1.0]),  # finite, the sums overflow
        torch.randn(1, generator=g),
        torch.empty(0),
        torch.randint(0, 5, (30,)),
        torch.randn(40, generator=g).half(),
    ]
    tensors[3][0, 5] = 0.0
    monkeypatch.setattr(stats_torch, "SMALL", 1000)
    stats = stats_torch.reduce_many(tensors, quantiles=[True] * len(tensors))
    if path == "fused":  # every float32 tensor in the kernel's rows, quantile steps included
        assert all(stats[i].rows is not None for i in (0, 1, 2, 3, 5, 6, 7, 8, 9))
    else:
        assert stats[0].rows is None and all(stats[i].rows is not None for i in (1, 2, 3, 5, 6, 7, 8, 9))
    host, extras = transfer(stats, [torch.tensor(0.25), 1.5])
    cols = host.finish()
    assert extras == [0.25, 1.5]
    for i, t in enumerate(tensors):
        assert_row(cols, i, reference(host_array(t)))
        if t.numel():
            f = host_array(t).astype(np.float64).ravel()
            want = np.quantile(f, (0.05, 0.95), method="nearest")
            np.testing.assert_allclose(cols.quantiles[i], want, rtol=1e-6, equal_nan=True)
    assert cols.floats[2, 1] == 0.0 and cols.floats[2, 0] == np.float32(0.1)
    assert cols.zeros[3] == 1 and cols.nan[6] == 1 and cols.inf[7] == 1


def test_plain_sums_are_recomputed_around_the_first_element_where_they_would_cancel():
    """On CPU the plain sums of tensors whose mean dwarfs their spread are re-shifted: exact std."""
    g = torch.Generator().manual_seed(11)
    big = torch.randn(200_000, generator=g) * 1e-3 + 1.0  # mean / std = 1000
    act = torch.relu(torch.randn(64, 32, generator=g)) * 1e-4 + 5.0
    near = torch.full((70_000,), 2.5)
    near[123] = 2.5 + 2**-20
    stats = [reduce_on_device(big), reduce_on_device(near)]
    stats.append(reduce_on_device(act, activity=True, exact_nonfinite=True))
    stats.append(reduce_on_device(torch.full((8, 4), 0.3), activity=True, exact_nonfinite=True))
    cols = transfer(stats)[0].finish()
    for i, t in enumerate([big, near, act]):
        ref = reference(t.numpy())
        assert cols.floats[i, 1] == pytest.approx(ref["std"], rel=1e-6)
        assert cols.floats[i, 0] == pytest.approx(ref["mean"], rel=1e-7)
    assert cols.floats[3, 1] == 0.0 and cols.floats[3, 0] == np.float32(0.3)


def test_activations_count_nan_and_inf_only_when_needed_on_cpu():
    """A finite activation skips the nan/inf indicator passes on CPU; a non-finite one counts exactly."""
    x = torch.relu(torch.randn(32, 8))
    clean = reduce_on_device(x, activity=True, exact_nonfinite=True)
    x[1, 1], x[2, 2], x[3, 3] = NAN, INF, -INF
    dirty = reduce_on_device(x, activity=True, exact_nonfinite=True)
    assert not clean.counted and dirty.counted and dirty.tensor is None
    cols = transfer([clean, dirty])[0].finish()
    assert cols.nan.tolist() == [0, 1] and cols.inf.tolist() == [0, 2]
    assert cols.zeros[1] == int((x == 0).sum())
    assert cols.activity[1] == brute_activity(x.numpy())


def test_scratch_buffers_serve_inference_mode_and_training_alike(monkeypatch):
    """A scratch buffer first made under inference_mode works outside it (and vice versa)."""
    monkeypatch.setattr(stats_torch, "_LOCAL", threading.local())  # no buffers yet
    x = torch.randn(1000) + 3
    with torch.inference_mode():
        a = torch_stats([x * 1])
    b = torch_stats([x])
    with torch.inference_mode():
        c = torch_stats([x.half()])
    np.testing.assert_allclose(a.floats, b.floats)
    assert c.n.tolist() == [1000]
