"""Statistics of parts of one tensor (FSDP shards) combine into those of the whole tensor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensorpulse import statistics as S
from tensorpulse.wire import Delta, TensorStats

INF, NAN = math.inf, math.nan


def stats_of(x: np.ndarray, delta: Delta | None = None) -> TensorStats:
    """TensorStats of `x` as the float64 reference gives them."""
    r = S.reference(x)
    sent = {k: r[k] for k in ("n", "mean", "std", "min", "max", "abs_mean", "zeros", "nan", "inf")}
    return TensorStats("w", "weights", **sent, quantiles=r["quantiles"], delta=delta)


#: Subnormal results carry a few significant bits: compared to within a few of the smallest one.
SUBNORMAL_ATOL = 4 * 5e-324


def assert_same(got: TensorStats, want: dict, rtol: float = 1e-12) -> None:
    """Counts exact; floats within rtol of the tensor's scale (NaN where NaN, inf where inf)."""
    for key in ("n", "zeros", "nan", "inf"):
        assert getattr(got, key) == want[key], key
    finite = [abs(want[k]) for k in ("mean", "std", "abs_mean") if math.isfinite(want[k])]
    scale = max(finite, default=0.0)
    for key in ("mean", "std", "min", "max", "abs_mean"):
        have, ref = getattr(got, key), want[key]
        if math.isnan(ref) or math.isinf(ref):
            assert have == ref or (math.isnan(have) and math.isnan(ref)), (key, have, ref)
        else:
            assert have == pytest.approx(ref, rel=rtol, abs=max(rtol * scale, SUBNORMAL_ATOL)), (
                key,
                have,
                ref,
            )
    for key in ("l2", "variance", "zero_frac", "nonfinite"):
        ref = want[key]
        # Past 1e154 the rounding of a combined std (1e-16 of the mean) squares to an infinite variance.
        if math.isfinite(ref) and not (key == "variance" and scale > 1e154):
            assert getattr(got, key) == pytest.approx(ref, rel=1e-9, abs=1e-9 * want["l2"]), key


rng = np.random.default_rng(7)
CASES = {
    "random": rng.normal(3.0, 2.0, 1001),
    "constant": np.full(64, 0.25),
    "empty": np.zeros(0),
    "all_nan": np.full(9, NAN),
    "some_nan": np.array([1.0, 2.0, NAN, 4.0, 5.0]),
    "inf_one_side": np.array([INF, 1.0, 2.0, 3.0, 0.0]),
    "inf_both_sides": np.array([1.0, INF, -INF, 0.0]),
    "huge": rng.normal(0.0, 1.0, 200) * 1e30,
    "near_float64_max": np.full(8, 1e300),
    "subnormal": np.full(10, 5e-324) * rng.integers(0, 3, 10),
    "zeros_and_signs": np.array([0.0, -0.0, 1.0, -1.0, 0.0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cuts", [(0,), (1,), (3, 3), (2, 5, 7)])
def test_shards_combine_into_the_whole_tensor(case, cuts):
    """combine() of the parts' statistics equals the reference over the whole tensor, empty parts included."""
    x = CASES[case]
    bounds = [0, *(min(c, x.size) for c in cuts), x.size]
    parts = [stats_of(x[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    got = S.combine(parts)
    assert_same(got, S.reference(x), rtol=1e-9)
    assert got.quantiles is None and got.activity is None  # declared not combinable
    assert (got.name, got.collection) == ("w", "weights")


def test_combining_one_part_changes_nothing_that_is_sent():
    """One shard is the whole tensor: its sent statistics come back unchanged."""
    x = CASES["random"]
    one = stats_of(x)
    got = S.combine([one])
    for s in S.STATISTICS:
        if s.wire in ("n", "f", "z", "nf"):
            assert getattr(got, s.name) == getattr(one, s.name), s.name


def test_deltas_combine_as_norms_of_the_whole_change():
    """||Δ|| and ||w_prev|| of the whole are the root sum of squares of the parts'; the excess is the largest."""
    w = rng.normal(size=100)
    prev = w + rng.normal(scale=1e-3, size=100)
    parts = [
        stats_of(
            w[a:b],
            Delta(4, float(np.linalg.norm(w[a:b] - prev[a:b])), float(np.linalg.norm(prev[a:b])), -float(a)),
        )
        for a, b in ((0, 30), (30, 100))
    ]
    d = S.combine(parts).delta
    assert isinstance(d, Delta) and d.prev_step == 4 and d.allclose_excess == 0.0
    assert d.update_l2 == pytest.approx(np.linalg.norm(w - prev), rel=1e-12)
    assert d.prev_l2 == pytest.approx(np.linalg.norm(prev), rel=1e-12)


@pytest.mark.parametrize(
    "deltas, expect",
    [
        ([(1, 3.0, 4.0, -1.0), None], None),  # a part without one: unknown
        ([(1, 3.0, 4.0, -1.0), (2, 3.0, 4.0, -1.0)], None),  # different previous steps
        ([(1, 3.0, 0.0, -1.0), (1, 4.0, 0.0, None)], (1, 5.0, 0.0, None)),  # a sketched part: an estimate
    ],
)
def test_deltas_that_do_not_describe_one_change_do_not_combine(deltas, expect):
    """A delta combines only when every part has one from the same previous step."""
    assert S.combine_deltas(deltas) == expect


def test_combine_refuses_no_parts():
    """There is no whole tensor without a part."""
    with pytest.raises(ValueError, match="at least one part"):
        S.combine([])


def test_each_declaration_says_how_it_combines_or_what_is_shown_instead():
    """Every statistic declares its shard combination, or why it has none and what a combined record shows."""
    for s in S.STATISTICS:
        assert s.combines or s.instead, s.name
    assert [s.name for s in S.STATISTICS if s.combines is None] == ["quantiles", "activity"]
