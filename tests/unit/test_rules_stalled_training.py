"""StalledTrainingRule: a clock rule that fires when no record was published for `threshold` seconds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import Finding, StalledTrainingRule
from tensorpulse.rules.base import State
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import MODES, StepRecord

Event = tuple[float, StepRecord | None]  # (arrival time, record) or (clock time, None) for a tick


def at(ts: float, step: int = 0, mode: str = "train") -> StepRecord:
    return dataclasses.replace(make_record(step, mode=mode), ts=ts)


def drive(
    rule: StalledTrainingRule, events: list[Event], roundtrip_every: int | None = None
) -> list[tuple[float, Finding]]:
    """Feed records to update and ticks to check_idle, as the stream layer does; JSON round trips optional."""
    state: State = rule.initialize()
    out = []
    for i, (now, record) in enumerate(events, 1):
        state, finding = rule.update(state, record) if record is not None else rule.check_idle(state, now)
        if roundtrip_every and i % roundtrip_every == 0:
            state = json.loads(json.dumps(state))
        if finding is not None:
            out.append((now, finding))
    return out


def test_declares_a_clock_rule_for_every_mode() -> None:
    """The stream layer calls check_idle only for clock rules; any mode's record is a sign of life."""
    assert StalledTrainingRule.clock is True
    assert StalledTrainingRule.modes == frozenset(MODES)
    assert StalledTrainingRule().params.threshold == 1800.0


@pytest.mark.parametrize(
    ("threshold", "idle", "expected"),
    [
        (1800.0, 0.0, False),
        (1800.0, 1799.9, False),
        (1800.0, 1800.0, False),  # exactly the threshold is not more
        (1800.0, 1800.001, True),
        (60.0, 61.0, True),
        (60.0, 59.0, False),
        (0.5, 1.0, True),
    ],
)
def test_idle_threshold_table(threshold: float, idle: float, expected: bool) -> None:
    """check_idle fires when now − last publish time exceeds the threshold; value is the idle time."""
    rule = StalledTrainingRule(threshold=threshold)
    state, _ = rule.update(rule.initialize(), at(1000.0, step=41))
    _, finding = rule.check_idle(state, 1000.0 + idle)
    assert finding is not None and finding.firing is expected
    assert finding.value == pytest.approx(idle) and finding.threshold == threshold
    if expected:
        assert "train step 41" in finding.message


def test_nothing_to_say_before_the_first_record() -> None:
    """Before any record check_idle returns None (the job may not have started)."""
    rule = StalledTrainingRule()
    assert rule.check_idle(rule.initialize(), 1e12) == (rule.initialize(), None)


def test_fires_then_resolves_when_a_record_arrives() -> None:
    """A stall fires from check_idle; the next record's update returns a non-firing finding with the gap."""
    rule = StalledTrainingRule(threshold=100.0)
    events: list[Event] = [(0.0, at(0.0)), (50.0, None), (150.0, None), (160.0, at(160.0, 1)), (170.0, None)]
    out = drive(rule, events)
    assert [(now, f.firing, f.value) for now, f in out] == [
        (0.0, False, None),
        (50.0, False, 50.0),
        (150.0, True, 150.0),
        (160.0, False, 160.0),  # the gap the record ended
        (170.0, False, 10.0),
    ]


def test_late_record_does_not_move_time_back() -> None:
    """A record published earlier than the newest one seen (another rank, a retry) keeps the newest."""
    rule = StalledTrainingRule(threshold=100.0)
    state, _ = rule.update(rule.initialize(), at(500.0, step=5))
    state, finding = rule.update(state, at(300.0, step=3, mode="eval"))
    assert finding is not None and not finding.firing and finding.value == 0.0
    assert state == {"ts": 500.0, "step": 5, "mode": "train"}
    assert not rule.check_idle(state, 590.0)[1].firing  # type: ignore[union-attr]


@pytest.mark.parametrize("threshold", [0.0, -5.0])
def test_invalid_threshold(threshold: float) -> None:
    """A threshold must be a positive number of seconds."""
    with pytest.raises(ConfigError):
        StalledTrainingRule(threshold=threshold)


def _timeline(n_records: int, seed: int = 0) -> list[Event]:
    """Records with mostly short gaps, some long stalls and a few late (out-of-order) ones, and a tick every 5 s."""
    rng = np.random.default_rng(seed)
    gaps = np.where(
        rng.random(n_records) < 0.05, rng.uniform(40, 200, n_records), rng.uniform(0.5, 6, n_records)
    )
    arrivals = np.cumsum(gaps)
    events: list[Event] = []
    for i, t in enumerate(arrivals):
        ts = float(t) - (float(rng.uniform(10, 30)) if rng.random() < 0.05 else 0.0)
        events.append((float(t), at(ts, step=i)))
    events += [(float(t), None) for t in np.arange(0.0, arrivals[-1] + 60, 5.0)]
    events.sort(key=lambda e: (e[0], e[1] is None))
    return events


@pytest.mark.parametrize("threshold", [30.0, 60.0, 100.0])
def test_matches_batch_reference(threshold: float) -> None:
    """At every tick the rule fires iff now − max(ts of the records that arrived before) > threshold."""
    events = _timeline(300)
    out = drive(StalledTrainingRule(threshold=threshold), events)
    expected = []
    for i, (now, record) in enumerate(events):
        earlier = [r.ts for _, r in events[: i + 1] if r is not None]
        if record is None and earlier:
            expected.append((now, now - max(earlier) > threshold, now - max(earlier)))
        elif record is not None:
            expected.append((now, False, None))
    assert [(now, f.firing) for now, f in out] == [e[:2] for e in expected]
    ticks = [(f.value, e[2]) for (_, f), e in zip(out, expected, strict=True) if e[2] is not None]
    assert [v for v, _ in ticks] == pytest.approx([r for _, r in ticks])
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged (ticks and records)."""
    events = _timeline(200)
    rule = StalledTrainingRule(threshold=60.0)
    plain = drive(rule, events)
    for k in (1, 7):
        assert repr(drive(rule, events, roundtrip_every=k)) == repr(plain)
    records = [r for _, r in events if r is not None]
    assert repr(replay(rule, records, roundtrip_every=3)) == repr(replay(rule, records))


def test_state_flat_over_100k_steps() -> None:
    """The state is the newest ts, its step and mode: flat from 1k to 100k records."""
    rule = StalledTrainingRule()
    records = [at(1.7e9 + 2.0 * s, step=s) for s in range(100_000)]
    state, sizes = rule.initialize(), {}
    for i, record in enumerate(records, 1):
        state, _ = rule.update(state, record)
        state, _ = rule.check_idle(state, record.ts + 1.0)
        if i in (1_000, 100_000):
            sizes[i] = state_size(state)
    assert sizes[100_000] <= sizes[1_000] + 2  # only the step number gains digits
