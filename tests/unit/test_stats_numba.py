"""The numba kernels against a float64 numpy reference, and inside the torch hook's reductions."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("numba")
torch = pytest.importorskip("torch")

from tensorpulse.producers import deltas_torch, stats_fused, stats_host, stats_numba, stats_torch  # noqa: E402


def reference(x: np.ndarray) -> list[float]:
    f = x.astype(np.float64).ravel()
    with np.errstate(all="ignore"):
        return [f.sum(), (f * f).sum(), f.min(), f.max(), np.abs(f).sum(), float(np.count_nonzero(f))]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 64, 65, 1000, 40_003])
def test_moments_match_the_float64_reference(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(3.0, 2.0, n).astype(np.float32)
    x[:: max(1, n // 7)] = 0.0
    got = stats_numba.moments([x])[0]
    want = reference(x)
    assert got[2:4].tolist() == want[2:4]  # min and max exactly
    assert got[5] == want[5]  # the non-zero count exactly
    for g, w in zip(got[[0, 1, 4]], [want[0], want[1], want[4]], strict=True):
        assert g == pytest.approx(w, rel=1e-5)


def test_tensors_longer_than_a_chunk_are_combined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats_numba, "CHUNK", 64)
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    x[500] = np.float32(-7.5)
    x[999] = np.float32(9.25)
    got = stats_numba.moments([x])[0]
    want = reference(x)
    assert got[2:4].tolist() == [-7.5, 9.25]
    assert got[5] == want[5]
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    x[10] = np.nan
    assert math.isnan(stats_numba.moments([x])[0][2]), "a NaN in any chunk makes the minimum NaN"


def test_nan_makes_min_and_max_nan_but_infinities_alone_do_not() -> None:
    x = np.array([1.0, -2.0, np.nan, 0.0] * 10, dtype=np.float32)
    got = stats_numba.moments([x])[0]
    assert math.isnan(got[0]) and math.isnan(got[2]) and math.isnan(got[3])
    y = np.array([1.0, -np.inf, np.inf, 0.0] * 10, dtype=np.float32)
    got = stats_numba.moments([y])[0]
    assert got[2] == -math.inf and got[3] == math.inf
    assert math.isnan(got[0]) and got[5] == 30


@pytest.mark.parametrize("shape", [(7, 33), (5, 3, 4, 6)])
@pytest.mark.parametrize("rng_", [(0.0, math.inf), (-0.5, 0.5)])
def test_active_counts_match_a_brute_force_count(shape: tuple[int, ...], rng_: tuple[float, float]) -> None:
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    x.reshape(-1)[::5] = 0.0
    x.reshape(-1)[3] = np.nan
    lo, hi = rng_
    axes = (0, *range(2, x.ndim))
    want = ((x > lo) & (x < hi)).sum(axis=axes)
    assert stats_numba.active_counts(x, lo, hi).tolist() == want.tolist()


def test_the_hook_reductions_agree_with_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights, gradients and activations: fused kernels and torch ops give the same columns."""
    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(512, 33, generator=g),
        torch.randn(10, generator=g) + 100.0,  # mean >> spread: the cancellation check
        torch.zeros(64),
        torch.relu(torch.randn(128, 40, generator=g)),
        torch.tensor([1.0, float("nan"), 0.0, float("inf")] * 8),
    ]
    act = torch.relu(torch.randn(64, 20, generator=g))

    def columns():
        stats = stats_torch.reduce_many(tensors)
        stats.append(stats_torch.reduce_on_device(act, activity=True, exact_nonfinite=True))
        host, _ = stats_host.transfer(stats)
        return host.finish()

    monkeypatch.setenv("TENSORPULSE_NUMBA", "0")
    torch_cols = columns()
    monkeypatch.setenv("TENSORPULSE_NUMBA", "1")
    fused_cols = columns()
    assert fused_cols.zeros.tolist() == torch_cols.zeros.tolist()
    assert fused_cols.nan.tolist() == torch_cols.nan.tolist()
    assert fused_cols.inf.tolist() == torch_cols.inf.tolist()
    assert fused_cols.activity == torch_cols.activity
    np.testing.assert_allclose(fused_cols.floats, torch_cols.floats, rtol=1e-5, atol=1e-6)


def test_the_kernel_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORPULSE_NUMBA", "0")
    assert not stats_numba.enabled()
    monkeypatch.setenv("TENSORPULSE_NUMBA", "1")
    assert stats_numba.enabled()


def test_one_batch_call_gives_each_tensors_moments_and_activity() -> None:
    rng = np.random.default_rng(5)
    arrays = [rng.normal(size=n).astype(np.float32) for n in (3, 1000, 65)]
    act2 = rng.normal(size=(9, 7)).astype(np.float32)
    act4 = rng.normal(size=(4, 3, 2, 5)).astype(np.float32)
    m, counts = stats_numba.batch(arrays, [(act2, 0.0, math.inf), (act4, -0.5, 0.5)])
    for row, x in zip(m, arrays, strict=True):
        np.testing.assert_allclose(row, stats_numba.moments([x])[0], rtol=1e-12)
    assert counts[0].tolist() == (act2 > 0).sum(axis=0).tolist()
    assert counts[1].tolist() == ((act4 > -0.5) & (act4 < 0.5)).sum(axis=(0, 2, 3)).tolist()


def _wire(host: stats_host.HostStats):
    cols = host.finish()
    return cols.floats, cols.zeros.tolist(), cols.nan.tolist(), cols.inf.tolist(), cols.activity


def test_the_lean_host_path_matches_reduce_many_and_transfer() -> None:
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(300, 7, generator=g), torch.zeros(5), torch.relu(torch.randn(64, 20, generator=g))]
    active = [None, None, (0.0, math.inf)]
    lean = stats_fused.reduce_host_fused(tensors, active)
    assert lean is not None
    stats = stats_torch.reduce_many(tensors[:2])
    stats.append(stats_torch.reduce_on_device(tensors[2], activity=True, exact_nonfinite=True))
    general, _ = stats_host.transfer(stats)
    got, want = _wire(lean), _wire(general)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
    assert got[1:] == want[1:]


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([1.0, float("nan"), 2.0]),  # exact nan counts: the torch path
        torch.tensor([1.0, float("inf")]),
        torch.full((100,), 1e4) + torch.arange(100) * 1e-3,  # mean >> spread: cancellation
        torch.randn(6, 4).t(),  # not contiguous
        torch.randn(5, dtype=torch.float64),
        torch.zeros(0),
        torch._neg_view(torch.randn(5)),  # lazily negated: memory and values differ in sign
        torch.randn(4, 4).to_sparse(),
    ],
)
def test_the_lean_host_path_declines_what_needs_the_torch_path(bad: torch.Tensor) -> None:
    assert stats_fused.reduce_host_fused([torch.randn(10), bad]) is None


def test_weight_deltas_by_the_kernel_match_the_torch_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(6)
    before = [torch.randn(1000, generator=g), torch.randn(33, 3, generator=g)]
    after = [b + 1e-3 * torch.randn(b.shape, generator=g) for b in before]
    after[1][0, 0] = float("nan")

    def deltas(numba: str) -> list[list[float]]:
        monkeypatch.setenv("TENSORPULSE_NUMBA", numba)
        tracker = deltas_torch.DeltaTracker(1e-3, 0.0)
        keys = ["a", "b"]
        tracker.track(1, keys, before, [stats_torch.DeviceStats(n=t.numel()) for t in before])
        stats = [stats_torch.DeviceStats(n=t.numel()) for t in after]
        tracker.track(2, keys, after, stats)
        rows = [s.delta.tolist() for s in stats]
        # the copy now holds `after`: the next delta against it is zero
        again = [stats_torch.DeviceStats(n=t.numel()) for t in after]
        tracker.track(3, keys, after, again)
        assert again[0].delta.tolist()[0] == 0.0
        return rows

    want, got = deltas("0"), deltas("1")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert math.isnan(got[1][0]) and math.isnan(got[1][2]) and math.isnan(want[1][2])


def test_weight_deltas_are_combined_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(7).normal(size=1000).astype(np.float32)
    p = (x + 0.01).astype(np.float32)
    p[777] = 5.0
    p1 = p.copy()  # the kernel reads by address: the copy must outlive the call
    whole = stats_numba.deltas_at([x.ctypes.data], [p1.ctypes.data], [1000], 1e-3)
    monkeypatch.setattr(stats_numba, "CHUNK", 64)
    q = p.copy()
    parts = stats_numba.deltas_at([x.ctypes.data], [q.ctypes.data], [1000], 1e-3)
    np.testing.assert_allclose(parts, whole, rtol=1e-5)
    assert q.tolist() == x.tolist(), "the copy is updated to the current values"
    d = x.astype(np.float64) - p
    assert parts[0, 2] == pytest.approx((np.abs(d) - 1e-3 * np.abs(p)).max(), rel=1e-6)


def test_the_kernel_s_own_wire_columns_equal_those_numpy_computes_from_its_sums() -> None:
    import dataclasses

    g = torch.Generator().manual_seed(8)
    tensors = [torch.randn(500, generator=g) * 3 + 1, torch.relu(torch.randn(32, 16, 3, generator=g)), torch.arange(7.0)]
    host = stats_fused.reduce_host_fused(tensors, [None, (0.0, math.inf), None])
    assert host is not None and host.finished is not None
    by_numpy = dataclasses.replace(host, finished=None).finish()
    np.testing.assert_array_equal(host.finished.floats, by_numpy.floats)
    np.testing.assert_array_equal(host.finished.zeros, by_numpy.zeros)
    assert host.finished.nan.tolist() == by_numpy.nan.tolist() == [0, 0, 0]
    assert host.finished.activity == by_numpy.activity and set(host.finished.activity) == {1}


def test_a_reused_plan_gives_each_call_its_own_results_on_each_thread() -> None:
    import threading

    g = torch.Generator().manual_seed(9)
    x = torch.relu(torch.randn(64, 8, generator=g))
    first = [x, torch.arange(10, dtype=torch.float32)]
    second = [-x, torch.arange(10, dtype=torch.float32) * 2]
    active = [(0.0, math.inf), None]
    a = stats_fused.reduce_host_fused(first, active)
    b = stats_fused.reduce_host_fused(second, active)  # same layout: the same plan
    assert a is not None and b is not None
    mean = float(x.double().mean())
    assert a.finish().floats[:, 0] == pytest.approx([mean, 4.5])  # not overwritten by the second call
    assert b.finish().floats[:, 0] == pytest.approx([-mean, 9.0])
    assert a.activity[0][1:] != b.activity[0][1:]  # all units active, then none
    other: list[stats_host.HostStats | None] = []
    t = threading.Thread(target=lambda: other.append(stats_fused.reduce_host_fused(second, active)))
    t.start()
    t.join()
    assert other[0] is not None and other[0].finish().floats.tolist() == b.finish().floats.tolist()


def test_a_second_process_loads_the_kernels_from_numba_cache_instead_of_compiling(tmp_path) -> None:
    """Compiling the kernels took most of the hook's start-up: every kernel a job calls is cached
    (the ones they call are compiled into them)."""
    import json
    import os
    import subprocess
    import sys

    probe = (
        "import json; from tensorpulse.producers import stats_numba as s; s._get(); "
        "ks = {'batch': s._kbatch, 'host': s._host_kernel, 'deltas': s._kdeltas}; "
        "print(json.dumps({k: [len(d.stats.cache_hits), len(d.stats.cache_misses)] for k, d in ks.items()}))"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def run() -> dict[str, list[int]]:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert all(misses > 0 for _, misses in first.values()), first  # an empty cache: compiled
    assert all(hits > 0 and misses == 0 for hits, misses in second.values()), second
