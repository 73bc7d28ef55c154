"""The default rule set on the held-out corpus (tests/heldout.py): silent on healthy runs, each fault caught.

The runs are real CPU trainings through the real TorchHook (about 10 s for all of them), replayed
through the worker's evaluator with the default rules, so these tests fail when a default moves
the rules back to crying wolf or lets a fault through.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import heldout  # noqa: E402

HEALTHY = [r for r in heldout.RUNS if r.expected is None]
FAULTS = [r for r in heldout.RUNS if r.expected is not None]


def test_corpus_has_the_shapes_asked_for() -> None:
    """At least six healthy shapes and a fault for each of the rules that name the common faults."""
    assert len(HEALTHY) >= 6
    assert {"ExplodingTensor", "VanishingGradient", "DeadRelu", "LossNotDecreasing", "Overfit"} <= {
        r.expected for r in FAULTS
    }


@pytest.mark.parametrize("run", HEALTHY, ids=lambda r: r.name)
def test_healthy_run_raises_no_alert(run: heldout.Run) -> None:
    """No default rule fires on a healthy run, not even once."""
    fired = heldout.firing(heldout.evaluate(run.name))
    assert not fired, f"{run.name} ({run.shape}): {dict(fired)}"


@pytest.mark.parametrize("run", FAULTS, ids=lambda r: r.name)
def test_fault_is_caught_by_its_rule(run: heldout.Run) -> None:
    """The rule that names the fault fires on it."""
    fired = heldout.firing(heldout.evaluate(run.name))
    assert fired[run.expected], f"{run.name} ({run.shape}): fired {dict(fired)}, not {run.expected}"


@pytest.mark.parametrize("run", FAULTS, ids=lambda r: r.name)
def test_fault_alert_does_not_flap(run: heldout.Run) -> None:
    """The rule that catches a fault fires once for it: hysteresis keeps it from resolving and firing again."""
    fired = heldout.firing(heldout.evaluate(run.name))
    assert fired[run.expected] <= 1, f"{run.name}: {run.expected} fired {fired[run.expected]} times"


def test_published_figures_are_reproducible() -> None:
    """The figures docs/rules.md shows (rules/measured.py) are what the corpus gives today; test_docs
    checks the doc renders them (refresh both: python tests/heldout.py --write-docs)."""
    from tensorpulse.rules import measured

    results = {r.name: heldout.evaluate(r.name) for r in heldout.RUNS}
    assert heldout.table(results) == measured.ROWS, "stale: run python tests/heldout.py --write-docs"
