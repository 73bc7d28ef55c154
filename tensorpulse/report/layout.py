"""How a report's sections are laid out: rows on one step axis under an alert lane that names each
alert once, tick labels that do not overlap, and the figures (one per section, or the one picture).
Matplotlib draws with the Agg backend, never on screen.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .axes import (
    ALERT_MARK,
    LANE,
    LEGEND_SIZE,
    PANEL,
    TICK_SIZE,
    TITLE_SIZE,
    Section,
    alert_color,
    alert_groups,
    alert_label,
)
from .data import JobData
from .panels import build_sections

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class LaneLabel:
    """One alert label of the lane: its text, step, side of the marker it sits on, and row (0 = top)."""

    step: int
    text: str
    color: str
    align: str  # left | right
    level: int


def lane_labels(
    jobs: Sequence[JobData], x_range: tuple[float, float], data_per_char: float, max_levels: int = 6
) -> tuple[list[LaneLabel], int]:
    """Place every alert group's label so that no two overlap: greedy rows, first row that has room.

    A label starts at its marker and runs right (left when it would leave the axis). Widths are
    estimated at `data_per_char` steps per character, an over-estimate, so real text never needs
    more room than planned. Returns the labels and how many alert groups found no row within
    `max_levels` (the lane's title counts them; the alert table of the HTML report lists all).
    """
    lo, hi = x_range
    pad = 1.5 * data_per_char
    rows: list[list[tuple[float, float]]] = []
    out: list[LaneLabel] = []
    dropped = 0
    many = len(jobs) > 1
    for job in jobs:
        for step, rules, critical in alert_groups(job):
            text = alert_label(step, rules) + (f" ({job.job})" if many else "")
            width = (len(text) + 1) * data_per_char
            align = "left" if step + width <= hi or step - width < lo else "right"
            span = (step, step + width) if align == "left" else (step - width, step)
            free = (
                k for k, row in enumerate(rows) if all(span[1] + pad < a or span[0] - pad > b for a, b in row)
            )
            level = next(free, len(rows))
            if level == len(rows):
                if len(rows) >= max_levels:
                    dropped += 1
                    continue
                rows.append([])
            rows[level].append(span)
            out.append(LaneLabel(step, text, alert_color(critical), align, level))
    out.sort(key=lambda label: (label.step, label.level))
    return out, dropped


def _draw_lane(ax: Axes, labels: list[LaneLabel], dropped: int, levels: int, fired: int) -> None:
    """The strip above the panels: one row per label level, each label beside its marker."""
    ax.set_label(LANE)
    ax.set_ylim(levels, 0)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", which="both", bottom=False, labelbottom=False)
    for lab in labels:
        ax.axvline(lab.step, color=lab.color, ls="--", lw=1.1, gid=ALERT_MARK)
        ax.text(
            lab.step,
            lab.level + 0.5,
            f" {lab.text} " if lab.align == "left" else f" {lab.text} ",
            color=lab.color,
            fontsize=LEGEND_SIZE,
            ha=lab.align,
            va="center",
            gid="alert-label",
            zorder=5,
            bbox={"facecolor": "white", "edgecolor": lab.color, "lw": 0.6, "pad": 0.25, "boxstyle": "round"},
        )
    more = f"; {dropped} more not labelled (see `tensorpulse replay`)" if dropped else ""
    ax.set_title(
        f"Alerts: {fired} fired (the rules replayed on these records; dashed lines below){more}",
        fontsize=TITLE_SIZE,
        loc="left",
    )


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "tensorpulse report draws with matplotlib: pip install 'tensorpulse[report]'"
        ) from exc


def _step_range(jobs: Sequence[JobData]) -> tuple[float, float]:
    steps = [s for j in jobs for t in j.tensors.values() for s in (t.series.steps[:1] + t.series.steps[-1:])]
    steps += [s for j in jobs for v in j.scalars.values() for s in (v.steps[:1] + v.steps[-1:])]
    if not steps:
        return 0.0, 1.0
    lo, hi = float(min(steps)), float(max(steps))
    pad = max((hi - lo) * 0.01, 0.5)
    return lo - pad, hi + pad


#: Inches of a panel's width that are not its plotting area at most (row labels, legend, colorbar).
_MARGINS_IN = 4.6


def _draw_rows(
    fig: Figure, sections: Sequence[Section], jobs: Sequence[JobData], width: float
) -> list[list[Axes]]:
    """Lay `sections` out as rows (a per-job section gets one row per job) on one step axis, under
    an alert lane that names each alert once."""
    x_range = _step_range(jobs)
    # Characters at LEGEND_SIZE are about 0.6 of the size wide: 8 pt -> ~0.067 in; a bit more, to be safe.
    data_per_char = (x_range[1] - x_range[0]) / max(width - _MARGINS_IN, 2.0) * 0.075
    labels, dropped = lane_labels(jobs, x_range, data_per_char)
    levels = max((lab.level for lab in labels), default=-1) + 1
    rows: list[tuple[Section | None, JobData | None]] = [(None, None)] if labels or dropped else []
    rows += [(s, j) for s in sections for j in (jobs if s.per_job else [None])]
    heights = [0.45 + 0.24 * max(levels, 1) if s is None else s.height for s, _ in rows]
    fig.set_size_inches(width, sum(heights) + 0.8)
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})
    out: list[list[Axes]] = []
    group: list[Axes] = []
    last: Section | None = None
    for (s, j), (ax,) in zip(rows, axes, strict=True):
        ax.set_xlim(*x_range)
        ax.tick_params(labelsize=TICK_SIZE)
        if s is None:
            fired = sum(len(rules) for j in jobs for _step, rules, _critical in alert_groups(j))
            _draw_lane(ax, labels, dropped, max(levels, 1), fired)
            continue
        ax.set_label(PANEL)
        s.draw(ax, j, jobs)
        if s.scale is not None:
            s.scale.apply(ax)
            ax.grid(True, alpha=0.3, lw=0.5)
        ax.set_ylabel(s.ylabel, fontsize=TICK_SIZE + 1)
        ax.set_title(
            s.title if j is None or len(jobs) == 1 else f"{s.title}  —  {j.job}",
            fontsize=TITLE_SIZE,
            loc="left",
        )
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=LEGEND_SIZE, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
        if s is not last and group:
            out.append(group)
            group = []
        group.append(ax)
        last = s
    if group:
        out.append(group)
    axes[-1][0].set_xlabel("step", fontsize=TICK_SIZE + 1)
    axes[-1][0].tick_params(labelbottom=True)
    _declutter_ticks(fig)
    return out


def _declutter_ticks(fig: Figure) -> None:
    """Drop tick labels that would overlap a neighbour's (a symmetric-log axis near 0, a heat map
    with many layers): keep 0 and then, in order, each tick whose label clears the kept ones."""
    from matplotlib.ticker import FixedLocator

    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in [a for parent in fig.axes for a in (parent, *parent.child_axes)]:  # colour bars are insets
        for axis, is_y in ((ax.yaxis, True), (ax.xaxis, False)):
            ticks = [t for t in axis.get_major_ticks() if t.label1.get_visible() and t.label1.get_text()]
            lo, hi = sorted(axis.get_view_interval())
            boxes = [
                (t.get_loc(), t.label1.get_window_extent(renderer)) for t in ticks if lo <= t.get_loc() <= hi
            ]
            if len(boxes) < 2 or not overlapping(b for _, b in boxes):
                continue
            order = sorted(boxes, key=lambda lb: (lb[0] != 0, 0))
            kept: list[tuple[float, Any]] = []
            for loc, box in order:
                if all(not _overlap(box, other, 2.0) for _, other in kept):
                    kept.append((loc, box))
            locs = sorted(loc for loc, _ in kept)
            labels = {t.get_loc(): t.label1.get_text() for t in ticks}
            axis.set_major_locator(FixedLocator(locs))
            if is_y and ax.get_label() == PANEL and ax.get_yscale() == "linear" and not ax.get_ylabel():
                axis.set_ticklabels([labels[loc] for loc in locs])  # heat-map rows: the names, kept
    fig.draw_without_rendering()


def _overlap(a: Any, b: Any, pad: float = 0.0) -> bool:
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad


def overlapping(boxes: Iterable[Any]) -> list[tuple[int, int]]:
    """Index pairs of the bounding boxes (matplotlib `Bbox`es, in pixels) that overlap."""
    bs = list(boxes)
    return [(i, k) for i in range(len(bs)) for k in range(i + 1, len(bs)) if _overlap(bs[i], bs[k])]


def _figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def section_figures(sections: Sequence[Section], jobs: Sequence[JobData]) -> list[tuple[Section, Figure]]:
    """One figure per section (the HTML report's pictures), each under its alert lane."""
    _require_matplotlib()
    out = []
    for s in sections:
        fig = _figure()
        _draw_rows(fig, [s], jobs, width=11.0)
        out.append((s, fig))
    return out


def png_bytes(fig: Figure, dpi: int = 100, metadata: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=metadata)
    return buf.getvalue()


def report_figure(jobs: Sequence[JobData]) -> Figure:
    """The one-picture report: under the alert lane, one panel per question a reader brings to
    it (is the loss going down? are gradients healthy per layer? which layers die?) on one step
    axis. The details per collection are in the HTML report."""
    _require_matplotlib()
    sections = build_sections(jobs, overview_only=True)
    if not sections:
        raise ConfigError(
            f"nothing to draw: no loss or tensor statistics in {', '.join(j.job for j in jobs)}"
        )
    fig = _figure()
    fig.suptitle(f"tensorpulse report: {', '.join(j.job for j in jobs)}", fontsize=12, x=0.01, ha="left")
    _draw_rows(fig, sections, jobs, width=12.0)
    return fig
