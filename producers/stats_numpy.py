"""Framework-neutral tensor statistics (numpy, float64), and the column set both backends produce.

Used for anything with `__array__` (numpy arrays, lists, JAX/TF tensors on host). Its per-tensor
statistics are the float64 references declared in tensorpulse/statistics.py, which the torch
backend and the numba kernels are tested against (tests/unit/test_statistics.py). Semantics:

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

from tensorpulse import statistics
from tensorpulse.wire import (
    ACTIVITY_EDGES,
    FLOAT_COLUMNS,
    MAX_CHANNELS,
    MAX_CONFUSION_CLASSES,
    MAX_SCALARS,
    MAX_TENSORS,
    ClassCounts,
    ImageSums,
    TensorBlock,
    TokenCounts,
)

_K = len(FLOAT_COLUMNS)
#: The declared float64 references of the wire's float columns and counts.
_FLOAT_REFS = tuple(statistics.get(name).reference for name in FLOAT_COLUMNS)
_ZEROS, _NAN, _INF = (statistics.get(name).reference for name in ("zeros", "nan", "inf"))


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
    #: row -> (prev_step, ||w - w_prev||, ||w_prev||, allclose excess), see wire.Delta.
    deltas: dict[int, tuple[int, float, float, float | None]] = field(default_factory=dict)
    #: Set by whoever made these from finite float32 statistics only (no NaN or inf row, every
    #: float within float32's range): `to_block` then skips its checks (fewer Python calls on the
    #: publisher thread, which shares the GIL and the caches with training).
    finite: bool = False

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
        deltas: dict[int, tuple[int, float, float, float | None]] = {}
        offset = 0
        for p in parts:
            activity.update({offset + i: v for i, v in p.activity.items()})
            quantiles.update({offset + i: v for i, v in p.quantiles.items()})
            deltas.update({offset + i: v for i, v in p.deltas.items()})
            offset += len(p)
        return cls(
            np.concatenate([p.n for p in parts]),
            np.concatenate([p.floats for p in parts]),
            np.concatenate([p.zeros for p in parts]),
            np.concatenate([p.nan for p in parts]),
            np.concatenate([p.inf for p in parts]),
            activity,
            quantiles,
            deltas,
            all(p.finite for p in parts),
        )

    def to_block(
        self,
        names: Sequence[str],
        collections: Sequence[str],
        tolerance: tuple[float, float] | None = None,
    ) -> TensorBlock:
        """The wire's TensorBlock for these rows (`tolerance`: the (rtol, atol) of the deltas)."""
        if len(names) != len(self) or len(collections) != len(self):
            raise ValueError(f"{len(names)} names / {len(collections)} collections for {len(self)} rows")
        if self.finite:  # float32 statistics, no NaN or inf: the cast cannot overflow
            floats, nan, inf = self.floats.astype(np.float32), None, None
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                floats = self.floats.astype(np.float32)
            nan = self.nan if self.nan.any() else None
            inf = self.inf if self.inf.any() else None
        return TensorBlock(
            names=list(names),
            collections=list(collections),
            n=self.n,
            floats=floats,
            zeros=self.zeros,
            nan=nan,
            inf=inf,
            activity=self.activity,
            quantiles=self.quantiles,
            deltas=self.deltas,
            tolerance=tolerance if self.deltas else None,
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


def _activity(x: np.ndarray, active_range: tuple[float, float] | None = None) -> tuple[int, ...] | None:
    """Per-unit activity: a unit is active in a sample when its value is > 0, or lies strictly
    inside `active_range` (lo, hi) when given (the non-saturated inputs of tanh / sigmoid)."""
    if x.ndim < 2 or x.shape[1] == 0 or x.size == 0:
        return None
    axes = (0, *range(2, x.ndim))
    on = x > 0 if active_range is None else (x > active_range[0]) & (x < active_range[1])
    active = np.count_nonzero(on, axis=axes)
    return activity_from_counts(np.asarray(active), x.size // x.shape[1])


def _row(flat: np.ndarray) -> tuple[list[float], int, int, int]:
    """[mean, std, min, max, abs_mean], zeros, nan, inf of a flat float64 array: the declared
    references (tensorpulse/statistics.py), which this backend is."""
    return [f(flat) for f in _FLOAT_REFS], _ZEROS(flat), _NAN(flat), _INF(flat)


def numpy_stats(
    tensors: Iterable[Any],
    *,
    activity: Sequence[bool] | None = None,
    quantiles: Sequence[bool] | None = None,
    max_quantile_samples: int = 16384,
    active_range: tuple[float, float] | None = None,
) -> Columns:
    """Statistics of each tensor (anything np.asarray accepts), accumulated in float64.

    `activity[i]` asks for per-unit activity (unit = axis 1, tensors of ndim >= 2; active means
    > 0, or strictly inside `active_range` when given);
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
            a = _activity(x, active_range)
            if a is not None:
                act[i] = a
        if quantiles is not None and quantiles[i]:
            q = statistics.ref_quantiles(flat, max_quantile_samples)
            if q is not None:
                qs[i] = q
    return Columns(n, floats, zeros, nan, inf, act, qs)


def numpy_delta(x: Any, prev: np.ndarray, rtol: float, atol: float) -> tuple[float, float, float]:
    """(||x - prev||, ||prev||, max(|x - prev| - (atol + rtol*|prev|))) in float64.

    The last is <= 0 exactly when numpy.allclose(x, prev, rtol, atol) holds (NaN when either
    holds a NaN). `x` and `prev` must have the same shape.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(prev, dtype=np.float64)
    if a.size == 0:
        return 0.0, 0.0, -math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        d = a - b
        excess = float(np.max(np.abs(d) - (atol + rtol * np.abs(b))))
        return float(np.linalg.norm(d.reshape(-1))), float(np.linalg.norm(b.reshape(-1))), excess


def class_counts(labels: Any, predictions: Any = None, num_classes: int | None = None) -> ClassCounts:
    """Label counts (and, with predictions, k*k confusion counts for k <= 256) of one batch.

    `labels`: 1-D integer class ids; `predictions`: 1-D class ids, or 2-D scores (argmax over
    axis 1). k is `num_classes`, else the number of score columns, else the largest id + 1.
    Ids outside [0, k) are not counted.
    """
    y = np.asarray(labels).reshape(-1)
    if y.dtype.kind not in "iub":
        raise TypeError(f"labels must be integer class ids, got dtype {y.dtype}")
    p = None
    if predictions is not None:
        p = np.asarray(predictions)
        if p.ndim == 2:
            if num_classes is None:
                num_classes = p.shape[1]
            p = p.argmax(axis=1)
        p = p.reshape(-1)
        if p.dtype.kind not in "iub":
            raise TypeError(f"predictions must be class ids or 2-D scores, got dtype {p.dtype}")
        if p.shape != y.shape:
            raise ValueError(f"{p.size} predictions for {y.size} labels")
    if num_classes is None:
        top = max(int(y.max(initial=-1)), -1 if p is None else int(p.max(initial=-1)))
        num_classes = top + 1
    k = check_classes(num_classes)
    y = y.astype(np.int64)
    ok = (y >= 0) & (y < k)
    if p is None or k > MAX_CONFUSION_CLASSES:
        return ClassCounts(k, tuple(np.bincount(y[ok], minlength=k).tolist()))
    p = p.astype(np.int64)
    ok &= (p >= 0) & (p < k)
    conf = np.bincount(y[ok] * k + p[ok], minlength=k * k)
    y_ok = y[(y >= 0) & (y < k)]
    return ClassCounts(k, tuple(np.bincount(y_ok, minlength=k).tolist()), tuple(conf.tolist()))


def check_classes(k: int) -> int:
    """k as an int, if the wire can carry that many label counts."""
    k = int(k)
    if not 0 <= k <= MAX_TENSORS:
        raise ValueError(f"{k} classes: the wire carries label counts for 0..{MAX_TENSORS} classes")
    return k


def check_token_values(values: Sequence[int]) -> tuple[int, ...]:
    vals = tuple(int(v) for v in values)
    if len(vals) > MAX_SCALARS:
        raise ValueError(f"{len(vals)} token values: the wire carries at most {MAX_SCALARS}")
    return vals


def image_sums(x: Any, channel: int = 1) -> ImageSums:
    """Per-channel sums and sums of squares over every other axis of a batch of images (axis 0)."""
    a = np.asarray(x)
    ch = _channel_axis(a.ndim, channel)
    a = a.astype(np.float64, copy=False)
    axes = tuple(i for i in range(a.ndim) if i != ch)
    c = check_channels(a.shape[ch])
    images = a.shape[0]
    pixels = a.size // (c * images) if c and images else 0
    return ImageSums(
        images, pixels, tuple(a.sum(axis=axes).tolist()), tuple(np.square(a).sum(axis=axes).tolist())
    )


def _channel_axis(ndim: int, channel: int) -> int:
    if ndim < 3:
        raise ValueError(f"images must have >= 3 dimensions (batch, channel, ...), got {ndim}")
    ch = channel + ndim if channel < 0 else channel
    if not 0 < ch < ndim:
        raise ValueError(f"channel axis {channel} is not an axis 1..{ndim - 1} of a {ndim}-D batch")
    return ch


def check_channels(c: int) -> int:
    if c > MAX_CHANNELS:
        raise ValueError(f"{c} image channels: the wire carries at most {MAX_CHANNELS}")
    return c


def token_counts(x: Any, values: Sequence[int]) -> TokenCounts:
    """How many of the integer tokens in `x` equal each of `values`, and how many tokens in all."""
    a = np.asarray(x).reshape(-1)
    if a.dtype.kind not in "iub":
        raise TypeError(f"token ids must be integers, got dtype {a.dtype}")
    return TokenCounts(int(a.size), {v: int(np.count_nonzero(a == v)) for v in check_token_values(values)})


def stats_as_dicts(cols: Columns, names: Sequence[str]) -> Mapping[str, dict[str, float]]:
    """Readable view for debugging and tests: {name: {column: value}}."""
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        row = dict(zip(FLOAT_COLUMNS, (float(v) for v in cols.floats[i]), strict=True))
        row.update(n=int(cols.n[i]), zeros=int(cols.zeros[i]), nan=int(cols.nan[i]), inf=int(cols.inf[i]))
        out[name] = row
    return out
