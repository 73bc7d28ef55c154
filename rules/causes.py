"""One root cause, one alert: which rules' alerts follow from which other rule's, for the same job.

One fault trips several rules. On the held-out corpus (tests/heldout.py) and the demo's faults,
measured with the default rules:

- dead ReLUs (the demo's biases at -50; the deadrelu scenario's at -20): DeadRelu, with
  VanishingGradient and AllZero at the same step (dead units pass no gradient), then
  UnchangedTensor (1 step later), WeightUpdateRatio (10) and LossNotDecreasing (39);
  PoorWeightInitialization at the same step where the biases were bad from the start;
- an exploding learning rate: WeightUpdateRatio and DeadRelu 2-4 steps *before* the first
  non-finite value makes ExplodingTensor fire;
- vanishing gradients (a deep sigmoid net): VanishingGradient, then UnchangedTensor (1 step
  later), WeightUpdateRatio (9) and LossNotDecreasing (238);
- a learning rate of 0 (stalled) or a layer left out of the optimizer: UnchangedTensor, then
  WeightUpdateRatio (8) and LossNotDecreasing (147);
- an overfit run: Overfit, then UnchangedTensor on a bias once the tiny set is memorised.

`FOLLOW_ONS` says so once, as direct edges root -> follow-on rules; a rule's follow-ons include
those of its follow-ons (`follow_ons`), so ExplodingTensor covers everything a dead ReLU trips.
The shipped Alertmanager config (deploy/alertmanager/alertmanager.yml) inhibits follow-ons while
a root fires for the same training job (`inhibit_rules` generates those entries and a unit test
checks the file against it), and `tensorpulse alerts` prints a follow-on under its root
(`CauseGroups`). Names are catalogue names: a rule given a `name` of its own in a rules file is
in no group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from tensorpulse.events import AlertEvent

#: Root rule -> the rules whose alerts directly follow from it on the same job (see above).
FOLLOW_ONS: Mapping[str, tuple[str, ...]] = {
    "ExplodingTensor": (
        "DeadRelu",
        "VanishingGradient",
        "WeightUpdateRatio",
        "LossNotDecreasing",
        "TensorVariance",
        "Overfit",
        "SaturatedActivation",
    ),
    "DeadRelu": (
        "VanishingGradient",
        "AllZero",
        "PoorWeightInitialization",
        "UnchangedTensor",
        "WeightUpdateRatio",
        "LossNotDecreasing",
    ),
    "VanishingGradient": ("UnchangedTensor", "WeightUpdateRatio", "LossNotDecreasing"),
    "AllZero": ("UnchangedTensor",),
    "Overfit": ("UnchangedTensor",),
    "UnchangedTensor": ("WeightUpdateRatio", "LossNotDecreasing"),
}

#: The label that names the training job on alerts sent to Alertmanager (sinks/alertmanager.py).
JOB_LABEL = "training_job"


@cache
def follow_ons(rule: str) -> frozenset[str]:
    """Every rule whose alert follows from `rule`'s, directly or through another follow-on."""
    out: set[str] = set()
    todo = list(FOLLOW_ONS.get(rule, ()))
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(FOLLOW_ONS.get(name, ()))
    return frozenset(out)


def root_of(rule: str, firing: Iterable[str]) -> str | None:
    """The firing rule that `rule`'s alert follows from, or None when it stands alone.

    Among the firing rules whose follow-ons include `rule`, the topmost: one that does not itself
    follow from another of them (ExplodingTensor over DeadRelu over VanishingGradient); ties go
    to the rule listed first in FOLLOW_ONS.
    """
    roots = [r for r in FOLLOW_ONS if r in set(firing) and r != rule and rule in follow_ons(r)]
    top = [r for r in roots if not any(r in follow_ons(other) for other in roots)]
    return top[0] if top else None


def inhibit_rules() -> list[dict[str, Any]]:
    """The Alertmanager `inhibit_rules` entries of FOLLOW_ONS: while a root fires for a training
    job, its follow-ons for that job (any rank) are not notified."""
    return [
        {
            "source_matchers": [f'alertname="{root}"'],
            "target_matchers": [f'alertname=~"{"|".join(sorted(follow_ons(root)))}"'],
            "equal": [JOB_LABEL],
        }
        for root in FOLLOW_ONS
    ]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an alert event goes in grouped output."""

    #: The firing root cause it follows from (None: it stands alone, or is a root itself).
    follows: str | None = None
    #: For a root that starts firing: its follow-ons already firing for the job (they fired first).
    explains: tuple[str, ...] = ()


@dataclass
class CauseGroups:
    """Places alert events under their root cause as they arrive: a fold over the alerts topic.

    A rule fires for a job while any of its ranks fires; an event follows a root that fires for
    the same job when the event comes (a resolved follow-on too, if its root still fires). A
    follow-on that fired before its root (an exploding run: WeightUpdateRatio a few steps before
    ExplodingTensor) is named by the root's `explains` instead.
    """

    #: job -> rule -> ranks firing.
    firing: dict[str, dict[str, set[int]]] = field(default_factory=dict)

    def place(self, ev: AlertEvent) -> Placement:
        """The event's placement; updates what fires for its job."""
        rules = self.firing.setdefault(ev.job, {})
        if ev.status == "resolved":
            follows = root_of(ev.rule, rules)
            ranks = rules.get(ev.rule, set())
            ranks.discard(ev.rank)
            if not ranks:
                rules.pop(ev.rule, None)
            if not rules:
                del self.firing[ev.job]
            return Placement(follows)
        new = ev.rule not in rules
        rules.setdefault(ev.rule, set()).add(ev.rank)
        follows = root_of(ev.rule, rules)
        if follows is not None or not new:
            return Placement(follows)
        explains = tuple(r for r in rules if r != ev.rule and root_of(r, rules) == ev.rule)
        return Placement(None, explains)


#: How far `tensorpulse alerts` indents a follow-on under its root.
INDENT = "    "


def grouped_lines(ev: AlertEvent, placement: Placement) -> list[str]:
    """The lines `tensorpulse alerts` prints for one event: a follow-on indented and marked with
    its root, a root followed by the follow-ons it explains that fired before it."""
    if placement.follows is not None:
        return [f"{INDENT}{ev.format()} (follows {placement.follows})"]
    lines = [ev.format()]
    if placement.explains:
        lines.append(f"{INDENT}(explains {', '.join(placement.explains)}, firing before it)")
    return lines


def _print_inhibit_rules() -> None:
    """Print the generated entries in the shipped config's style, to paste under `inhibit_rules:`."""
    for r in inhibit_rules():
        (source,), (target,) = r["source_matchers"], r["target_matchers"]
        print(
            f"  - source_matchers: ['{source}']\n    target_matchers: ['{target}']\n    equal: [{', '.join(r['equal'])}]"
        )


if __name__ == "__main__":
    _print_inhibit_rules()
