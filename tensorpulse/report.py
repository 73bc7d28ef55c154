"""`tensorpulse report`: pictures of one or more jobs' statistics over steps, with their alerts.

Input is what `tensorpulse.replay` reads and decodes (the same reader, the same codec); alerts
are the rules replayed on those records, so a report needs no worker to have run and shows
what a rules file would flag. `collect` turns records into per-job series (bounded memory:
long series are thinned by doubling their stride); `build_sections` decides what to draw;
`render_html` and `render_png` lay the same sections out as a self-contained page or one
picture. Every job of a section shares the step axis and the y scale (log when the values
span decades). Matplotlib (the `report` extra) draws with the Agg backend, never on screen.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError
from .events import AlertEvent
from .replay import Payload, ReplaySummary, replay
from .rules.base import compile_regex
from .rules.config import RuleSpec
from .wire import StepRecord, TensorStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Per-tensor statistics `--stat` can plot.
STATS: dict[str, Callable[[TensorStats], float]] = {
    "abs_mean": lambda t: t.abs_mean,
    "l2": lambda t: t.l2,
    "mean": lambda t: t.mean,
    "std": lambda t: t.std,
    "variance": lambda t: t.variance,
    "min": lambda t: t.min,
    "max": lambda t: t.max,
    "zero_frac": lambda t: t.zero_frac,
}
#: Columns kept per tensor and step: the plotted statistics, the band and the dead-unit fraction.
_COLUMNS = (*STATS, "p5", "p95", "dead")
#: Collections drawn first, in this order; others follow alphabetically.
COLLECTION_ORDER = ("weights", "biases", "gradients", "activations")
#: A unit counts as dead when active in fewer than this fraction of samples (DeadRelu's default).
DEAD_EDGE = 0.01
#: Values spanning at least this ratio get a log (or symmetric log) axis.
DECADES_RATIO = 1e3
MAX_LINES = 12


class _Thinned:
    """A series of (step, columns) that keeps at most ~2*max_points points.

    When full it drops every other point and doubles its stride, so memory stays constant on
    any topic length while the points stay evenly spread over the steps.
    """

    def __init__(self, columns: Sequence[str], max_points: int) -> None:
        self.max_points = max_points
        self.stride = 1
        self.seen = 0
        self.steps: list[int] = []
        self.cols: dict[str, list[float]] = {c: [] for c in columns}

    def add(self, step: int, values: dict[str, float]) -> None:
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        self.steps.append(step)
        for c, col in self.cols.items():
            col.append(values.get(c, math.nan))
        if len(self.steps) >= 2 * self.max_points:
            self.steps = self.steps[::2]
            for c in self.cols:
                self.cols[c] = self.cols[c][::2]
            self.stride *= 2

    def array(self, column: str) -> np.ndarray:
        return np.asarray(self.cols[column], dtype=np.float64)

    def x(self) -> np.ndarray:
        return np.asarray(self.steps, dtype=np.float64)


@dataclass
class TensorSeries:
    """One tensor's statistics over the steps of one rank."""

    name: str
    collection: str
    series: _Thinned
    #: Steps where the tensor held NaN or inf (first 1000).
    nonfinite_steps: list[int] = field(default_factory=list)

    @property
    def has_quantiles(self) -> bool:
        return bool(np.isfinite(self.series.array("p5")).any())

    @property
    def has_activity(self) -> bool:
        return bool(np.isfinite(self.series.array("dead")).any())


@dataclass
class JobData:
    """Everything a report shows of one job: series of one rank, the replayed alerts, the counts."""

    job: str
    rank: int = 0
    scalars: dict[tuple[str, str], _Thinned] = field(default_factory=dict)
    tensors: dict[str, TensorSeries] = field(default_factory=dict)
    alerts: list[AlertEvent] = field(default_factory=list)
    summary: ReplaySummary | None = None
    rules: list[str] = field(default_factory=list)

    def collections(self) -> list[str]:
        present = {t.collection for t in self.tensors.values()}
        return [c for c in COLLECTION_ORDER if c in present] + sorted(present - set(COLLECTION_ORDER))

    def firing(self) -> list[AlertEvent]:
        return [a for a in self.alerts if a.status == "firing"]


class Collector:
    """Turns one job's decoded records into series: rank `rank` only, tensors matching `tensors`."""

    def __init__(
        self, job: str, *, rank: int = 0, tensors: str | None = None, max_points: int = 4000
    ) -> None:
        # RE2, as for rule regexes: tensor names come from whoever wrote the job's records.
        self.regex = compile_regex(tensors or None, "--tensors")
        self.data = JobData(job, rank)
        self.max_points = max_points

    def add(self, record: StepRecord) -> None:
        if record.kind != "step" or record.rank != self.data.rank:
            return
        for name, value in record.scalars.items():
            key = (record.mode, name)
            s = self.data.scalars.get(key)
            if s is None:
                s = self.data.scalars[key] = _Thinned(("value",), self.max_points)
            s.add(record.step, {"value": value})
        if record.mode != "train":
            return
        for t in record.tensors:
            if self.regex is not None and not self.regex.search(t.name):
                continue
            ts = self.data.tensors.get(t.name)
            if ts is None:
                ts = self.data.tensors[t.name] = TensorSeries(
                    t.name, t.collection, _Thinned(_COLUMNS, self.max_points)
                )
            values = {k: f(t) for k, f in STATS.items()}
            if t.quantiles is not None:
                values["p5"], values["p95"] = t.quantiles
            dead = t.inactive_unit_fraction(DEAD_EDGE)
            if dead is not None:
                values["dead"] = dead
            ts.series.add(record.step, values)
            if t.nonfinite and len(ts.nonfinite_steps) < 1000:
                ts.nonfinite_steps.append(record.step)


def collect_job(
    payloads: Iterable[bytes | Payload],
    job: str,
    specs: Sequence[RuleSpec],
    *,
    rank: int = 0,
    tensors: str | None = None,
    max_points: int = 4000,
) -> JobData:
    """One pass over a job's payloads: series for the pictures and the replayed alerts."""
    collector = Collector(job, rank=rank, tensors=tensors, max_points=max_points)
    r = replay(payloads, job, specs, on_record=collector.add)
    data = collector.data
    data.alerts = list(r.events)
    data.summary = r.summary()
    data.rules = [s.name for s in r.specs]
    return data


# --------------------------------------------------------------------------- scales


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


# --------------------------------------------------------------------------- sections

#: `Axes.get_label()` of the axes that hold data: a panel (colorbars and the alert lane have others).
PANEL = "panel"
#: `Axes.get_label()` of the strip above the panels that names the alerts.
LANE = "alert lane"
#: The gid of every vertical alert marker (`Line2D.get_gid()`), in the lane and in each panel.
ALERT_MARK = "alert"
#: A loss spanning this ratio (two decades) or more is drawn on a log axis.
LOSS_DECADES = 100.0
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


_JOB_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def _job_color(i: int) -> str:
    return _JOB_COLORS[i % len(_JOB_COLORS)]


def _finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _mark_nonfinite(ax: Axes, steps: Iterable[float], color: str, label: str) -> None:
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


def _alert_label(step: int, rules: list[str]) -> str:
    return f"{', '.join(rules)} @ {step}"


def _alert_color(critical: bool) -> str:
    return "tab:red" if critical else "darkorange"


def _mark_alerts(ax: Axes, job: JobData | None, jobs: Sequence[JobData]) -> None:
    """A dashed vertical line where rules started firing; their names are in the alert lane, once."""
    for j in [job] if job is not None else jobs:
        for step, _rules, critical in alert_groups(j):
            ax.axvline(
                step, color=_alert_color(critical), ls="--", lw=1.1, alpha=0.9, gid=ALERT_MARK, zorder=4
            )


# --------------------------------------------------------------------------- the alert lane


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
            text = _alert_label(step, rules) + (f" ({job.job})" if many else "")
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
            out.append(LaneLabel(step, text, _alert_color(critical), align, level))
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


# --------------------------------------------------------------------------- loss


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
                x, y = _finite(s.x(), s.array("value"))
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
                _mark_nonfinite(ax, bad, color, f"{who}{name} NaN/inf")
        _mark_alerts(ax, None, all_jobs)

    return Section("loss", QUESTIONS["loss"], False, draw, scale, "loss", height=2.8)


# --------------------------------------------------------------------------- heat maps


def short_name(name: str, limit: int = 30) -> str:
    """A layer's name for a row label: without the collection's prefix, long ones cut in the middle."""
    for prefix in ("gradient/", "gradients/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if len(name) <= limit:
        return name
    keep = (limit - 1) // 2
    return f"{name[:keep]}…{name[-(limit - 1 - keep) :]}"


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


def _gradnorm_section(jobs: Sequence[JobData]) -> Section | None:
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
        _mark_alerts(ax, job, jobs)

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


def _dead_section(jobs: Sequence[JobData]) -> Section | None:
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
        _mark_alerts(ax, job, jobs)

    title = f"{QUESTIONS['dead']}  dead-unit fraction per activation layer (units active in < {DEAD_EDGE:.0%} of samples)"
    return Section("dead", title, True, draw, None, "", height=_rows_height(rows))


# --------------------------------------------------------------------------- detail sections


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
                *_finite(t.series.x(), t.series.array(stat)), color=color, lw=1.0, label=short_name(t.name)
            )
        bad = [s for t in shown for s in t.nonfinite_steps]
        _mark_nonfinite(ax, bad, "tab:red", "NaN/inf")
        _mark_alerts(ax, job, jobs)

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
        lo, hi = _finite(x, s.array("min"))[1], _finite(x, s.array("max"))[1]
        ax.fill_between(x, lo, hi, color="tab:blue", alpha=0.15, lw=0, label="min..max")
        p5, p95 = s.array("p5"), s.array("p95")
        if np.isfinite(p5).any():
            ax.fill_between(x, p5, p95, color="tab:blue", alpha=0.45, lw=0, label="p5..p95 (where captured)")
        ax.plot(*_finite(x, s.array("mean")), color="navy", lw=1.0, label="mean")
        _mark_nonfinite(ax, t.nonfinite_steps, "tab:red", "NaN/inf")
        _mark_alerts(ax, job, jobs)

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
    out = [s for s in (_loss_section(jobs), _gradnorm_section(jobs), _dead_section(jobs)) if s is not None]
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


# --------------------------------------------------------------------------- rendering


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


def _png_bytes(fig: Figure, dpi: int = 100, metadata: dict[str, str] | None = None) -> bytes:
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


def render_png(jobs: Sequence[JobData], *, stat: str = "abs_mean", bands: int = 1, dpi: int = 100) -> bytes:
    """The report as one PNG (see `report_figure`); `stat` and `bands` concern the HTML report's
    details and are accepted for symmetry with it."""
    if stat not in STATS:
        raise ConfigError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    return _png_bytes(report_figure(jobs), dpi)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}
tr.firing td:nth-child(6){color:#b00;font-weight:600} img{max-width:100%}
.small{color:#666;font-size:.85em}
"""


def _alert_rows(jobs: Sequence[JobData]) -> str:
    rows = []
    for j in jobs:
        for a in sorted(j.alerts, key=lambda a: (a.step, a.rank, a.rule)):
            value = "" if a.value is None else f"{a.value:.4g}"
            threshold = "" if a.threshold is None else f"{a.threshold:.4g}"
            cells = [
                a.job,
                str(a.step),
                str(a.rank),
                a.mode,
                a.rule,
                a.status,
                a.severity,
                value,
                threshold,
                ", ".join(a.tensors[:5]) + (" …" if len(a.tensors) > 5 else ""),
                a.message,
            ]
            rows.append(
                f'<tr class="{a.status}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
            )
    if not rows:
        return '<p id="alerts-none">No rule fired.</p>'
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "job",
            "step",
            "rank",
            "mode",
            "rule",
            "status",
            "severity",
            "value",
            "threshold",
            "tensors",
            "message",
        )
    )
    return f'<table id="alerts"><tr>{head}</tr>{"".join(rows)}</table>'


def _summary_rows(jobs: Sequence[JobData]) -> str:
    rows = []
    for j in jobs:
        s = j.summary
        if s is None:
            continue
        steps = f"{s.first_step}..{s.last_step}" if s.first_step is not None else "–"
        cells = [
            j.job,
            str(s.records_read),
            steps,
            ", ".join(map(str, s.ranks)),
            str(j.rank),
            str(sum(s.decode_errors.values())),
            str(sum(c["firing"] for c in s.alerts.values())),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in ("job", "records", "train steps", "ranks", "rank plotted", "decode errors", "alerts fired")
    )
    return f'<table id="jobs"><tr>{head}</tr>{"".join(rows)}</table>'


def render_html(jobs: Sequence[JobData], *, stat: str = "abs_mean", bands: int = 3) -> str:
    """A self-contained page: the jobs' summary, one embedded PNG per section, the alert table."""
    sections = build_sections(jobs, stat=stat, bands=bands)
    names = ", ".join(j.job for j in jobs)
    rules = sorted({r for j in jobs for r in j.rules})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>tensorpulse report: {html.escape(names)}</title><style>{_CSS}</style></head><body>",
        f"<h1>tensorpulse report: {html.escape(names)}</h1>",
        f"<p class='small'>generated {time.strftime('%Y-%m-%d %H:%M:%S')}; alerts: the rules replayed on "
        f"the records ({html.escape(', '.join(rules)) or 'none'}).</p>",
        "<h2>Jobs</h2>",
        _summary_rows(jobs),
        "<h2>Alerts</h2>",
        _alert_rows(jobs),
    ]
    for s, fig in section_figures(sections, jobs):
        data = base64.b64encode(_png_bytes(fig)).decode()
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts.append(
            f'<img data-section="{html.escape(s.key)}" alt="{html.escape(s.title)}" '
            f'src="data:image/png;base64,{data}">'
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(jobs: Sequence[JobData], out: str | Path, *, stat: str = "abs_mean") -> Path:
    """Write `out` as HTML (.html/.htm) or PNG (.png), chosen by its suffix."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in (".html", ".htm"):
        data: Any = render_html(jobs, stat=stat).encode()
    elif suffix == ".png":
        data = render_png(jobs, stat=stat)
    else:
        raise ConfigError(f"--out {out}: write a .html or a .png file")
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {out}: {exc}") from exc
    return out
