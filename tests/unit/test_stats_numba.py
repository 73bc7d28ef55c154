"""The numba kernels against a float64 numpy reference, and inside the torch hook's reductions."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("numba")
torch = pytest.importorskip("torch")

from tensorpulse.producers import stats_numba, stats_torch  # noqa: E402


def reference(x: np.ndarray) -> list[float]:
    f = x.astype(np.float64).ravel()
    with np.errstate(all="ignore"):
        return [f.sum(), (f * f).sum(), f.min(), f.max(), np.abs(f).sum(), float(np.count_nonzero(f))]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 40_003])
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
        host, _ = stats_torch.transfer(stats)
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
