"""Each per-tensor statistic declared once: its name, wire key, type, reference and how parts combine.

Why one table: a statistic used to be written down in the codec, the numpy path, the torch path,
the numba kernels and every reader, agreeing only because tests compared them. Here each one is
a `Statistic`: the name it has on `wire.TensorStats` (the readers' accessor is `getattr(t, name)`),
where it travels on the wire, its float64 numpy reference over the whole tensor, and how the
statistics of parts of one tensor combine into those of the whole (`combine`: FSDP shards of a
parameter, or several steps of one tensor pooled). The codec's float columns (`wire.FLOAT_COLUMNS`)
and the numpy backend (`producers/stats_numpy.py`) are derived from it; the torch path and the
numba kernels are checked against `reference` by `tests/unit/test_statistics.py`.

Conventions every backend follows: statistics cover every element (population std, ddof=0);
they follow IEEE arithmetic (one NaN makes mean, std, min, max and abs_mean NaN; an inf makes
mean and abs_mean infinite and std NaN); nan, inf and zeros are exact counts (NaN is not zero);
an empty tensor has n = 0 and every statistic 0. Values that are finite but whose float64 sums
overflow (|x| near 1e308) are rescaled, so a finite tensor never reads inf or NaN. Backends that
accumulate in float32 lanes also redo, scaled or in float64, the squares of a tensor whose
non-zero elements have a mean |x| below `FLOAT32_TINY`: squares of values below ~1e-19 are
subnormal or 0 in float32.

This module imports nothing of the codec, so the codec can import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from fractions import Fraction
from typing import Any, Literal

import numpy as np

#: What a statistic is on the wire: "f" a column of the float32 matrix, "n"/"z" an integer array,
#: "nf"/"q"/"d" a sparse map by tensor row, "" derived by readers from the others (not sent).
WireKey = Literal["n", "f", "z", "nf", "q", "d", "act", ""]
#: Upper edges of the per-unit activity histogram (fraction of samples in which a unit is > 0).
ACTIVITY_EDGES = (0.001, 0.01, 0.05, 0.1, 0.5)
#: Mean |x| of a tensor's non-zero elements below which float32 lanes recompute its sum of
#: squares. Why this bound: a square that underflows float32 is off by at most 2**-150, and
#: sum x² >= (sum |x|)² / nonzero, so above the bound the sum of squares is off by at most
#: 2**-150 / FLOAT32_TINY**2 = 2**-50 of itself from underflow; and no tensor of ordinary values
#: pays for a second pass. Checked as sum |x| < FLOAT32_TINY * nonzero from the first pass's sums.
#: Compiled into producers/stats_numba.py's cached kernels, whose numba cache follows that file
#: only: change that file too (a comment will do) when changing this value.
FLOAT32_TINY = 2.0**-50


@dataclass(frozen=True, slots=True)
class Statistic:
    """One per-tensor statistic. `name` is its attribute on `wire.TensorStats`."""

    name: str
    #: Python type a reader gets (int for exact counts, float otherwise).
    dtype: type
    #: Wire key (see WireKey) and, for "f" and "nf", the column inside it.
    wire: WireKey
    column: int | None
    #: The float64 numpy reference over the whole tensor (a float64 array of the tensor's shape,
    #: possibly empty).
    reference: Callable[[np.ndarray], Any]
    #: How the statistics of parts of one tensor (shards, or steps pooled) give the whole one's;
    #: None: not combinable, and `instead` says what a combined record shows.
    combines: str | None
    instead: str = ""
    #: Across steps of one tensor: "latest" (readers take the newest value; rules that compare
    #: steps keep what they need in their state) unless it says otherwise.
    steps: str = "latest"
    doc: str = ""

    @property
    def derived(self) -> bool:
        """Computed by readers from the sent statistics (`TensorStats` properties), never sent."""
        return self.wire == ""


# --- float64 references ---------------------------------------------------------------------


def _finite_scale(x: np.ndarray) -> float | None:
    """The largest magnitude of `x` when every element is finite (the rescale), else None."""
    if not np.isfinite(x).all():
        return None
    scale = float(np.max(np.abs(x)))
    return scale or None


def _moment(x: np.ndarray, f: Callable[[np.ndarray], Any]) -> float:
    """f(x) in float64; for finite elements whose sums overflow, scale * f(x / scale)."""
    if x.size == 0:
        return 0.0
    x = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        v = float(f(x))
        if not math.isfinite(v):
            scale = _finite_scale(x)
            if scale is not None:
                v = float(f(x / scale)) * scale
    return v


def ref_mean(x: np.ndarray) -> float:
    return _moment(x, np.mean)


def ref_std(x: np.ndarray) -> float:
    return _moment(x, np.std)


def ref_variance(x: np.ndarray) -> float:
    std = ref_std(x)
    return std * std  # inf past 1e154, where std ** 2 would raise


def ref_abs_mean(x: np.ndarray) -> float:
    return _moment(x, lambda y: np.abs(y).mean())


def ref_min(x: np.ndarray) -> float:
    return float(x.min()) if x.size else 0.0


def ref_max(x: np.ndarray) -> float:
    return float(x.max()) if x.size else 0.0


def ref_l2(x: np.ndarray) -> float:
    return _moment(x, lambda y: np.sqrt(np.dot(y, y)))


def ref_quantiles(x: np.ndarray, max_samples: int = 16384) -> tuple[float, float] | None:
    """Nearest-rank (p5, p95) of a strided subsample of at most `max_samples` elements."""
    if x.size == 0:
        return None
    x = x.reshape(-1)
    if x.size > max_samples:
        x = x[:: -(-x.size // max_samples)]
    with np.errstate(invalid="ignore"):
        p5, p95 = np.quantile(x, (0.05, 0.95), method="nearest")
    return float(p5), float(p95)


def ref_activity(x: np.ndarray) -> tuple[int, ...] | None:
    """(units, units active (> 0) in fewer than each ACTIVITY_EDGES fraction of samples); unit =
    axis 1, sample = every other index; None below 2 dimensions or when empty. Exact fractions."""
    if x.ndim < 2 or x.shape[1] == 0 or x.size == 0:
        return None
    units = x.shape[1]
    samples = x.size // units
    active = np.count_nonzero(np.moveaxis(x, 1, 0).reshape(units, -1) > 0, axis=1)
    edges = [Fraction(str(e)) for e in ACTIVITY_EDGES]
    return (units, *(sum(1 for c in active.tolist() if Fraction(c, samples) < e) for e in edges))


def _count(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], int]:
    return lambda x: int(np.count_nonzero(f(x)))


# --- combining parts of one tensor ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Combined:
    """The sent statistics of a whole tensor, combined from its parts (see `combine_parts`)."""

    n: int
    mean: float
    std: float
    min: float
    max: float
    abs_mean: float
    zeros: int
    nan: int
    inf: int
    #: (prev_step, update_l2, prev_l2, allclose_excess or None), or None (see `combine_deltas`).
    delta: tuple[int, float, float, float | None] | None


def combine_moments(parts: Sequence[tuple[int, float, float, float]]) -> tuple[float, float, float]:
    """(mean, std, abs_mean) of a whole from (n, mean, std, abs_mean) of its parts.

    Pooled (Chan et al.): mean = sum(n_i mean_i) / N, var = sum(n_i (std_i² + (mean_i - mean)²)) / N,
    computed on values divided by the largest finite magnitude so 1e30 or 1e300 do not overflow.
    Empty parts count for nothing; no elements at all gives 0, 0, 0. NaN and inf propagate as
    they would over the whole tensor (a part with an inf has mean ±inf and std NaN).
    """
    live = [(n, m, s, a) for n, m, s, a in parts if n > 0]
    total = sum(n for n, _, _, _ in live)
    if total == 0:
        return 0.0, 0.0, 0.0
    finite = [abs(v) for _, m, s, a in live for v in (m, s, a) if math.isfinite(v)]
    scale = max(finite, default=0.0) or 1.0
    # Deviations from the first finite part mean: parts with equal means (a constant tensor) give
    # exactly 0, where subtracting the pooled mean would leave its rounding error.
    pivot = next((m / scale for _, m, _, _ in live if math.isfinite(m)), 0.0)
    # plain sums, not math.fsum: fsum raises on inf - inf, where the whole tensor's mean is NaN
    shift = sum((n / total) * (m / scale - pivot) for n, m, _, _ in live)
    abs_mean = sum((n / total) * (a / scale) for n, _, _, a in live)
    mean = pivot + shift
    if not math.isfinite(mean):
        return mean * scale, math.nan, abs_mean * scale
    var = sum(
        (n / total) * ((s / scale) * (s / scale) + (m / scale - pivot - shift) ** 2) for n, m, s, _ in live
    )
    return mean * scale, math.sqrt(var) * scale, abs_mean * scale


def combine_extreme(values: Sequence[float], pick: Callable[[Sequence[float]], float]) -> float:
    """min or max over the parts' min or max; NaN if any part's is NaN (as over the whole)."""
    if not values:
        return 0.0
    if any(math.isnan(v) for v in values):
        return math.nan
    return float(pick(values))


def combine_deltas(
    parts: Sequence[tuple[int, float, float, float | None] | None],
) -> tuple[int, float, float, float | None] | None:
    """The whole tensor's change from its parts' (prev_step, ||Δ||, ||w_prev||, allclose excess).

    Norms combine as sqrt(sum of squares) and the excess as the largest (allclose holds for the
    whole iff for every part). None unless every part has one for the same previous step; the
    excess is None (an estimate, as for a sketched delta) if any part's is.
    """
    if not parts or any(d is None for d in parts):
        return None
    steps = {d[0] for d in parts if d is not None}
    if len(steps) != 1:
        return None
    ds = [d for d in parts if d is not None]
    update = math.hypot(*(d[1] for d in ds))
    prev = math.hypot(*(d[2] for d in ds))
    excess = None if any(d[3] is None for d in ds) else max(d[3] for d in ds if d[3] is not None)
    return steps.pop(), update, prev, excess


def combine_parts(parts: Sequence[Any]) -> Combined:
    """Statistics of a whole tensor from those of disjoint parts of it (shards, or steps pooled).

    `parts` are anything with the sent statistics as attributes (n, mean, std, min, max, abs_mean,
    zeros, nan, inf, and optionally delta as a `wire.Delta` or a tuple), e.g. `wire.TensorStats`.
    What does not combine (quantiles, activity) is left out: see each Statistic's `instead`.
    """
    live = [p for p in parts if p.n > 0]
    mean, std, abs_mean = combine_moments([(p.n, p.mean, p.std, p.abs_mean) for p in live])
    deltas = [_delta_tuple(getattr(p, "delta", None)) for p in parts]
    return Combined(
        n=sum(p.n for p in parts),
        mean=mean,
        std=std,
        min=combine_extreme([p.min for p in live], min),
        max=combine_extreme([p.max for p in live], max),
        abs_mean=abs_mean,
        zeros=sum(p.zeros for p in parts),
        nan=sum(p.nan for p in parts),
        inf=sum(p.inf for p in parts),
        delta=combine_deltas(deltas),
    )


def combine(parts: Sequence[Any], **fields: Any) -> Any:
    """A `wire.TensorStats` (the type of `parts[0]`) for the whole tensor the `parts` are shards of.

    Name and collection are those of the first part unless given in `fields`; quantiles and
    activity are None (not combinable), and so is `shard`; `fields` overrides anything else.
    """
    if not parts:
        raise ValueError("combine needs at least one part")
    c = combine_parts(parts)
    delta = None
    if c.delta is not None:
        delta = type(parts[0].delta)(*c.delta) if _is_dataclass_delta(parts[0].delta) else c.delta
    values = {
        "n": c.n,
        "mean": c.mean,
        "std": c.std,
        "min": c.min,
        "max": c.max,
        "abs_mean": c.abs_mean,
        "zeros": c.zeros,
        "nan": c.nan,
        "inf": c.inf,
        "activity": None,
        "quantiles": None,
        "delta": delta,
    }
    if "shard" in {f.name for f in dataclass_fields(parts[0])}:
        values["shard"] = None  # the whole tensor is no shard
    values.update(fields)
    return replace(parts[0], **values)


def _delta_tuple(d: Any) -> tuple[int, float, float, float | None] | None:
    if d is None:
        return None
    if isinstance(d, tuple):
        return d
    return (d.prev_step, d.update_l2, d.prev_l2, d.allclose_excess)


def _is_dataclass_delta(d: Any) -> bool:
    return d is not None and not isinstance(d, tuple)


# --- the declarations -----------------------------------------------------------------------

_SENT: tuple[Statistic, ...] = (
    Statistic(
        "n",
        int,
        "n",
        None,
        lambda x: int(x.size),
        "sum",
        doc="number of elements",
    ),
    Statistic(
        "mean",
        float,
        "f",
        0,
        ref_mean,
        "pooled: sum(n_i mean_i) / N",
        steps="latest; pooled over steps like shards",
        doc="arithmetic mean",
    ),
    Statistic(
        "std",
        float,
        "f",
        1,
        ref_std,
        "pooled variance (Chan): sum(n_i (std_i² + (mean_i - mean)²)) / N",
        steps="latest; pooled over steps like shards",
        doc="population standard deviation (ddof=0)",
    ),
    Statistic("min", float, "f", 2, ref_min, "min of the parts' min (NaN if any is)", doc="smallest element"),
    Statistic("max", float, "f", 3, ref_max, "max of the parts' max (NaN if any is)", doc="largest element"),
    Statistic(
        "abs_mean",
        float,
        "f",
        4,
        ref_abs_mean,
        "pooled: sum(n_i abs_mean_i) / N",
        steps="latest; pooled over steps like shards",
        doc="mean of |x|",
    ),
    Statistic(
        "zeros", int, "z", None, _count(lambda x: x == 0), "sum", doc="elements equal to 0 (NaN is not)"
    ),
    Statistic("nan", int, "nf", 0, _count(np.isnan), "sum", steps="latest", doc="NaN elements"),
    Statistic("inf", int, "nf", 1, _count(np.isinf), "sum", steps="latest", doc="±inf elements"),
    Statistic(
        "quantiles",
        tuple,
        "q",
        None,
        ref_quantiles,
        None,
        instead="None: a quantile of the whole is not a function of the parts' quantiles",
        doc="nearest-rank (p5, p95) of a strided subsample, where the producer asked for them",
    ),
    Statistic(
        "activity",
        tuple,
        "act",
        None,
        ref_activity,
        None,
        instead="None: activity is captured for activations, which are not sharded",
        doc="(units, units active in fewer than each ACTIVITY_EDGES fraction of samples), for "
        "activations (unit = axis 1)",
    ),
    Statistic(
        "delta",
        tuple,
        "d",
        None,
        lambda x: None,
        "norms: sqrt(sum of squares); excess: max; same prev_step",
        steps="not combinable: ||w_t - w_s|| is not a function of the per-step changes",
        doc="(prev_step, ||w - w_prev||, ||w_prev||, allclose excess) where the hook tracks it; "
        "its reference is stats_numpy.numpy_delta",
    ),
)

_DERIVED: tuple[Statistic, ...] = (
    Statistic(
        "l2", float, "", None, ref_l2, "from the combined n, mean and std", doc="sqrt(n (std² + mean²))"
    ),
    Statistic("variance", float, "", None, ref_variance, "from the combined std", doc="std²"),
    Statistic(
        "zero_frac",
        float,
        "",
        None,
        lambda x: (int(np.count_nonzero(x == 0)) / x.size) if x.size else 0.0,
        "from the combined zeros and n",
        doc="zeros / n (0 when empty)",
    ),
    Statistic(
        "nonfinite",
        int,
        "",
        None,
        _count(lambda x: ~np.isfinite(x)),
        "from the combined nan and inf",
        doc="nan + inf",
    ),
)

#: Every per-tensor statistic, sent ones first in wire order.
STATISTICS: tuple[Statistic, ...] = _SENT + _DERIVED
BY_NAME: dict[str, Statistic] = {s.name: s for s in STATISTICS}
#: Names of the float32 matrix `f`'s columns, in wire order (wire.FLOAT_COLUMNS).
FLOAT_COLUMNS: tuple[str, ...] = tuple(
    s.name for s in sorted(_SENT, key=lambda s: s.column or 0) if s.wire == "f"
)
#: Scalar statistics a reader can compare or plot (not the tuples: quantiles, activity, delta).
SCALAR_NAMES: tuple[str, ...] = tuple(s.name for s in STATISTICS if s.dtype in (int, float))


def get(name: str) -> Statistic:
    """The declaration of `name`; KeyError names the declared ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a declared statistic; declared: {', '.join(BY_NAME)}") from None


def reference(x: Any) -> dict[str, Any]:
    """Every declared statistic of one tensor (anything np.asarray takes), in float64."""
    a = np.asarray(x, dtype=np.float64)
    return {s.name: s.reference(a) for s in STATISTICS}
