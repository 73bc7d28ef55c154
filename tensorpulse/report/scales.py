"""The y scales and smoothing of a report's panels: pure functions of the values, no drawing.

A section's jobs share one `Scale`: linear, or log (symlog) when the values span decades; the
loss gets limits that show its course rather than its worst spike, and the heat maps' colours
limits within the quartiles' fences.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes


#: Values spanning at least this ratio get a log (or symmetric log) axis.
DECADES_RATIO = 1e3
#: A loss spanning this ratio (two decades) or more is drawn on a log axis.
LOSS_DECADES = 100.0


@dataclass(frozen=True)
class Scale:
    """A y axis shared by every job of a section."""

    kind: str  # linear | log | symlog
    lo: float
    hi: float
    linthresh: float = 1.0

    def apply(self, ax: Axes) -> None:
        from matplotlib.ticker import LogLocator, SymmetricalLogLocator

        if self.kind == "symlog":
            ax.set_yscale("symlog", linthresh=self.linthresh, linscale=2.0)
            ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=self.linthresh, subs=[1.0]))
            ax.yaxis.get_major_locator().set_params(numticks=7)
        elif self.kind == "log":
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=7))
        else:
            ax.set_yscale("linear")
        ax.set_ylim(self.lo, self.hi)


def choose_scale(values: Iterable[np.ndarray], fixed: tuple[float, float] | None = None) -> Scale:
    """Linear unless the finite values span DECADES_RATIO: then log (all >= 0) or symlog."""
    if fixed is not None:
        return Scale("linear", *fixed)
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    v = np.concatenate(arrays) if arrays else np.empty(0)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Scale("linear", 0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    nonzero = np.abs(v[v != 0])
    spread = float(nonzero.max() / nonzero.min()) if nonzero.size else 1.0
    if spread >= DECADES_RATIO:
        if lo > 0 or (lo == 0 and nonzero.size):
            pos = v[v > 0]
            return Scale("log", float(pos.min()) / 1.5, float(pos.max()) * 1.5)
        linthresh = float(np.percentile(nonzero, 50))  # the typical magnitudes stay linear
        return Scale("symlog", lo * 1.5 if lo < 0 else 0.0, hi * 1.5 if hi > 0 else 0.0, linthresh)
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-12)
    return Scale("linear", lo - pad, hi + pad)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """A centred running median over `window` points, NaN ignored: follows the trend, not the noise.

    A median, not a mean or an exponential average: one spike does not bend the line, and the
    line does not lag the points it summarises.
    """
    import warnings

    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or y.size < 3:
        return y.copy()
    half = window // 2
    padded = np.concatenate(
        [np.full(half, np.nan), np.where(np.isfinite(y), y, np.nan), np.full(half, np.nan)]
    )
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN window is a gap
        return np.nanmedian(windows, axis=1)


def smoothing_window(points: int) -> int:
    """About 1/30 of the points, odd, between 1 and 51."""
    w = max(1, min(51, points // 30))
    return w if w % 2 else w + 1


def loss_scale(series: Sequence[np.ndarray]) -> Scale:
    """Limits that show the loss's course, not its worst spike, and a log axis only across decades.

    The range keeps the values within the quartiles' fences (three interquartile ranges, and at
    least a decade for a positive loss, beyond the quartiles) and the first values of each series
    (a loss that starts high is the shape to see). What lies beyond is off scale: the drawing puts
    it on the edge with a marker. A diverging run's 1e19 no longer flattens the curve into a line.
    """
    finite = [np.asarray(s, dtype=np.float64) for s in series]
    finite = [s[np.isfinite(s)] for s in finite]
    v = np.concatenate(finite) if finite else np.empty(0)
    if v.size == 0:
        return Scale("linear", 0.0, 1.0)
    head = np.concatenate([s[: max(5, s.size // 20)] for s in finite])
    positive = bool((v > 0).all())
    if positive:
        lv = np.log10(v)
        q25, q75 = np.percentile(lv, [25, 75])
        reach = max(3 * (q75 - q25), 1.0)
        keep = v[(lv >= q25 - reach) & (lv <= q75 + reach)]
    else:
        q25, q75 = np.percentile(v, [25, 75])
        reach = 3 * (q75 - q25) or max(abs(q75), 1e-12)
        keep = v[(v >= q25 - reach) & (v <= q75 + reach)]
    lo = float(min(keep.min(), head.min()))
    hi = float(max(keep.max(), head.max()))
    if positive and hi / lo >= LOSS_DECADES:
        return Scale("log", lo / 1.3, hi * 1.3)
    pad = (hi - lo) * 0.06 or max(abs(hi) * 0.05, 1e-12)
    return Scale("linear", lo - pad, hi + pad)


def norm_limits(values: Iterable[np.ndarray]) -> tuple[float, float]:
    """Colour limits of a log heat map: the positive values within the quartiles' fences in decades."""
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    v = np.concatenate(arrays) if arrays else np.empty(0)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 1e-3, 1.0
    lv = np.log10(v)
    q25, q75 = np.percentile(lv, [25, 75])
    reach = max(3 * (q75 - q25), 1.0)
    keep = v[(lv >= q25 - reach) & (lv <= q75 + reach)]
    lo, hi = float(keep.min()), float(keep.max())
    if hi < 10 * lo:  # at least a decade, so the colour bar has decade ticks to label
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    return lo, hi
