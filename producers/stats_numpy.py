"""Framework-neutral tensor statistics (numpy, float64), and the column set both backends produce.

Used for anything with `__array__` (numpy arrays, lists, JAX/TF tensors on host) and as the
reference the torch backend is tested against. Semantics, shared with stats_torch:

- statistics cover every element; mean/std/min/max/abs_mean follow IEEE arithmetic, so one NaN
  makes them NaN and an inf makes mean/abs_mean infinite (std is then NaN, as in numpy);
- std is the population std (ddof=0);
- nan and inf counts are exact; `zeros` counts elements equal to 0 (NaN is not zero);
- an empty tensor has n=0 and every statistic 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from tensorpulse.wire import ACTIVITY_EDGES, FLOAT_COLUMNS, TensorBlock

_K = len(FLOAT_COLUMNS)


@dataclass(slots=True)
class Columns:
    """Per-tensor statistics in wire order, one row per tensor (what a TensorBlock needs)."""

    n: np.ndarray  # int64 [K]
    floats: np.ndarray  # float64 [K, 5]: mean, std, min, max, abs_mean
    zeros: np.ndarray  # int64 [K]
    nan: np.ndarray  # int64 [K]
    inf: np.ndarray  # int64 [K]
    activity: dict[int, tuple[int, ...]] = field(default_factory=dict)
    quantiles: dict[int, tuple[float, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.n)

    @classmethod
    def empty(cls) -> Columns:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, np.zeros((0, _K)), z.copy(), z.copy(), z.copy())

    @classmethod
    def concat(cls, parts: Sequence[Columns]) -> Columns:
        """Rows of all `parts` in order (sparse columns re-indexed)."""
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        activity: dict[int, tuple[int, ...]] = {}
        quantiles: dict[int, tuple[float, float]] = {}
        offset = 0
        for p in parts:
            activity.update({offset + i: v for i, v in p.activity.items()})
            quantiles.update({offset + i: v for i, v in p.quantiles.items()})
            offset += len(p)
        return cls(
            np.concatenate([p.n for p in parts]),
            np.concatenate([p.floats for p in parts]),
            np.concatenate([p.zeros for p in parts]),
            np.concatenate([p.nan for p in parts]),
            np.concatenate([p.inf for p in parts]),
            activity,
            quantiles,
        )

    def to_block(self, names: Sequence[str], collections: Sequence[str]) -> TensorBlock:
        """The wire's TensorBlock for these rows."""
        if len(names) != len(self) or len(collections) != len(self):
            raise ValueError(f"{len(names)} names / {len(collections)} collections for {len(self)} rows")
        with np.errstate(over="ignore", invalid="ignore"):
            floats = self.floats.astype(np.float32)
        return TensorBlock(
            names=list(names),
            collections=list(collections),
            n=self.n,
            floats=floats,
            zeros=self.zeros,
            nan=self.nan if self.nan.any() else None,
            inf=self.inf if self.inf.any() else None,
            activity=self.activity,
            quantiles=self.quantiles,
        )


def activity_thresholds(samples: int) -> list[int]:
    """Integer count thresholds: a unit active in `c` of `samples` is below edge e iff c < thr.

    c / samples < e  <=>  c < e * samples  <=>  c < ceil(e * samples) for integer c; computed
    with exact fractions so both backends and any reference agree at the edges.
    """
    return [math.ceil(Fraction(str(e)) * samples) for e in ACTIVITY_EDGES]


def activity_from_counts(active: np.ndarray, samples: int) -> tuple[int, ...]:
    """(units, units below each ACTIVITY_EDGES edge) from per-unit counts of samples > 0."""
    units = int(active.shape[0])
    return (units, *(int(np.count_nonzero(active < t)) for t in activity_thresholds(samples)))


def _activity(x: np.ndarray) -> tuple[int, ...] | None:
    if x.ndim < 2 or x.shape[1] == 0 or x.size == 0:
        return None
    axes = (0, *range(2, x.ndim))
    active = np.count_nonzero(x > 0, axis=axes)
    return activity_from_counts(np.asarray(active), x.size // x.shape[1])


def _quantiles(flat: np.ndarray, max_samples: int) -> tuple[float, float]:
    if flat.size > max_samples:
        flat = flat[:: -(-flat.size // max_samples)]
    with np.errstate(invalid="ignore"):
        p5, p95 = np.quantile(flat, (0.05, 0.95), method="nearest")
    return float(p5), float(p95)


def _row(flat: np.ndarray) -> tuple[list[float], int, int, int]:
    """[mean, std, min, max, abs_mean], zeros, nan, inf of a flat float64 array."""
    nan = int(np.count_nonzero(np.isnan(flat)))
    inf = int(np.count_nonzero(np.isinf(flat)))
    zeros = int(np.count_nonzero(flat == 0))
    with np.errstate(over="ignore", invalid="ignore"):
        mn, mx = float(flat.min()), float(flat.max())
        mean = float(flat.mean())
        std = float(flat.std())
        abs_mean = float(np.abs(flat).mean())
        if nan == 0 and inf == 0 and not (math.isfinite(mean) and math.isfinite(std)):
            # Finite but huge (float64 sums overflowed): rescale by the largest magnitude.
            scale = max(abs(mn), abs(mx))
            y = flat / scale
            mean, std, abs_mean = (
                float(y.mean()) * scale,
                float(y.std()) * scale,
                float(np.abs(y).mean()) * scale,
            )
    return [mean, std, mn, mx, abs_mean], zeros, nan, inf


def numpy_stats(
    tensors: Iterable[Any],
    *,
    activity: Sequence[bool] | None = None,
    quantiles: Sequence[bool] | None = None,
    max_quantile_samples: int = 16384,
) -> Columns:
    """Statistics of each tensor (anything np.asarray accepts), accumulated in float64.

    `activity[i]` asks for per-unit activity (unit = axis 1, tensors of ndim >= 2);
    `quantiles[i]` for nearest-rank (p5, p95) of a strided subsample of at most `max_quantile_samples`.
    """
    arrays = list(tensors)
    k = len(arrays)
    n = np.zeros(k, dtype=np.int64)
    floats = np.zeros((k, _K), dtype=np.float64)
    zeros = np.zeros(k, dtype=np.int64)
    nan = np.zeros(k, dtype=np.int64)
    inf = np.zeros(k, dtype=np.int64)
    act: dict[int, tuple[int, ...]] = {}
    qs: dict[int, tuple[float, float]] = {}
    for i, t in enumerate(arrays):
        x = np.asarray(t)
        if x.dtype.kind == "c":
            raise TypeError(f"complex tensors are not supported (tensor {i} is {x.dtype})")
        x = x.astype(np.float64, copy=False)
        flat = x.reshape(-1)
        n[i] = flat.size
        if flat.size == 0:
            continue
        floats[i], zeros[i], nan[i], inf[i] = _row(flat)
        if activity is not None and activity[i]:
            a = _activity(x)
            if a is not None:
                act[i] = a
        if quantiles is not None and quantiles[i]:
            qs[i] = _quantiles(flat, max_quantile_samples)
    return Columns(n, floats, zeros, nan, inf, act, qs)


def stats_as_dicts(cols: Columns, names: Sequence[str]) -> Mapping[str, dict[str, float]]:
    """Readable view for debugging and tests: {name: {column: value}}."""
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        row = dict(zip(FLOAT_COLUMNS, (float(v) for v in cols.floats[i]), strict=True))
        row.update(n=int(cols.n[i]), zeros=int(cols.zeros[i]), nan=int(cols.nan[i]), inf=int(cols.inf[i]))
        out[name] = row
    return out
