"""LossNotDecreasing: window means every num_steps, stalled or rising for `patience` checks."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import LossNotDecreasing
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import MODES, StepRecord


def losses(values: Sequence[float], mode: str = "train", start: int = 0) -> list[StepRecord]:
    return [make_record(start + i, mode=mode, scalars={"loss": float(v)}) for i, v in enumerate(values)]


def firing_steps(rule: LossNotDecreasing, records: list[StepRecord]) -> list[int]:
    _, out = replay(rule, records)
    return [s for s, f in out if f.firing]


def test_noisy_improving_loss_does_not_fire() -> None:
    """A loss that keeps improving under ±20 % minibatch noise never fires over 1000 steps."""
    rng = np.random.default_rng(0)
    steps = np.arange(1000)
    values = np.exp(-steps / 200) * (1 + 0.2 * rng.uniform(-1.0, 1.0, steps.size))
    _, out = replay(LossNotDecreasing(), losses(values))
    assert len(out) == 99  # one finding per check after the first
    assert not any(f.firing for _, f in out)


def test_noisy_constant_loss_fires_within_100_steps() -> None:
    """A frozen learning rate (noisy constant loss) fires within 100 steps."""
    rng = np.random.default_rng(0)
    values = 2.3 * (1 + 0.2 * rng.standard_normal(1000))
    fired = firing_steps(LossNotDecreasing(), losses(values))
    assert fired and fired[0] < 100


@pytest.mark.parametrize(
    ("windows", "expected"),
    [
        # window means (num_steps=1, so one loss per check); None = no finding at that check
        ([10, 9, 8, 7, 6], [None, False, False, False, False]),
        ([10, 9, 9, 9, 9], [None, False, False, False, True]),  # stalled 3 checks
        ([10, 9, 9, 9, 9, 8], [None, False, False, False, True, False]),  # resolves on improving
        ([10, 9, 9, 9, 8.5, 9, 9, 9], [None, False, False, False, False, False, False, True]),
        ([10, 5, 6, 7, 8], [None, False, False, False, True]),  # rising
    ],
)
def test_check_table(windows: list[float], expected: list[bool | None]) -> None:
    """Checks fire after `patience` stalled/rising checks and resolve at the first improving one."""
    rule = LossNotDecreasing(num_steps=1)
    _, out = replay(rule, losses(windows))
    got = dict((s, f.firing) for s, f in out)
    assert [got.get(i) for i in range(len(windows))] == expected


@pytest.mark.parametrize(
    ("second", "diff_percent", "expected"),
    [
        (99.9, 0.1, False),  # exactly 0.1 % better than the best is an improvement
        (99.91, 0.1, True),  # 0.09 % better is a stall
        (99.0, 1.0, False),
        (99.5, 1.0, True),
        (100.0, 0.0, False),  # stalled means W > best·(1 − d): equal is not stalled at d = 0
        (100.01, 0.0, True),
    ],
)
def test_diff_percent_boundary(second: float, diff_percent: float, expected: bool) -> None:
    """A check stalls unless its mean is below the best by at least diff_percent %."""
    rule = LossNotDecreasing(num_steps=1, patience=1, diff_percent=diff_percent)
    _, out = replay(rule, losses([100.0, second]))
    assert [(s, f.firing) for s, f in out] == [(1, expected)]


def test_rising_message_and_value() -> None:
    """A rising loss says so; value is the improvement over the best in percent (negative)."""
    _, out = replay(LossNotDecreasing(num_steps=1, patience=1), losses([10, 5, 6]))
    step, finding = out[-1]
    assert step == 2 and finding.firing
    assert "rose" in finding.message
    assert finding.value == pytest.approx(-20.0)
    assert finding.threshold == 0.1


def test_findings_only_at_check_steps() -> None:
    """With num_steps=10 findings come every 10 saved steps, starting at the second check."""
    _, out = replay(LossNotDecreasing(), losses([1.0 / (s + 1) for s in range(50)]))
    assert [s for s, _ in out] == [19, 29, 39, 49]


def test_nan_and_repeated_steps_are_ignored() -> None:
    """NaN/inf losses, repeated steps and records without a loss do not count as saved steps."""
    records = losses([1.0, 2.0], start=0)
    records += [make_record(1, scalars={"loss": 0.0})]  # a repeat of step 1
    records += [make_record(2, scalars={"loss": math.nan}), make_record(3, scalars={"acc": 0.1})]
    records += losses([3.0, 2.0], start=4)
    rule = LossNotDecreasing(num_steps=2, patience=1)
    state, out = replay(rule, records)
    # windows: [1, 2] -> 1.5 (first check), [3, 2] -> 2.5 (stalled and rising)
    assert [(s, f.firing) for s, f in out] == [(5, True)]
    assert state["best"] == 1.5 and state["prev"] == 2.5


def test_mode_param_selects_eval_losses() -> None:
    """mode='eval' watches eval losses only; the rule's modes include every mode."""
    rule = LossNotDecreasing(mode="eval", num_steps=1, patience=2)
    assert rule.modes == frozenset(MODES)
    records = losses([5, 4, 3, 2, 1]) + losses([1.0, 1.0, 1.0], mode="eval")
    _, out = replay(rule, records)
    assert [(s, f.firing) for s, f in out] == [(1, False), (2, True)]


def test_tensor_regex_sums_matching_scalars() -> None:
    """With tensor_regex the loss is the sum of the matching scalars."""
    rule = LossNotDecreasing(tensor_regex=r"^loss/", num_steps=1, patience=1)
    records = [
        make_record(0, scalars={"loss/ce": 1.0, "loss/reg": 1.0, "loss": 100.0}),
        make_record(1, scalars={"loss/ce": 0.5, "loss/reg": 1.6, "loss": 1.0}),  # 2.1 > 2.0
    ]
    _, out = replay(rule, records)
    assert [(s, f.firing) for s, f in out] == [(1, True)]
    assert out[0][1].value == pytest.approx(-5.0)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"collection_names": ["weights"]}, "not supported"),
        ({"use_losses_collection": False}, "nothing to watch"),
        ({"mode": "test"}, "mode"),
        ({"num_steps": 0}, "num_steps"),
        ({"patience": 0}, "patience"),
        ({"tensor_regex": "["}, "tensor_regex"),
    ],
)
def test_invalid_params(params: dict, match: str) -> None:
    """Unsupported or invalid parameters raise ConfigError."""
    with pytest.raises(ConfigError, match=match):
        LossNotDecreasing(**params)


def test_losses_collection_name_accepted() -> None:
    """collection_names=['losses'] is the SageMaker spelling of the default."""
    rule = LossNotDecreasing(collection_names=["losses"], use_losses_collection=False, num_steps=1)
    assert [s for s, _ in replay(rule, losses([3, 2, 1]))[1]] == [1, 2]


def _stream(steps: int) -> list[StepRecord]:
    rng = np.random.default_rng(1)
    # improving, then a plateau, then improving again, repeatedly
    phase = np.arange(steps) % 300
    values = np.where(phase < 150, 2.0 - phase / 150, 1.0) * (1 + 0.05 * rng.standard_normal(steps))
    return losses(values) + losses(values[:50], mode="eval")


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON after every record leaves the findings unchanged."""
    rule = LossNotDecreasing()
    records = _stream(1000)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert any(f.firing for _, f in plain) and any(not f.firing for _, f in plain)


def test_state_bounded() -> None:
    """The state stays small over 10k steps (the window holds at most num_steps losses)."""
    rule = LossNotDecreasing()
    state = rule.initialize()
    sizes = []
    for i, record in enumerate(_stream(10_000)):
        state, _ = rule.update(state, record)
        if i % 1000 == 999:
            sizes.append(state_size(state))
    assert max(sizes) < 400
    assert len(state["window"]) <= 10
    assert json.loads(json.dumps(state)) == state
