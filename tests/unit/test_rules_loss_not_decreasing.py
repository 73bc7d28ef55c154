"""LossNotDecreasing: two adjacent window means every num_steps, stalled or rising for `patience` checks."""

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

SEEDS = range(20)
STEPS = np.arange(1000)


def losses(values: Sequence[float], mode: str = "train", start: int = 0) -> list[StepRecord]:
    return [make_record(start + i, mode=mode, scalars={"loss": float(v)}) for i, v in enumerate(values)]


def firing_steps(rule: LossNotDecreasing, records: list[StepRecord]) -> list[int]:
    _, out = replay(rule, records)
    return [s for s, f in out if f.firing]


def noisy(base: np.ndarray, seed: int) -> np.ndarray:
    """`base` times (1 + 20 % Gaussian minibatch noise), from numpy's default_rng(seed)."""
    rng = np.random.default_rng(seed)
    return base * (1 + 0.2 * rng.standard_normal(base.size))


# --- behaviour on simulated runs (fixed seeds) ----------------------------------------------


def test_hysteresis_keeps_a_firing_alert_through_a_lucky_check() -> None:
    """Once firing, the alert resolves only at the `resolve_after`-th improving check in a row."""
    rule = LossNotDecreasing(num_steps=1, window=1, patience=1, resolve_after=3, converged_percent=None)
    values = [10, 10, 9, 10, 9, 8, 7, 6]  # stalled, improves once, stalls, then improves 4 times
    _, out = replay(rule, losses(values))
    assert [(s, f.firing) for s, f in out] == [(1, True), (3, True), (6, False), (7, False)]


@pytest.mark.parametrize("seed", SEEDS)
def test_healthy_noisy_decay_never_fires(seed: int) -> None:
    """A healthy exp(-step/200) loss with 20 % Gaussian noise never fires over 1000 steps."""
    _, out = replay(LossNotDecreasing(), losses(noisy(np.exp(-STEPS / 200), seed)))
    assert len(out) == 95  # checks at steps 59, 69, ..., 999
    assert [s for s, f in out if f.firing] == []


def test_frozen_learning_rate_fires() -> None:
    """A frozen learning rate (constant loss, 20 % noise) fires for every seed, almost always within 250 steps."""
    first = []
    for seed in SEEDS:
        fired = firing_steps(LossNotDecreasing(), losses(noisy(np.ones(STEPS.size), seed)))
        assert fired, f"seed {seed} never fired"
        first.append(fired[0])
    # 19 of the 20 seeds fire within 250 steps (median 119); seed 0 is the slow tail at step 339.
    assert sum(s <= 250 for s in first) >= 19, first
    assert max(first) <= 400, first
    assert sorted(first)[len(first) // 2] <= 150, first


@pytest.mark.parametrize("seed", SEEDS)
def test_plateau_fires_after_it_starts(seed: int) -> None:
    """A noisy loss that decays until step 400 and then stays flat fires after step 400, never before."""
    base = np.exp(-np.minimum(STEPS, 400) / 200)
    fired = firing_steps(LossNotDecreasing(converged_percent=None), losses(noisy(base, seed)))
    assert fired, f"seed {seed} never fired"
    assert 400 < fired[0] <= 400 + 250


@pytest.mark.parametrize("seed", SEEDS)
def test_convergence_is_not_a_stall(seed: int) -> None:
    """By default the same run is quiet: its plateau lies far below half of where it started."""
    base = np.exp(-np.minimum(STEPS, 400) / 200)
    assert firing_steps(LossNotDecreasing(), losses(noisy(base, seed))) == []


def test_plateau_above_the_convergence_level_still_fires() -> None:
    """A run that stalls after losing only 5 % of its loss is stalled, not converged."""
    base = 0.95 + 0.05 * np.exp(-np.minimum(STEPS, 200) / 50)
    fired = firing_steps(LossNotDecreasing(), losses(noisy(base, 0)))
    assert fired and fired[0] > 200


def test_rising_loss_fires_with_rose() -> None:
    """A loss rising 10 % per window fires at the third check with a message saying it rose."""
    values = 1.1 ** (STEPS[:100] / 30)
    _, out = replay(LossNotDecreasing(), losses(values))
    assert [(s, f.firing) for s, f in out] == [(59, False), (69, False), (79, True), (89, True), (99, True)]
    finding = out[2][1]
    assert "rose" in finding.message
    assert "over 3 checks" in finding.message
    assert finding.value == pytest.approx(-10.0)


def test_slow_rise_is_a_stall_not_a_rise() -> None:
    """A loss rising 3 % per window (below increase_threshold_percent) fires as not decreasing."""
    values = 1.03 ** (STEPS[:80] / 30)
    _, out = replay(LossNotDecreasing(), losses(values))
    assert [(s, f.firing) for s, f in out] == [(59, False), (69, False), (79, True)]
    assert "did not decrease" in out[-1][1].message
    assert "rose" not in out[-1][1].message


# --- check schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "n", "expected"),
    [
        ({}, 1000, list(range(59, 1000, 10))),  # window 30: first check at 60 losses
        ({}, 59, []),  # one loss short of 2 x window
        ({"num_steps": 5}, 60, [29, 34, 39, 44, 49, 54, 59]),  # window 15
        ({"num_steps": 10, "window": 5}, 40, [9, 19, 29, 39]),
        ({"num_steps": 4, "window": 5}, 22, [9, 13, 17, 21]),  # first check when 2 x window exist
        ({"num_steps": 1, "window": 1}, 4, [1, 2, 3]),
    ],
)
def test_findings_only_at_check_steps(params: dict, n: int, expected: list[int]) -> None:
    """The first finding comes once 2 x window losses exist, then one every num_steps saved steps."""
    _, out = replay(LossNotDecreasing(**params), losses([1.0] * n))
    assert [s for s, _ in out] == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # num_steps=1, window=1: each check compares a loss with the one before; None = no finding
        ([10, 9, 8, 7, 6], [None, False, False, False, False]),
        ([10, 9, 9, 9, 9], [None, False, False, False, True]),  # stalled 3 checks
        ([10, 9, 9, 9, 9, 8], [None, False, False, False, True, False]),  # resolves on improving
        ([10, 9, 9, 9, 9, 9, 8, 9], [None, False, False, False, True, True, False, False]),
        ([10, 9, 9, 9, 8.5, 9, 9, 9], [None, False, False, False, False, False, False, True]),
        ([10, 11, 12, 13], [None, False, False, True]),  # rising
        ([10, 11, 10, 11], [None, False, False, False]),  # an improving check resets the count
    ],
)
def test_check_table(values: list[float], expected: list[bool | None]) -> None:
    """Checks fire after `patience` stalled/rising checks and, without hysteresis, resolve at the first
    improving one (the losses stay above the convergence level: converged_percent off)."""
    rule = LossNotDecreasing(num_steps=1, window=1, resolve_after=1, converged_percent=None)
    _, out = replay(rule, losses(values))
    got = {s: f.firing for s, f in out}
    assert [got.get(i) for i in range(len(values))] == expected


def test_window_means_are_compared() -> None:
    """With window=2 the means of the last two and the two before decide, not single losses."""
    rule = LossNotDecreasing(num_steps=1, window=2, patience=1)
    # means: [10, 2] -> 6 vs [8, 3] -> 5.5 improves although 3 > 2; then [8, 3] vs [3, 9] = 6 rises
    _, out = replay(rule, losses([10, 2, 8, 3, 9]))
    assert [(s, f.firing) for s, f in out] == [(3, False), (4, True)]
    assert out[0][1].value == pytest.approx(100 * 0.5 / 6)


@pytest.mark.parametrize(
    ("second", "diff_percent", "expected"),
    [
        (99.9, 0.1, False),  # exactly 0.1 % below the earlier mean is an improvement
        (99.91, 0.1, True),  # 0.09 % below is a stall
        (99.0, 1.0, False),
        (99.5, 1.0, True),
        (100.0, 0.0, False),  # stalled means R > E·(1 − d): equal is not stalled at d = 0
        (100.01, 0.0, True),
    ],
)
def test_diff_percent_boundary(second: float, diff_percent: float, expected: bool) -> None:
    """A check stalls unless the recent mean is below the earlier one by at least diff_percent %."""
    rule = LossNotDecreasing(num_steps=1, window=1, patience=1, diff_percent=diff_percent)
    _, out = replay(rule, losses([100.0, second]))
    assert [(s, f.firing) for s, f in out] == [(1, expected)]


@pytest.mark.parametrize(
    ("second", "expected_rose"),
    [(105.0, False), (105.01, True)],  # rising means R > E·(1 + 5/100)
)
def test_increase_threshold_boundary(second: float, expected_rose: bool) -> None:
    """A check counts as rising only above increase_threshold_percent; below that it is a stall."""
    rule = LossNotDecreasing(num_steps=1, window=1, patience=1)
    _, out = replay(rule, losses([100.0, second]))
    assert [(s, f.firing) for s, f in out] == [(1, True)]
    assert ("rose" in out[0][1].message) is expected_rose


@pytest.mark.parametrize(("second", "expected"), [(-10.5, False), (-9.5, True)])
def test_negative_losses_use_absolute_mean(second: float, expected: bool) -> None:
    """For negative losses a more negative recent mean is an improvement (tolerance on |E|)."""
    rule = LossNotDecreasing(num_steps=1, window=1, patience=1)
    _, out = replay(rule, losses([-10.0, second]))
    assert [(s, f.firing) for s, f in out] == [(1, expected)]
    assert out[0][1].value == pytest.approx(100 * (-10.0 - second) / 10.0)


def test_rising_message_and_value() -> None:
    """A rising check says so; value is the decrease of R against E in percent (negative)."""
    _, out = replay(LossNotDecreasing(num_steps=1, window=1, patience=1), losses([10, 12]))
    step, finding = out[-1]
    assert step == 1 and finding.firing
    assert finding.message.startswith("train loss rose over 1 checks")
    assert "12 at step 1 vs 10" in finding.message
    assert finding.value == pytest.approx(-20.0)
    assert finding.threshold == 0.1


def test_zero_earlier_mean_value_is_zero() -> None:
    """An earlier mean of exactly 0 gives value 0 (no division by zero); equal means are not a stall."""
    rule = LossNotDecreasing(num_steps=1, window=1, patience=1)
    _, out = replay(rule, losses([0.0, 0.0, 0.5]))
    assert [(s, f.firing, f.value) for s, f in out] == [(1, False, 0.0), (2, True, 0.0)]
    assert "rose" in out[-1][1].message


# --- inputs ---------------------------------------------------------------------------------


def test_nan_and_repeated_steps_are_ignored() -> None:
    """NaN/inf losses, repeated steps and records without a loss do not count as saved steps."""
    records = losses([1.0, 2.0], start=0)
    records += [make_record(1, scalars={"loss": 0.0})]  # a repeat of step 1
    records += [make_record(0, scalars={"loss": 0.0})]  # an older step
    records += [make_record(2, scalars={"loss": math.nan}), make_record(3, scalars={"acc": 0.1})]
    records += [make_record(4, scalars={"loss": math.inf})]
    records += losses([3.0, 2.0], start=5)
    records += [make_record(7, scalars={"loss": -math.inf})]
    rule = LossNotDecreasing(num_steps=2, window=2, patience=1)
    state, out = replay(rule, records)
    # windows: [1, 2] -> 1.5, [3, 2] -> 2.5: rising, at the 4th valid loss (step 6)
    assert [(s, f.firing) for s, f in out] == [(6, True)]
    assert out[0][1].value == pytest.approx(-100 * 1.0 / 1.5)
    assert state["losses"] == [1.0, 2.0, 3.0, 2.0]
    assert state["last_step"] == 6


def test_mode_param_selects_eval_losses() -> None:
    """mode='eval' watches eval losses only; the rule's modes include every mode."""
    rule = LossNotDecreasing(mode="eval", num_steps=1, window=1, patience=2)
    assert rule.modes == frozenset(MODES)
    records = losses([5, 4, 3, 2, 1]) + losses([1.0, 1.0, 1.0], mode="eval")
    state, out = replay(rule, records)
    assert [(s, f.firing) for s, f in out] == [(1, False), (2, True)]
    assert out[-1][1].message.startswith("eval loss did not decrease")
    assert state["losses"] == [1.0, 1.0]


def test_default_mode_ignores_eval_losses() -> None:
    """The default mode='train' ignores eval records, however bad their loss."""
    records = losses([5, 4, 3, 2, 1]) + losses([1.0, 9.0, 99.0], mode="eval")
    assert firing_steps(LossNotDecreasing(num_steps=1, window=1, patience=1), records) == []


def test_tensor_regex_sums_matching_scalars() -> None:
    """With tensor_regex the loss is the sum of the matching scalars."""
    rule = LossNotDecreasing(tensor_regex=r"^loss/", num_steps=1, window=1, patience=1)
    records = [
        make_record(0, scalars={"loss/ce": 1.0, "loss/reg": 1.0, "loss": 100.0}),
        make_record(1, scalars={"loss/ce": 0.5, "loss/reg": 1.9, "loss": 1.0}),  # 2.4 vs 2.0
    ]
    _, out = replay(rule, records)
    assert [(s, f.firing) for s, f in out] == [(1, True)]
    assert out[0][1].value == pytest.approx(-20.0)
    assert "rose" in out[0][1].message


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"collection_names": ["weights"]}, "not supported"),
        ({"use_losses_collection": False}, "nothing to watch"),
        ({"mode": "test"}, "mode"),
        ({"num_steps": 0}, "num_steps"),
        ({"window": 0}, "window"),
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
    rule = LossNotDecreasing(collection_names=["losses"], use_losses_collection=False, num_steps=1, window=1)
    assert [s for s, _ in replay(rule, losses([3, 2, 1]))[1]] == [1, 2]


# --- state ----------------------------------------------------------------------------------


def _stream(steps: int) -> list[StepRecord]:
    rng = np.random.default_rng(1)
    # improving, then a plateau, then improving again, repeatedly
    phase = np.arange(steps) % 300
    values = np.where(phase < 150, 2.0 - phase / 150, 1.0) * (1 + 0.05 * rng.standard_normal(steps))
    return losses(values) + losses(values[:50], mode="eval")


@pytest.mark.parametrize("every", [1, 7])
def test_state_json_roundtrip(every: int) -> None:
    """Round-tripping the state through JSON during the stream leaves the findings unchanged."""
    rule = LossNotDecreasing()
    records = _stream(1000)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=every)
    assert repr(plain) == repr(trip)
    assert any(f.firing for _, f in plain) and any(not f.firing for _, f in plain)


def test_state_json_roundtrip_mid_stream() -> None:
    """Resuming from a JSON copy of the state taken mid-stream gives the same findings."""
    rule = LossNotDecreasing()
    records = _stream(1000)
    _, plain = replay(rule, records)
    state, first = replay(rule, records[:437])
    _, rest = replay(rule, records[437:], json.loads(json.dumps(state)))
    assert repr(first + rest) == repr(plain)


def test_state_bounded() -> None:
    """The state stays bounded over 10k steps: it holds at most 2 x window losses."""
    rule = LossNotDecreasing()
    window = 3 * rule.params.num_steps
    bound = 2 * window * len(", -1.2345678901234567e-100") + 100  # 2 x window floats + fixed fields
    assert bound < 2000
    state = rule.initialize()
    sizes = []
    for i, record in enumerate(_stream(10_000)):
        state, _ = rule.update(state, record)
        if i % 1000 == 999:
            sizes.append(state_size(state))
    assert max(sizes) < bound
    assert len(state["losses"]) == 2 * window
    assert json.loads(json.dumps(state)) == state
