"""The heat-map panels of a report: gradient L2 norm per layer, and the dead-unit fraction per
activation layer, one row per layer over the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .axes import QUESTIONS, TICK_SIZE, Section, mark_alerts, short_name
from .data import DEAD_EDGE, JobData, TensorSeries
from .scales import norm_limits

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def layer_matrix(tensors: Sequence[TensorSeries], column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, values [layer, step], non-finite mask): NaN where a layer has no value at a step."""
    steps = np.asarray(sorted({s for t in tensors for s in t.series.steps}), dtype=np.float64)
    where = {s: i for i, s in enumerate(steps)}
    values = np.full((len(tensors), steps.size), np.nan)
    bad = np.zeros(values.shape, dtype=bool)
    for r, t in enumerate(tensors):
        cols = [where[s] for s in t.series.steps]
        col = t.series.array(column)
        values[r, cols] = col
        bad[r, cols] = ~np.isfinite(col)
        for s in t.nonfinite_steps:
            if s in where:
                bad[r, where[s]] = True
    values[bad] = np.nan
    return steps, values, bad


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between steps (a heat map cell covers the steps it stands for)."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[:-1] + steps[1:]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _rows_height(rows: int) -> float:
    return min(7.0, max(1.1, 0.22 * rows + 0.7))


def _colorbar(ax: Axes, mesh: Any, extend: str = "neither") -> Any:
    """A slim colour bar just right of its heat map (an inset, so constrained layout keeps room for it)."""
    from matplotlib.ticker import NullFormatter

    cax = ax.inset_axes((1.012, 0.0, 0.012, 1.0))
    cax.set_label("colorbar")
    bar = ax.figure.colorbar(mesh, cax=cax, extend=extend)
    bar.ax.yaxis.set_minor_formatter(NullFormatter())  # a narrow log range labels minor ticks, overlapping
    return bar


def _heat_rows(ax: Axes, names: Sequence[str]) -> None:
    ax.set_ylim(len(names), 0)
    ax.set_yticks(np.arange(len(names)) + 0.5, [short_name(n) for n in names])
    ax.grid(False)


def _gradnorm_tensors(job: JobData) -> tuple[list[TensorSeries], str]:
    """The gradients, or (none captured) the first collection there is, and what they are."""
    grads = [t for t in job.tensors.values() if t.collection == "gradients"]
    if grads:
        return grads, "gradients"
    coll = next(iter(job.collections()), "")
    return [t for t in job.tensors.values() if t.collection == coll], coll


def gradnorm_section(jobs: Sequence[JobData]) -> Section | None:
    picked = [_gradnorm_tensors(j) for j in jobs]
    if not any(tensors for tensors, _ in picked):
        return None
    colls = sorted({c for tensors, c in picked if tensors})
    vmin, vmax = norm_limits(t.series.array("l2") for tensors, _ in picked for t in tensors)
    rows = max(len(tensors) for tensors, _ in picked)

    def draw(ax: Axes, job: JobData | None, _: Sequence[JobData]) -> None:
        import matplotlib
        from matplotlib.colors import ListedColormap, LogNorm

        assert job is not None
        tensors, coll = _gradnorm_tensors(job)
        if not tensors:
            ax.text(0.5, 0.5, "no tensors captured", transform=ax.transAxes, ha="center", va="center")
            ax.set_yticks([])
            return
        steps, values, bad = layer_matrix(tensors, "l2")
        shown = np.where(values <= 0, vmin / 10, values)  # a zero norm (a frozen layer) is "under"
        cmap = matplotlib.colormaps["viridis"].with_extremes(under="black", over="magenta", bad=(0, 0, 0, 0))
        mesh = ax.pcolormesh(
            _edges(steps),
            np.arange(len(tensors) + 1),
            np.ma.masked_invalid(shown),
            cmap=cmap,
            norm=LogNorm(vmin, vmax),
            shading="flat",
        )
        if bad.any():
            ax.pcolormesh(
                _edges(steps),
                np.arange(len(tensors) + 1),
                np.ma.masked_where(~bad, np.ones(bad.shape)),
                cmap=ListedColormap(["red"]),
                shading="flat",
            )
        _heat_rows(ax, [t.name for t in tensors])
        bar = _colorbar(ax, mesh, extend="both")
        bar.set_label(f"{'gradient ' if coll == 'gradients' else coll + ' '}L2 norm", fontsize=TICK_SIZE)
        bar.ax.tick_params(labelsize=TICK_SIZE)
        mark_alerts(ax, job, jobs)

    what = (
        "gradient L2 norm"
        if colls == ["gradients"]
        else f"{', '.join(colls)} L2 norm (no gradients captured)"
    )
    title = (
        f"{QUESTIONS['gradnorm']}  {what}, one row per layer\n"
        "magenta: above the usual range;  black: below it, or 0;  red: NaN/inf"
    )
    return Section("gradnorm", title, True, draw, None, "", height=_rows_height(rows))


def dead_section(jobs: Sequence[JobData]) -> Section | None:
    if not any(t.has_activity for j in jobs for t in j.tensors.values()):
        return None
    rows = max(sum(1 for t in j.tensors.values() if t.has_activity) for j in jobs)

    def draw(ax: Axes, job: JobData | None, _: Sequence[JobData]) -> None:
        import matplotlib
        from matplotlib.colors import Normalize

        assert job is not None
        tensors = [t for t in job.tensors.values() if t.has_activity]
        if not tensors:
            ax.text(
                0.5, 0.5, "no per-unit activity captured", transform=ax.transAxes, ha="center", va="center"
            )
            ax.set_yticks([])
            return
        steps, values, _bad = layer_matrix(tensors, "dead")
        cmap = matplotlib.colormaps["Reds"].with_extremes(bad=(0.85, 0.85, 0.85, 1.0))
        mesh = ax.pcolormesh(
            _edges(steps),
            np.arange(len(tensors) + 1),
            np.ma.masked_invalid(values),
            cmap=cmap,
            norm=Normalize(0.0, 1.0),
            shading="flat",
        )
        _heat_rows(ax, [t.name for t in tensors])
        bar = _colorbar(ax, mesh)
        bar.set_label("fraction of units dead", fontsize=TICK_SIZE)
        bar.ax.tick_params(labelsize=TICK_SIZE)
        mark_alerts(ax, job, jobs)

    title = f"{QUESTIONS['dead']}  dead-unit fraction per activation layer (units active in < {DEAD_EDGE:.0%} of samples)"
    return Section("dead", title, True, draw, None, "", height=_rows_height(rows))
