"""The line panels of a report (loss, a statistic per layer, distribution bands) and
`build_sections`, which decides what a report shows and in which order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from .axes import QUESTIONS, Section, finite, mark_alerts, mark_nonfinite, short_name
from .data import COLLECTION_ORDER, STATS, JobData, TensorSeries
from .heatmaps import dead_section, gradnorm_section
from .scales import choose_scale, loss_scale, smooth, smoothing_window

if TYPE_CHECKING:
    from matplotlib.axes import Axes


MAX_LINES = 12


def _loss_keys(jobs: Sequence[JobData]) -> list[tuple[str, str]]:
    keys = {k for j in jobs for k in j.scalars if "loss" in k[1].lower()}
    return sorted(keys, key=lambda k: (k[0] != "train", k))


def _loss_section(jobs: Sequence[JobData]) -> Section | None:
    keys = _loss_keys(jobs)
    if not keys:
        return None
    arrays = [j.scalars[k].array("value") for j in jobs for k in keys if k in j.scalars]
    scale = loss_scale(arrays)

    def draw(ax: Axes, _: JobData | None, all_jobs: Sequence[JobData]) -> None:
        import matplotlib

        palette = matplotlib.colormaps["tab10"]
        n = 0
        for j in all_jobs:
            for mode, name in keys:
                s = j.scalars.get((mode, name))
                if s is None:
                    continue
                color = palette(n % 10)
                n += 1
                who = f"{j.job}: " if len(all_jobs) > 1 else ""
                x, y = finite(s.x(), s.array("value"))
                window = smoothing_window(int(np.isfinite(y).sum()))
                if window > 1:
                    ax.plot(x, y, ".", ms=2.5, color=color, alpha=0.3, label=f"{who}{name} ({mode})")
                    ax.plot(
                        x,
                        smooth(y, window),
                        "-",
                        color=color,
                        lw=1.8,
                        label=f"{who}{name} ({mode}), median of {window}"
                        if len(keys) > 1 or who
                        else f"median of {window} steps",
                    )
                else:
                    ax.plot(x, y, "o-", ms=3, color=color, lw=1.4, label=f"{who}{name} ({mode})")
                over = np.isfinite(y) & (y > scale.hi)
                if over.any():
                    top = int(np.nanargmax(np.where(over, y, np.nan)))
                    ax.plot(
                        x[over],
                        np.full(int(over.sum()), scale.hi),
                        "^",
                        ms=6,
                        color=color,
                        clip_on=False,
                        zorder=5,
                        label=f"off scale (max {y[top]:.2g} @ {int(x[top])})",
                    )
                bad = s.x()[~np.isfinite(s.array("value"))]
                mark_nonfinite(ax, bad, color, f"{who}{name} NaN/inf")
        mark_alerts(ax, None, all_jobs)

    return Section("loss", QUESTIONS["loss"], False, draw, scale, "loss", height=2.8)


def _pick_lines(tensors: list[TensorSeries]) -> tuple[list[TensorSeries], int]:
    return tensors[:MAX_LINES], max(0, len(tensors) - MAX_LINES)


def _stat_section(jobs: Sequence[JobData], collection: str, stat: str) -> Section:
    arrays = [t.series.array(stat) for j in jobs for t in j.tensors.values() if t.collection == collection]
    total = max(sum(1 for t in j.tensors.values() if t.collection == collection) for j in jobs)
    hidden = max(0, total - MAX_LINES)

    def draw(ax: Axes, job: JobData | None, _: Sequence[JobData]) -> None:
        assert job is not None
        import matplotlib

        tensors = [t for t in job.tensors.values() if t.collection == collection]
        shown, _hidden = _pick_lines(tensors)
        cmap = matplotlib.colormaps["viridis"]
        for k, t in enumerate(shown):
            color = cmap(k / max(len(shown) - 1, 1) * 0.9)
            ax.plot(
                *finite(t.series.x(), t.series.array(stat)), color=color, lw=1.0, label=short_name(t.name)
            )
        bad = [s for t in shown for s in t.nonfinite_steps]
        mark_nonfinite(ax, bad, "tab:red", "NaN/inf")
        mark_alerts(ax, job, jobs)

    more = f" (first {MAX_LINES} of {total} layers: narrow with --tensors)" if hidden else ""
    return Section(
        f"stat:{collection}",
        f"{collection}: {stat} per layer{more}",
        True,
        draw,
        choose_scale(arrays, (0.0, 1.0) if stat == "zero_frac" else None),
        stat,
    )


def _band_tensors(jobs: Sequence[JobData], limit: int) -> list[str]:
    """Up to `limit` tensor names for distribution bands: one per collection in turn, gradients first."""
    by_coll: dict[str, list[str]] = {}
    for j in jobs:
        for t in j.tensors.values():
            names = by_coll.setdefault(t.collection, [])
            if t.name not in names:
                names.append(t.name)
    order = ["gradients", "activations", "weights", "biases"]
    order += sorted(c for c in by_coll if c not in order)
    queues = [list(by_coll[c]) for c in order if c in by_coll]
    out: list[str] = []
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def _band_section(jobs: Sequence[JobData], name: str) -> Section:
    arrays = [
        j.tensors[name].series.array(c) for j in jobs if name in j.tensors for c in ("min", "max", "mean")
    ]

    def draw(ax: Axes, job: JobData | None, _: Sequence[JobData]) -> None:
        assert job is not None
        t = job.tensors.get(name)
        if t is None:
            ax.text(0.5, 0.5, "not captured", transform=ax.transAxes, ha="center")
            return
        s = t.series
        x = s.x()
        lo, hi = finite(x, s.array("min"))[1], finite(x, s.array("max"))[1]
        ax.fill_between(x, lo, hi, color="tab:blue", alpha=0.15, lw=0, label="min..max")
        p5, p95 = s.array("p5"), s.array("p95")
        if np.isfinite(p5).any():
            ax.fill_between(x, p5, p95, color="tab:blue", alpha=0.45, lw=0, label="p5..p95 (where captured)")
        ax.plot(*finite(x, s.array("mean")), color="navy", lw=1.0, label="mean")
        mark_nonfinite(ax, t.nonfinite_steps, "tab:red", "NaN/inf")
        mark_alerts(ax, job, jobs)

    coll = next((j.tensors[name].collection for j in jobs if name in j.tensors), "")
    return Section(
        f"band:{name}",
        f"distribution of {name} ({coll}): min..p5..mean..p95..max over steps",
        True,
        draw,
        choose_scale(arrays),
        "value",
    )


def build_sections(
    jobs: Sequence[JobData],
    *,
    stat: str = "abs_mean",
    bands: int = 3,
    collections: Sequence[str] | None = None,
    overview_only: bool = False,
) -> list[Section]:
    """What the report shows, in order: the three questions (loss, gradient norms per layer, dead
    units), then the details: per-layer `stat` per collection and distribution bands.

    `overview_only` keeps the three questions (the one-picture report). `collections` keeps only
    those of the per-layer sections (all that are present when none of them is).
    """
    if stat not in STATS:
        raise ConfigError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    out = [s for s in (_loss_section(jobs), gradnorm_section(jobs), dead_section(jobs)) if s is not None]
    if overview_only:
        return out
    present: list[str] = []
    for j in jobs:
        present += [c for c in j.collections() if c not in present]
    order = [c for c in COLLECTION_ORDER if c in present] + sorted(set(present) - set(COLLECTION_ORDER))
    if collections is not None and any(c in order for c in collections):
        order = [c for c in order if c in collections]
    out += [_stat_section(jobs, c, stat) for c in order]
    out += [_band_section(jobs, name) for name in _band_tensors(jobs, bands)]
    return out
