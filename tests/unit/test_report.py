"""The report builder: series from encoded records, shared scales, a self-contained HTML page, a PNG."""

from __future__ import annotations

import base64
import math
import re
import struct

import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.errors import ConfigError
from tensorpulse.report import build_sections, collect_job, render_html, render_png, write_report
from tensorpulse.report.axes import PANEL, nonfinite_spans
from tensorpulse.report.data import Collector, JobData, Thinned
from tensorpulse.report.layout import lane_labels, section_figures
from tensorpulse.report.scales import choose_scale, loss_scale, smooth, smoothing_window
from tensorpulse.rules.config import parse_rules

pytest.importorskip("matplotlib")

RULES = parse_rules("defaults: false\nrules:\n  - rule: ExplodingTensor\n  - rule: DeadRelu\n")
NAMES = ["0.weight", "gradient/0.weight", "1/relu_output"]
COLLS = ["weights", "gradients", "activations"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(job: str, steps: int = 30, scale: float = 1.0, fault_at: int | None = None) -> list[bytes]:
    """Encoded records of a small job: weights, gradients (p5/p95 early) and a ReLU output with activity.

    From `fault_at` on, the loss is inf and 9 of 10 ReLU units are dead. `scale` multiplies
    every tensor statistic, so two jobs can differ by decades.
    """
    out = []
    for s in range(steps):
        sick = fault_at is not None and s >= fault_at
        g = 1e-3 * scale * (1 + 0.1 * s)
        floats = np.array(
            [
                [0.01 * scale, 0.1 * scale, -0.3 * scale, 0.3 * scale, 0.08 * scale],
                [0.0, g, -3 * g, 3 * g, g],
                [0.5 * scale, 0.4 * scale, 0.0, 2.0 * scale, 0.5 * scale],
            ],
            dtype=np.float32,
        )
        block = wire.TensorBlock(
            names=NAMES,
            collections=COLLS,
            n=np.array([100, 100, 640]),
            floats=floats,
            zeros=np.array([0, 0, 300]),
            activity={2: [10] + [9 if sick else 0] * 5},
            quantiles={1: (-2 * g, 2 * g)} if s < 5 else {},
        )
        out.append(
            wire.encode(
                job=job,
                rank=0,
                world=1,
                step=s,
                mode="train",
                ts=100.0 + s,
                seq=s,
                scalars={"loss": math.inf if sick else 2.0 / (s + 1)},
                tensors=block,
                announce=s == 0,
            )
        )
    return out


@pytest.fixture(scope="module")
def jobs():
    """Two jobs a factor 1e4 apart; job a has a fault at step 20."""
    return [
        collect_job(run("job-a", fault_at=20), "job-a", RULES),
        collect_job(run("job-b", scale=1e4), "job-b", RULES),
    ]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_collect_job_has_series_and_replayed_alerts(jobs) -> None:
    """Series per tensor and the loss; alerts are the rules replayed on the same records."""
    a = jobs[0]
    assert list(a.tensors) == NAMES
    assert a.tensors["0.weight"].series.steps == list(range(30))
    assert a.tensors["gradient/0.weight"].has_quantiles and not a.tensors["0.weight"].has_quantiles
    assert a.tensors["1/relu_output"].has_activity
    assert [(e.rule, e.step) for e in a.firing()] == [("ExplodingTensor", 20), ("DeadRelu", 20)]
    assert a.summary is not None and a.summary.records_read == 30
    assert jobs[1].alerts == []


def test_html_has_one_image_per_section_and_the_alert_table(jobs) -> None:
    """Each section is one embedded PNG (a per-job section holds every job); the table lists the alerts."""
    page = render_html(jobs)
    sections = build_sections(jobs)
    keys = re.findall(r'<img data-section="([^"]+)"', page)
    assert keys == [s.key for s in sections]
    assert {"loss", "stat:weights", "stat:gradients", "stat:activations", "dead"} <= set(keys)
    assert any(k.startswith("band:") for k in keys)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(keys)
    assert all(base64.b64decode(i)[:8] == PNG_MAGIC for i in images)
    table = page.split('<table id="alerts">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<tr class="(firing|resolved)">(.*?)</tr>', table)
    assert len(rows) == 2
    assert {r for r in ("ExplodingTensor", "DeadRelu") for _, row in rows if f"<td>{r}</td>" in row} == {
        "ExplodingTensor",
        "DeadRelu",
    }
    assert all("<td>job-a</td><td>20</td>" in row for _, row in rows)
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing to fetch


def test_png_is_a_valid_picture_of_sensible_size(jobs) -> None:
    """The single-picture report is a PNG between 800x600 and 5000x8000 pixels."""
    data = render_png(jobs)
    width, height = _png_size(data)
    assert 800 <= width <= 5000 and 600 <= height <= 8000, (width, height)


def test_jobs_share_the_y_scale_and_step_axis(jobs) -> None:
    """Every job's axis of a section has the same y limits and scale; 1e4 apart means a log axis."""
    figs = dict((s.key, fig) for s, fig in section_figures(build_sections(jobs), jobs))
    fig = figs["stat:weights"]
    axes = [ax for ax in fig.axes if ax.get_label() == PANEL]  # not the alert lane above them
    assert len(axes) == 2
    assert axes[0].get_ylim() == axes[1].get_ylim()
    assert axes[0].get_xlim() == axes[1].get_xlim()
    assert axes[0].get_yscale() == axes[1].get_yscale() == "log"
    lo, hi = axes[0].get_ylim()
    assert lo <= 0.08 and hi >= 0.08 * 1e4  # covers both jobs' abs_mean
    dead = [ax for ax in figs["dead"].axes if ax.get_label() == PANEL]
    assert len(dead) == 2 and dead[0].get_ylim() == dead[1].get_ylim()
    assert dead[0].get_xlim() == axes[0].get_xlim()


def test_choose_scale() -> None:
    """Linear for a narrow range, log for positive decades, symlog for signed decades; NaN/inf ignored."""
    assert choose_scale([np.array([1.0, 2.0, np.inf])]).kind == "linear"
    assert choose_scale([np.array([1e-3, 1.0]), np.array([10.0, np.nan])]).kind == "log"
    s = choose_scale([np.array([-1e5, 1e-2, 3.0])])
    assert s.kind == "symlog" and s.lo < -1e5 and s.hi > 3.0
    assert choose_scale([np.array([])]).kind == "linear"
    assert choose_scale([np.array([0.5])], fixed=(0.0, 1.0)) == choose_scale([], fixed=(0.0, 1.0))


def test_thinned_series_stay_bounded_and_evenly_spread() -> None:
    """A long series keeps fewer than 2*max_points points, spaced by a constant stride from step 0."""
    t = Thinned(("v",), max_points=100)
    for s in range(10_000):
        t.add(s, {"v": float(s)})
    assert 100 <= len(t.steps) < 200
    gaps = set(np.diff(t.steps))
    assert gaps == {t.stride} and t.steps[0] == 0
    assert t.cols["v"] == [float(s) for s in t.steps]


def test_tensor_regex_and_rank_filter() -> None:
    """--tensors keeps matching tensors only; records of other ranks are ignored."""
    c = Collector("job-a", tensors="weight$")
    cache = wire.SchemaCache()
    for p in run("job-a", steps=3):
        c.add(wire.decode(p, cache))
    assert list(c.data.tensors) == ["0.weight", "gradient/0.weight"]
    other = Collector("job-a", rank=1)
    for p in run("job-a", steps=3):
        other.add(wire.decode(p, cache))
    assert other.data.tensors == {} and other.data.scalars == {}
    with pytest.raises(ConfigError, match="--tensors"):
        Collector("j", tensors="(")
    with pytest.raises(ConfigError, match="--tensors.*RE2"):  # rule regexes' engine: linear time
        Collector("j", tensors=r"(?=weight)")


def test_nonfinite_steps_merge_into_spans() -> None:
    """Consecutive (or evenly saved) non-finite steps become one shaded span; a far step its own."""
    assert nonfinite_spans([160, 161, 162, 170]) == [(160, 162), (170, 170)]
    assert nonfinite_spans([10, 20, 30, 90]) == [(10, 30), (90, 90)]
    assert nonfinite_spans([]) == []


def test_write_report_by_suffix(jobs, tmp_path) -> None:
    """.png writes a PNG, .html a page; any other suffix is a clear error."""
    png = write_report(jobs[:1], tmp_path / "r.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert write_report(jobs[:1], tmp_path / "r.html").read_text().startswith("<!doctype html>")
    with pytest.raises(ConfigError, match=r"\.html or a \.png"):
        write_report(jobs, tmp_path / "r.pdf")


def test_loss_scale_keeps_the_course_not_the_spike() -> None:
    """A diverging tail is off scale (linear axis on the descent); a loss across decades gets a log axis."""
    descent = np.linspace(1.4, 0.8, 160)
    s = loss_scale([np.concatenate([descent, [50.0, 1e5, 1e19, np.inf]])])
    assert s.kind == "linear" and s.lo < 0.8 and 1.4 < s.hi < 2.0
    assert loss_scale([np.geomspace(10.0, 0.01, 200)]).kind == "log"
    # A high start is the shape to see, a spike later is not.
    start = np.concatenate([np.linspace(5.0, 1.0, 20), np.full(180, 1.0)])
    start[100] = 500.0
    s = loss_scale([start])
    assert s.kind == "linear" and 5.0 <= s.hi < 10.0
    assert loss_scale([np.array([np.nan])]) == loss_scale([])


def test_smooth_follows_the_trend_not_a_spike() -> None:
    """The running median ignores a one-step spike and NaN gaps, and has no lag on a ramp."""
    y = np.arange(50, dtype=float)
    y[25] = 1e6
    y[30] = np.nan
    out = smooth(y, 5)
    assert 23.0 <= out[25] <= 27.0 and out[30] == 30.0
    assert out[10] == 10.0  # centred: no lag
    assert smoothing_window(30) == 1 and smoothing_window(166) == 5 and smoothing_window(10**6) == 51


def test_lane_labels_never_overlap_and_count_what_they_leave_out() -> None:
    """Thirty alerts on consecutive steps: labels in rows without overlap, those without a row counted."""
    from tensorpulse.events import AlertEvent

    job = JobData("j")
    job.alerts = [
        AlertEvent(
            job="j", rule=f"Rule{k}", status="firing", step=k, rank=0, mode="train", severity="warning"
        )
        for k in range(30)
    ]
    labels, dropped = lane_labels([job], (0.0, 100.0), data_per_char=0.5, max_levels=6)
    assert {lab.level for lab in labels} == set(range(6)) and dropped == 30 - len(labels) > 0
    for level in range(6):
        spans = sorted(
            (lab.step, lab.step + (len(lab.text) + 1) * 0.5)
            if lab.align == "left"
            else (lab.step - (len(lab.text) + 1) * 0.5, lab.step)
            for lab in labels
            if lab.level == level
        )
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
    right, _ = lane_labels([job], (0.0, 31.0), data_per_char=0.5, max_levels=40)
    assert right[-1].align == "right"  # near the axis's end a label runs left of its marker
