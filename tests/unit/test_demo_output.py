"""The live demo groups alerts under their root cause as `tensorpulse alerts` does (rules/causes.py)."""

from __future__ import annotations

from tensorpulse.demo import ALERT_MARK, alert_lines, root_causes
from tensorpulse.events import AlertEvent
from tensorpulse.rules.causes import CauseGroups


def ev(rule: str, status: str = "firing", step: int = 1, rank: int = 0) -> AlertEvent:
    return AlertEvent(
        job="demo-x", rule=rule, status=status, step=step, mode="train", severity="warning", rank=rank, ts=0.0
    )


def _printed(events: list[AlertEvent]) -> list[str]:
    groups = CauseGroups()
    return [line for e in events for line in alert_lines(e, groups.place(e))]


def test_a_follow_on_is_printed_under_its_root_and_marked() -> None:
    """The dead-ReLU fault: DeadRelu first, then VanishingGradient and UnchangedTensor indented under it."""
    events = [ev("DeadRelu", step=160), ev("VanishingGradient", step=160), ev("UnchangedTensor", step=161)]
    lines = _printed(events)
    assert lines[0] == ALERT_MARK + events[0].format()
    assert lines[1] == f"{ALERT_MARK}    {events[1].format()} (follows DeadRelu)"
    assert lines[2] == f"{ALERT_MARK}    {events[2].format()} (follows DeadRelu)"


def test_a_root_that_fires_after_its_follow_ons_says_it_explains_them() -> None:
    """The exploding fault: DeadRelu fires two steps before ExplodingTensor, which then names it."""
    lines = _printed([ev("DeadRelu", step=162), ev("ExplodingTensor", step=164)])
    assert len(lines) == 3 and lines[1].startswith(ALERT_MARK) and "ExplodingTensor" in lines[1]
    assert lines[2] == " " * len(ALERT_MARK) + "    (explains DeadRelu, firing before it)"
    assert sum(line.startswith(ALERT_MARK) for line in lines) == 2  # one mark per event


def test_the_summary_names_one_line_per_root_cause() -> None:
    """Follow-ons that fired before their root, after it, or through another follow-on all count under it;
    a rule in no group stands alone; resolved events add nothing."""
    events = [
        ev("WeightUpdateRatio", step=100),
        ev("DeadRelu", step=102),
        ev("ExplodingTensor", step=104),
        ev("VanishingGradient", step=105),
        ev("StalledTrainingRule", step=106),
        ev("VanishingGradient", "resolved", step=107),
    ]
    assert root_causes(events) == {
        "ExplodingTensor": ["WeightUpdateRatio", "DeadRelu", "VanishingGradient"],
        "StalledTrainingRule": [],
    }
    assert root_causes([]) == {}
