"""The report reads at a glance: the docs' picture is rebuilt from a real run and checked for its structure.

docs/build_images.py trains the demo's exploding run in-process (records to a list, not Kafka)
and draws it. These tests run it into a temporary folder and look at the figure the way a reader
would: one panel per question, every alert named once and marked in every panel, no tick label
on top of another, no legend over the data, a loss axis that shows the loss going down. They
also compare the committed docs/img/report.png's description with a fresh run's, so a change to
the demo, the rules or the report that changes the picture fails until the image is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("torch")

from PIL import Image  # noqa: E402  (matplotlib's own dependency)

from tensorpulse.report.axes import ALERT_MARK, LANE, PANEL, QUESTIONS  # noqa: E402
from tensorpulse.report.data import JobData, TensorSeries, Thinned  # noqa: E402
from tensorpulse.report.layout import overlapping, report_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "build_images.py"
COMMITTED = ROOT / "docs" / "img" / "report.png"


def _script():
    spec = importlib.util.spec_from_file_location("build_images", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the script, the demo run's JobData, its report figure, the PNG the script wrote)."""
    mod = _script()
    job = mod.collect(mod.demo_run())
    out = tmp_path_factory.mktemp("img")
    [png] = mod.build(out, job=job)
    return mod, job, report_figure([job]), png


def all_axes(fig) -> list:
    """The figure's axes and their insets (the heat maps' colour bars)."""
    return [a for ax in fig.axes for a in (ax, *ax.child_axes)]


def tick_overlaps(fig) -> list[str]:
    """Per axis of every axes, the pairs of visible tick labels whose boxes overlap."""
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in all_axes(fig):
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            labels = [
                label
                for t in axis.get_major_ticks() + axis.get_minor_ticks()
                for label in (t.label1, t.label2)  # label2: a colour bar's, on the right
                if label.get_visible() and label.get_text() and lo <= t.get_loc() <= hi
            ]
            for i, k in overlapping(lab.get_window_extent(renderer) for lab in labels):
                out.append(
                    f"{ax.get_title(loc='left')[:40]!r} {name}: {labels[i].get_text()} / {labels[k].get_text()}"
                )
    return out


def legend_cover(fig) -> list[tuple[str, float]]:
    """Per legend, the fraction of its axes' plotting area it covers."""
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        a, b = ax.get_window_extent(renderer), leg.get_window_extent(renderer)
        w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
        h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
        out.append((ax.get_title(loc="left")[:40], w * h / (a.width * a.height)))
    return out


def check_reads_at_a_glance(fig) -> None:
    """What every report figure must satisfy (shared by the demo's picture and the many-layer one)."""
    fig.canvas.draw()
    assert tick_overlaps(fig) == []
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    for ax in all_axes(fig):  # titles and labels stay on the picture
        for text in (ax.title, ax._left_title, ax.xaxis.label, ax.yaxis.label):
            if text.get_text():
                box = text.get_window_extent(renderer)
                assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, text.get_text()
    assert all(share < 0.02 for _, share in legend_cover(fig)), legend_cover(fig)
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend() is not None]
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_gid() == "alert-label"]
        assert overlapping(t.get_window_extent(renderer) for t in labels) == []
        for t in ax.texts:  # the first report wrote alert names across the legends beside the panels
            box = t.get_window_extent(renderer)
            assert not any(overlapping([box, leg]) for leg in legends), t.get_text()


def test_docs_image_is_built_and_current(built) -> None:
    """The script writes a PNG whose description (alerts, panels) is the committed image's: not stale."""
    mod, job, fig, png = built
    fresh = json.loads(Image.open(png).text["Description"])
    assert fresh == mod.describe(fig, job)
    assert fresh["alerts"] == ["WeightUpdateRatio@160", "DeadRelu@162", "ExplodingTensor@164"]
    committed = json.loads(Image.open(COMMITTED).text.get("Description", "{}"))
    assert committed == fresh, "docs/img/report.png is stale: run python docs/build_images.py"


def test_one_panel_per_question_with_the_alerts_marked(built) -> None:
    """Three panels titled by their question; the lane names each alert once; every panel marks each alert."""
    _mod, job, fig, _png = built
    panels = [ax for ax in fig.axes if ax.get_label() == PANEL]
    assert [ax.get_title(loc="left").split("  ")[0] for ax in panels] == list(QUESTIONS.values())
    [lane] = [ax for ax in fig.axes if ax.get_label() == LANE]
    named = [t.get_text().strip() for t in lane.texts]
    assert named == ["WeightUpdateRatio @ 160", "DeadRelu @ 162", "ExplodingTensor @ 164"]
    for ax in panels:
        marks = sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() == ALERT_MARK)
        assert marks == [160, 162, 164], ax.get_title(loc="left")
    steps = {a.step for a in job.firing()}
    assert steps == {160, 162, 164}


def test_demo_figure_reads_at_a_glance(built) -> None:
    """No overlapping tick labels or alert names, legends off the data."""
    check_reads_at_a_glance(built[2])


def test_without_gradients_the_norms_of_another_collection_read_too() -> None:
    """A job with weights only (and a narrow range of norms) falls back to them, titled so, still readable."""
    job = _many_layers(layers=1)
    for t in job.tensors.values():
        if t.collection == "gradients":
            t.collection = "weights"
    fig = report_figure([job])
    check_reads_at_a_glance(fig)
    heat = [ax for ax in fig.axes if ax.get_label() == PANEL][1]
    assert "weights L2 norm (no gradients captured)" in heat.get_title(loc="left")


def test_loss_axis_shows_the_loss_going_down(built) -> None:
    """Linear, and the healthy part (before the fault) fills most of the axis: not a flat line under a 1e19 spike."""
    _mod, job, fig, _png = built
    loss = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith(QUESTIONS["loss"]))
    assert loss.get_yscale() == "linear"
    s = job.scalars[("train", "loss")]
    healthy = s.array("value")[s.x() < 150]
    lo, hi = loss.get_ylim()
    assert (healthy.max() - healthy.min()) / (hi - lo) > 0.5, (lo, hi)


def _many_layers(layers: int = 60, steps: int = 50) -> JobData:
    """A job with `layers` gradient tensors of decades-apart norms and as many ReLU outputs with activity."""
    job = JobData("many")
    for k in range(layers):
        for coll, name in (
            ("gradients", f"gradient/blocks.{k}.mlp.weight"),
            ("activations", f"blocks.{k}/relu"),
        ):
            t = job.tensors[name] = TensorSeries(name, coll, Thinned(("l2", "dead"), 1000))
            for s in range(steps):
                t.series.add(s, {"l2": 10.0 ** (-k / 10) * (1 + s / steps), "dead": min(1.0, k * s / 2000)})
    loss = job.scalars[("train", "loss")] = Thinned(("value",), 1000)
    for s in range(steps):
        loss.add(s, {"value": 2.0 / (1 + s)})
    return job


def test_many_layers_stay_readable() -> None:
    """With 60 layers the heat maps thin their row labels instead of stacking them."""
    fig = report_figure([_many_layers()])
    check_reads_at_a_glance(fig)
    heat = [ax for ax in fig.axes if ax.get_label() == PANEL][1]
    shown = [t for t in heat.get_yticklabels() if t.get_text()]
    assert 5 <= len(shown) < 60
    assert all(t.get_text().startswith("blocks.") for t in shown)  # the prefix "gradient/" is dropped


def test_checks_fail_on_a_cluttered_figure() -> None:
    """The overlap checks can fail: tick labels forced onto each other and a legend on the data are caught."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(np.arange(10), label="a long legend entry that covers the data")
    ax.set_xticks(np.linspace(0, 0.5, 6), [f"{v:.6f}" for v in np.linspace(0, 0.5, 6)])
    ax.legend(loc="center")
    fig.canvas.draw()
    assert tick_overlaps(fig)
    assert max(share for _, share in legend_cover(fig)) > 0.02
    with pytest.raises(AssertionError):
        check_reads_at_a_glance(fig)
