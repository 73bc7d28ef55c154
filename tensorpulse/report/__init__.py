"""`tensorpulse report`: pictures of one or more jobs' statistics over steps, with their alerts.

Input is what `tensorpulse.replay` reads and decodes (the same reader, the same codec); alerts
are the rules replayed on those records, so a report needs no worker to have run and shows
what a rules file would flag. The package's modules, in the order the data goes through them:
`data` turns records into per-job series (bounded memory: long series are thinned by doubling
their stride); `panels` (with `heatmaps`, `axes` and `scales`) decides what to draw;
`layout` lays the sections out as figures; this module writes them as a self-contained page
(`render_html`) or one picture (`render_png`). Every job of a section shares the step axis and
the y scale (log when the values span decades). Matplotlib (the `report` extra) draws with the
Agg backend, never on screen.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .data import STATS, JobData, collect_job
from .layout import png_bytes, report_figure, section_figures
from .panels import build_sections

__all__ = [
    "STATS",
    "JobData",
    "build_sections",
    "collect_job",
    "render_html",
    "render_png",
    "report_figure",
    "write_report",
]


def render_png(jobs: Sequence[JobData], *, stat: str = "abs_mean", bands: int = 1, dpi: int = 100) -> bytes:
    """The report as one PNG (see `report_figure`); `stat` and `bands` concern the HTML report's
    details and are accepted for symmetry with it."""
    if stat not in STATS:
        raise ConfigError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
    return png_bytes(report_figure(jobs), dpi)


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
        data = base64.b64encode(png_bytes(fig)).decode()
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
