"""One root cause, one alert: the root -> follow-on table, its Alertmanager entries and the CLI's grouping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tensorpulse.events import AlertEvent
from tensorpulse.rules import REGISTRY
from tensorpulse.rules.causes import (
    FOLLOW_ONS,
    CauseGroups,
    Placement,
    follow_ons,
    grouped_lines,
    inhibit_rules,
    root_of,
)

ROOT = Path(__file__).resolve().parents[2]
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def ev(rule: str, status: str = "firing", job: str = "j", rank: int = 0, step: int = 1) -> AlertEvent:
    return AlertEvent(
        job=job, rule=rule, status=status, step=step, mode="train", severity="warning", rank=rank, ts=0.0
    )


def test_table_names_catalogue_rules_and_has_no_cycle() -> None:
    """Every name is a catalogue rule, and no rule follows from itself (two rules inhibiting each
    other in Alertmanager would silence both)."""
    names = set(FOLLOW_ONS) | {r for targets in FOLLOW_ONS.values() for r in targets}
    assert names <= set(REGISTRY), names - set(REGISTRY)
    assert all(rule not in follow_ons(rule) for rule in FOLLOW_ONS)


def test_follow_ons_are_transitive() -> None:
    """A root covers what its follow-ons cover: ExplodingTensor reaches UnchangedTensor through DeadRelu."""
    assert "UnchangedTensor" not in FOLLOW_ONS["ExplodingTensor"]
    assert {"UnchangedTensor", "AllZero", "LossNotDecreasing"} <= follow_ons("ExplodingTensor")
    assert follow_ons("LossNotDecreasing") == frozenset()


@pytest.mark.parametrize(
    ("rule", "firing", "root"),
    [
        ("WeightUpdateRatio", [], None),
        ("WeightUpdateRatio", ["WeightUpdateRatio"], None),
        ("WeightUpdateRatio", ["UnchangedTensor"], "UnchangedTensor"),
        ("WeightUpdateRatio", ["UnchangedTensor", "VanishingGradient", "DeadRelu"], "DeadRelu"),
        ("VanishingGradient", ["VanishingGradient", "DeadRelu", "ExplodingTensor"], "ExplodingTensor"),
        ("UnchangedTensor", ["AllZero", "Overfit"], "AllZero"),  # two tops: the first in the table
        ("DeadRelu", ["VanishingGradient"], None),  # a follow-on never leads its root
        ("ExplodingTensor", ["DeadRelu", "VanishingGradient"], None),
        ("StalledTrainingRule", ["ExplodingTensor"], None),  # in no group
    ],
)
def test_root_of(rule: str, firing: list[str], root: str | None) -> None:
    """The topmost firing rule that `rule` follows from, or None."""
    assert root_of(rule, firing) == root


def test_groups_follow_ons_under_their_root_per_job() -> None:
    """A follow-on is placed under a root firing for the same job (any rank); another job's root
    does not count; a root that fires after its follow-ons names them."""
    g = CauseGroups()
    assert g.place(ev("WeightUpdateRatio", step=100)) == Placement()
    assert g.place(ev("DeadRelu", step=102)) == Placement(None, ("WeightUpdateRatio",))
    assert g.place(ev("ExplodingTensor", rank=1, step=104)) == Placement(
        None, ("WeightUpdateRatio", "DeadRelu")
    )
    assert g.place(ev("ExplodingTensor", rank=0, step=104)) == Placement()  # already firing: said once
    assert g.place(ev("LossNotDecreasing", job="other")) == Placement()
    assert g.place(ev("WeightUpdateRatio", "resolved", step=110)) == Placement("ExplodingTensor")
    assert g.place(ev("ExplodingTensor", "resolved", rank=1)) == Placement()
    assert g.place(ev("UnchangedTensor")) == Placement("ExplodingTensor")  # rank 0 still fires it
    g.place(ev("ExplodingTensor", "resolved", rank=0))
    assert g.place(ev("AllZero")) == Placement("DeadRelu")
    for rule in ("AllZero", "UnchangedTensor", "DeadRelu"):
        g.place(ev(rule, "resolved"))
    g.place(ev("LossNotDecreasing", "resolved", job="other"))
    assert g.firing == {}, "resolved alerts leave nothing behind"


def test_grouped_lines() -> None:
    """A follow-on is indented and names its root; a root lists what it explains below its line."""
    e = ev("AllZero")
    assert grouped_lines(e, Placement()) == [e.format()]
    (line,) = grouped_lines(e, Placement("DeadRelu"))
    assert line == f"    {e.format()} (follows DeadRelu)"
    root = ev("DeadRelu")
    assert grouped_lines(root, Placement(None, ("VanishingGradient", "AllZero"))) == [
        root.format(),
        "    (explains VanishingGradient, AllZero, firing before it)",
    ]


def test_shipped_alertmanager_config_follows_the_table() -> None:
    """deploy/alertmanager/alertmanager.yml groups by training job and holds exactly the generated
    inhibit entries (python -m tensorpulse.rules.causes prints them as they appear there)."""
    conf = yaml.safe_load(AM_CONFIG.read_text())
    assert conf["route"]["group_by"] == ["training_job"]
    roots = {f'alertname="{r}"' for r in FOLLOW_ONS}
    shipped = [r for r in conf["inhibit_rules"] if set(r["source_matchers"]) & roots]
    assert shipped == inhibit_rules()
    printed = subprocess.run(
        [sys.executable, "-m", "tensorpulse.rules.causes"], capture_output=True, text=True, check=True
    ).stdout
    assert printed in AM_CONFIG.read_text()


def test_one_alert_per_fault_of_the_corpus() -> None:
    """At the end of every faulty run of the held-out corpus, one alert stands un-grouped: the
    rule that names the fault, or the root it follows from (a learning rate of 0 leaves the
    weights unchanged, which is why the loss does not decrease)."""
    pytest.importorskip("torch")
    import heldout

    for run in heldout.RUNS:
        if run.expected is None:
            continue
        g = CauseGroups()
        for e in heldout.evaluate(run.name):
            g.place(e)
        firing = g.firing.get(f"heldout-{run.name}", {})
        standing = [r for r in firing if root_of(r, firing) is None]
        assert run.expected in firing, f"{run.name}: {run.expected} not firing at the end ({sorted(firing)})"
        assert standing in ([run.expected], [root_of(run.expected, firing)]), f"{run.name}: {standing}"


def test_docs_table_is_the_table() -> None:
    """docs/alerts.md's table of root causes shows FOLLOW_ONS as it is."""
    doc = (ROOT / "docs" / "alerts.md").read_text().split("### One root cause, one alert", 1)[1]
    shown: dict[str, tuple[str, ...]] = {}
    for row in doc.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if row.startswith("| ") and len(cells) == 2 and cells[0] != "root cause":
            for root in cells[0].split(", "):
                shown[root] = tuple(cells[1].split(", "))
    assert shown == dict(FOLLOW_ONS)
