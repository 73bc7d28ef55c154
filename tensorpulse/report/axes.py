"""What every panel of a report shares: the `Section` type, labels and sizes, and the marks drawn
over data (alert markers, NaN/inf spans), so that a reader sees the same marks in every panel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .data import JobData
from .scales import Scale

if TYPE_CHECKING:
    from matplotlib.axes import Axes


#: `Axes.get_label()` of the axes that hold data: a panel (colorbars and the alert lane have others).
PANEL = "panel"
#: `Axes.get_label()` of the strip above the panels that names the alerts.
LANE = "alert lane"
#: The gid of every vertical alert marker (`Line2D.get_gid()`), in the lane and in each panel.
ALERT_MARK = "alert"
#: Font sizes at 100 dpi: readable in the PNG at its own size and in the HTML page.
TICK_SIZE = 8
LEGEND_SIZE = 8
TITLE_SIZE = 10
#: Panel titles of the one-picture report: the three questions it answers.
QUESTIONS = {
    "loss": "Is the loss going down?",
    "gradnorm": "Are gradients healthy per layer?",
    "dead": "Which layers die?",
}


@dataclass
class Section:
    """One picture of the report: one axis for all jobs, or one axis per job on a shared scale.

    `scale` None: the section lays out its own y axis (a heat map's rows are layers, not values).
    `height` is the row's height in inches for one job.
    """

    key: str
    title: str
    per_job: bool
    draw: Callable[[Axes, JobData | None, Sequence[JobData]], None]
    scale: Scale | None
    ylabel: str = ""
    height: float = 2.3


def finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-finite values become gaps (NaN) so they neither draw nor break a log axis."""
    y = np.where(np.isfinite(y), y, np.nan)
    return x, y


def nonfinite_spans(steps: Iterable[float]) -> list[tuple[float, float]]:
    """Merge steps into (start, end) runs; steps closer than twice the smallest gap are one run."""
    xs = sorted(set(steps))
    if not xs:
        return []
    gaps = [b - a for a, b in zip(xs[:-1], xs[1:], strict=True) if b > a]
    join = 2 * min(gaps) if gaps else 1
    spans = [[xs[0], xs[0]]]
    for x in xs[1:]:
        if x - spans[-1][1] <= join:
            spans[-1][1] = x
        else:
            spans.append([x, x])
    return [(a, b) for a, b in spans]


def mark_nonfinite(ax: Axes, steps: Iterable[float], color: str, label: str) -> None:
    """Shade the steps where values were NaN or inf (they cannot be drawn as points)."""
    for k, (a, b) in enumerate(nonfinite_spans(steps)):
        ax.axvspan(a - 0.5, b + 0.5, color=color, alpha=0.12, lw=0, label=label if k == 0 else None)


def alert_groups(job: JobData) -> list[tuple[int, list[str], bool]]:
    """Firing train alerts of the plotted rank grouped by step: (step, rules, any critical)."""
    groups: dict[int, tuple[list[str], bool]] = {}
    for a in job.firing():
        if a.rank != job.rank or a.mode != "train":
            continue
        rules, critical = groups.get(a.step, ([], False))
        if a.rule not in rules:
            rules.append(a.rule)
        groups[a.step] = (rules, critical or a.severity == "critical")
    return [(step, rules, critical) for step, (rules, critical) in sorted(groups.items())]


def alert_label(step: int, rules: list[str]) -> str:
    return f"{', '.join(rules)} @ {step}"


def alert_color(critical: bool) -> str:
    return "tab:red" if critical else "darkorange"


def mark_alerts(ax: Axes, job: JobData | None, jobs: Sequence[JobData]) -> None:
    """A dashed vertical line where rules started firing; their names are in the alert lane, once."""
    for j in [job] if job is not None else jobs:
        for step, _rules, critical in alert_groups(j):
            ax.axvline(
                step, color=alert_color(critical), ls="--", lw=1.1, alpha=0.9, gid=ALERT_MARK, zorder=4
            )


def short_name(name: str, limit: int = 30) -> str:
    """A layer's name for a row label: without the collection's prefix, long ones cut in the middle."""
    for prefix in ("gradient/", "gradients/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if len(name) <= limit:
        return name
    keep = (limit - 1) // 2
    return f"{name[:keep]}…{name[-(limit - 1 - keep) :]}"
