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


@dataclass
class Section:
    """One picture of the report: one axis for all jobs, or one axis per job on a shared scale."""

    key: str
    title: str
    per_job: bool
    draw: Callable[[Axes, JobData | None, Sequence[JobData]], None]
    scale: Scale
    ylabel: str = ""


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
    more = f" +{len(rules) - 2}" if len(rules) > 2 else ""
    return f" {', '.join(rules[:2])}{more} @ {step}"


def _label(ax: Axes, x: float, y: float, text: str, color: str) -> None:
    ax.text(
        x,
        y,
        text,
        transform=ax.get_xaxis_transform(),
        color=color,
        fontsize=7,
        va="top",
        ha="left",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5},
    )


def _mark_alerts(ax: Axes, job: JobData) -> None:
    """A dashed vertical line per step where rules started firing, labelled with their names."""
    for k, (step, rules, critical) in enumerate(alert_groups(job)):
        color = "tab:red" if critical else "darkorange"
        ax.axvline(step, color=color, ls="--", lw=1.0, alpha=0.8)
        _label(ax, step, 0.96 - 0.13 * (k % 3), _alert_label(step, rules), color)


def _loss_section(jobs: Sequence[JobData]) -> Section | None:
    keys = sorted({k for j in jobs for k in j.scalars if "loss" in k[1].lower()})
    if not keys:
        return None
    arrays = [j.scalars[k].array("value") for j in jobs for k in keys if k in j.scalars]

    def draw(ax: Axes, _: JobData | None, all_jobs: Sequence[JobData]) -> None:
        for i, j in enumerate(all_jobs):
            color = _job_color(i)
            for mode, name in keys:
                s = j.scalars.get((mode, name))
                if s is None:
                    continue
                x, y = _finite(s.x(), s.array("value"))
                ls = "-" if mode == "train" else "--"
                ax.plot(x, y, ls, color=color, lw=1.2, label=f"{j.job}: {name} ({mode})")
                bad = s.x()[~np.isfinite(s.array("value"))]
                _mark_nonfinite(ax, bad, color, f"{j.job}: {name} NaN/inf")
            for k, (step, rules, _critical) in enumerate(alert_groups(j)):
                ax.axvline(step, color=color, ls=":", lw=1.0)
                if k < 3:
                    _label(ax, step, 0.96 - 0.1 * k - 0.32 * (i % 3), _alert_label(step, rules), color)

    return Section("loss", "Loss per step (dotted lines: alerts)", False, draw, choose_scale(arrays), "loss")


def _pick_lines(tensors: list[TensorSeries]) -> tuple[list[TensorSeries], int]:
    return tensors[:MAX_LINES], max(0, len(tensors) - MAX_LINES)


def _stat_section(jobs: Sequence[JobData], collection: str, stat: str) -> Section:
    arrays = [t.series.array(stat) for j in jobs for t in j.tensors.values() if t.collection == collection]

    def draw(ax: Axes, job: JobData | None, _: Sequence[JobData]) -> None:
        assert job is not None
        import matplotlib

        tensors = [t for t in job.tensors.values() if t.collection == collection]
        shown, hidden = _pick_lines(tensors)
        cmap = matplotlib.colormaps["viridis"]
        for k, t in enumerate(shown):
            color = cmap(k / max(len(shown) - 1, 1) * 0.9)
            ax.plot(*_finite(t.series.x(), t.series.array(stat)), color=color, lw=1.0, label=t.name)
        bad = [s for t in shown for s in t.nonfinite_steps]
        _mark_nonfinite(ax, bad, "tab:red", "NaN/inf")
        _mark_alerts(ax, job)
        if hidden:
            ax.text(
                0.99,
                0.02,
                f"+{hidden} more (narrow with --tensors)",
                transform=ax.transAxes,
                ha="right",
                fontsize=7,
            )

    return Section(
        f"stat:{collection}",
        f"{collection}: {stat} per layer",
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
        _mark_alerts(ax, job)

    coll = next((j.tensors[name].collection for j in jobs if name in j.tensors), "")
    return Section(
        f"band:{name}",
        f"distribution of {name} ({coll}): min..p5..mean..p95..max over steps",
        True,
        draw,
        choose_scale(arrays),
        "value",
    )


def _dead_section(jobs: Sequence[JobData]) -> Section | None:
    if not any(t.has_activity for j in jobs for t in j.tensors.values()):
        return None

    def draw(ax: Axes, job: JobData | None, _: Sequence[JobData]) -> None:
        assert job is not None
        shown, _hidden = _pick_lines([t for t in job.tensors.values() if t.has_activity])
        for t in shown:
            ax.plot(*_finite(t.series.x(), t.series.array("dead")), lw=1.2, label=t.name)
        _mark_alerts(ax, job)

    return Section(
        "dead",
        f"dead-unit fraction (units active in < {DEAD_EDGE:.0%} of samples)",
        True,
        draw,
        Scale("linear", -0.02, 1.02),
        "fraction of units",
    )


def build_sections(
    jobs: Sequence[JobData],
    *,
    stat: str = "abs_mean",
    bands: int = 3,
    collections: Sequence[str] | None = None,
) -> list[Section]:
    """What the report shows, in order: losses, per-layer `stat` per collection, bands, dead units.

    `collections` keeps only those of the per-layer sections (all that are present when none of
    them is).
    """
    if stat not in STATS:
        raise ConfigError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    out: list[Section] = []
    loss = _loss_section(jobs)
    if loss is not None:
        out.append(loss)
    present: list[str] = []
    for j in jobs:
        present += [c for c in j.collections() if c not in present]
    order = [c for c in COLLECTION_ORDER if c in present] + sorted(set(present) - set(COLLECTION_ORDER))
    if collections is not None and any(c in order for c in collections):
        order = [c for c in order if c in collections]
    out += [_stat_section(jobs, c, stat) for c in order]
    out += [_band_section(jobs, name) for name in _band_tensors(jobs, bands)]
    dead = _dead_section(jobs)
    if dead is not None:
        out.append(dead)
    return out


# --------------------------------------------------------------------------- rendering


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "tensorpulse report draws with matplotlib: pip install 'tensorpulse[report]'"
        ) from exc


def _draw_rows(fig: Figure, sections: Sequence[Section], jobs: Sequence[JobData]) -> list[list[Axes]]:
    """Lay `sections` out as rows (a per-job section gets one row per job) sharing the step axis."""
    rows = [(s, j) for s in sections for j in (jobs if s.per_job else [None])]
    heights = [1.0 if j is None and len(jobs) > 1 else 0.85 for _, j in rows]
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})
    out: list[list[Axes]] = []
    i = 0
    for s in sections:
        group = []
        for j in jobs if s.per_job else [None]:
            ax = axes[i][0]
            i += 1
            s.draw(ax, j, jobs)
            s.scale.apply(ax)
            ax.set_ylabel(s.ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3, lw=0.5)
            title = s.title if j is None else f"{s.title}  —  {j.job}"
            ax.set_title(title, fontsize=9, loc="left")
            handles, _ = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
            group.append(ax)
        out.append(group)
    axes[-1][0].set_xlabel("step", fontsize=8)
    axes[-1][0].tick_params(labelbottom=True)
    return out


def _figure(rows: int, width: float = 11.0, row_height: float = 2.3) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, max(2.6, row_height * rows + 0.6)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def section_figures(sections: Sequence[Section], jobs: Sequence[JobData]) -> list[tuple[Section, Figure]]:
    """One figure per section (the HTML report's pictures)."""
    _require_matplotlib()
    out = []
    for s in sections:
        fig = _figure(len(jobs) if s.per_job else 1)
        _draw_rows(fig, [s], jobs)
        out.append((s, fig))
    return out


def _png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


#: The per-layer sections of the one-picture report (the HTML report has every collection).
PNG_COLLECTIONS = ("weights", "gradients", "activations")


def render_png(jobs: Sequence[JobData], *, stat: str = "abs_mean", bands: int = 1, dpi: int = 100) -> bytes:
    """The report as one PNG, its sections stacked on one step axis: losses, weights, gradients,
    activations (or whatever collections were captured), `bands` distribution bands, dead units."""
    _require_matplotlib()
    sections = build_sections(jobs, stat=stat, bands=bands, collections=PNG_COLLECTIONS)
    if not sections:
        raise ConfigError(
            f"nothing to draw: no loss or tensor statistics in {', '.join(j.job for j in jobs)}"
        )
    rows = sum(len(jobs) if s.per_job else 1 for s in sections)
    fig = _figure(rows, width=12.0, row_height=2.2)
    fig.suptitle(f"tensorpulse report: {', '.join(j.job for j in jobs)}", fontsize=11, x=0.01, ha="left")
    _draw_rows(fig, sections, jobs)
    return _png_bytes(fig, dpi)


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
