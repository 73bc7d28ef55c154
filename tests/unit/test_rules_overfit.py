"""Overfit: a gap between eval and train loss only counts while the eval loss stopped improving."""

from __future__ import annotations

import json
import math

import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import Overfit
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import StepRecord


def run(train: list[float], evals: list[float], every: int = 10) -> list[StepRecord]:
    """Train losses one per step; eval record k (its own step counter) after train step every·(k+1)−1."""
    out = []
    for i, loss in enumerate(train):
        out.append(make_record(i, scalars={"loss": loss}))
        k, r = divmod(i + 1, every)
        if r == 0 and k - 1 < len(evals):
            out.append(make_record(k - 1, mode="eval", scalars={"loss": evals[k - 1]}))
    return out


def falling(n: int, start: float = 2.0, rate: float = 0.99) -> list[float]:
    return [start * rate**i for i in range(n)]


def test_eval_twice_train_but_falling_does_not_fire() -> None:
    """A 100 % generalisation gap with a falling validation loss is not overfitting."""
    train = falling(200)
    evals = [2.0 * train[10 * k + 9] for k in range(20)]  # always 2x the current train loss
    _, out = replay(Overfit(), run(train, evals))
    assert len(out) == 20
    assert all(f.value > 0.9 for _, f in out[1:])  # the gap is large ...
    assert not any(f.firing for _, f in out)  # ... but eval keeps improving


def test_rising_eval_fires_after_patience_checks_and_resolves() -> None:
    """Eval rising while train falls fires at the `patience`-th rising check and resolves after."""
    train = falling(100, start=1.0)  # 0.91 .. 0.37 over the checks
    evals = [1.5, 1.4, 1.3, 1.35, 1.4, 1.45, 1.2, 1.1]
    _, out = replay(
        Overfit(patience=2, min_rise_percent=0, eval_window=1, resolve_after=1), run(train, evals)
    )
    assert [(s, f.firing) for s, f in out] == [
        (0, False),
        (1, False),
        (2, False),
        (3, False),  # first rising check
        (4, True),  # second consecutive one
        (5, True),
        (6, False),  # improving again: resolved
        (7, False),
    ]
    assert "not improving" in out[4][1].message


@pytest.mark.parametrize(
    ("eval_loss", "train_loss", "ratio_threshold", "expected"),
    [
        (1.2, 1.0, 0.1, True),  # gap 20 % and not improving
        (1.05, 1.0, 0.1, False),  # gap 5 %: within the ratio
        (1.249, 1.0, 0.25, False),  # gap just below 25 %: not above
        (1.5, 1.0, 0.6, False),
        (0.9, 1.0, 0.1, False),  # eval below train
    ],
)
def test_gap_table(eval_loss: float, train_loss: float, ratio_threshold: float, expected: bool) -> None:
    """With a flat eval loss, the rule fires exactly when (E − T)/T exceeds ratio_threshold."""
    records = run([train_loss * (1 - 1e-5 * i) for i in range(30)], [eval_loss, eval_loss, eval_loss])
    _, out = replay(Overfit(ratio_threshold=ratio_threshold, patience=1, min_rise_percent=0), records)
    assert [f.firing for _, f in out] == [False, expected, expected]
    assert out[-1][1].value == pytest.approx((eval_loss - train_loss) / train_loss, abs=1e-3)


@pytest.mark.parametrize(
    ("min_delta", "expected"),
    [(0.0, False), (0.05, True)],
)
def test_min_delta(min_delta: float, expected: bool) -> None:
    """An eval improvement smaller than min_delta counts as not improving."""
    records = run([1.0 - 1e-3 * i for i in range(20)], [1.5, 1.48])
    _, out = replay(Overfit(min_delta=min_delta, patience=1, min_rise_percent=0), records)
    assert out[-1][1].firing is expected


def test_eval_records_at_one_step_form_one_check() -> None:
    """Eval records sharing a step are averaged into one check that counts once for patience."""
    records = [make_record(i, scalars={"loss": 1.0}) for i in range(10)]
    records += [make_record(0, mode="eval", scalars={"loss": v}) for v in (1.4, 1.6)]  # E = 1.5
    records += [make_record(i, scalars={"loss": 0.9}) for i in range(10, 20)]  # train improves: T = 0.9
    records += [make_record(1, mode="eval", scalars={"loss": v}) for v in (1.8, 1.4, 1.5)]  # E -> 1.5667
    records += [make_record(2, mode="eval", scalars={"loss": 1.55})]
    rule = Overfit(patience=2, min_rise_percent=0, eval_window=1)
    state, out = replay(rule, records)
    running = [1.4, 1.5, 1.8, 1.6, 1.5667, 1.55]
    train = [1.0, 1.0, 0.9, 0.9, 0.9, 0.9]
    assert [round(f.value, 3) for _, f in out] == [
        round((e - t) / t, 3) for e, t in zip(running, train, strict=True)
    ]
    # step 1 (E = 1.5667 >= best 1.5) is one held check; step 2 (1.55 >= 1.5) is the second
    assert [(s, f.firing) for s, f in out] == [
        (0, False),
        (0, False),
        (1, False),
        (1, False),
        (1, False),
        (2, True),
    ]
    assert state["best"] == pytest.approx(1.5)


def test_no_fire_when_train_loss_stalls_too() -> None:
    """Eval not improving while the train loss is not improving either is a plateau, not overfitting."""
    records = run([0.5] * 100, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9])
    _, out = replay(Overfit(patience=1), records)
    assert out and not any(f.firing for _, f in out)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([make_record(0, mode="eval", scalars={"loss": 3.0})], []),  # no train loss yet
        ([make_record(0, scalars={"loss": 1.0}), make_record(0, mode="eval", scalars={})], []),
        (
            [make_record(0, scalars={"loss": 1.0}), make_record(0, mode="eval", scalars={"loss": math.nan})],
            [],
        ),
    ],
)
def test_unchecked_eval_records(records: list[StepRecord], expected: list) -> None:
    """Eval records without a usable loss or without any train loss return None."""
    assert replay(Overfit(), records)[1] == expected


def test_start_step() -> None:
    """Eval records before start_step are not checked."""
    records = run([1.0 - 1e-3 * i for i in range(50)], [2.0] * 5)
    _, out = replay(Overfit(start_step=3, patience=1, min_rise_percent=0), records)
    assert [(s, f.firing) for s, f in out] == [(3, False), (4, True)]


def test_train_window_mean_and_tensor_regex() -> None:
    """T is the mean of the last num_steps train losses; tensor_regex sums matching scalars."""
    rule = Overfit(num_steps=2, tensor_regex=r"^val_or_train_loss$")
    records = [
        make_record(i, scalars={"val_or_train_loss": v, "loss": 99.0}) for i, v in enumerate([9, 1, 3])
    ]
    records.append(make_record(0, mode="eval", scalars={"val_or_train_loss": 4.0}))
    _, out = replay(rule, records)
    assert out[0][1].value == pytest.approx((4.0 - 2.0) / 2.0)


@pytest.mark.parametrize(
    "params", [{"patience": 0}, {"ratio_threshold": -0.1}, {"tensor_regex": "("}, {"x": 1}]
)
def test_invalid_params(params: dict) -> None:
    """Invalid parameters raise ConfigError."""
    with pytest.raises(ConfigError):
        Overfit(**params)


def _stream(steps: int) -> list[StepRecord]:
    train = [1.0 / (1 + i / 100) for i in range(steps)]
    evals = [1.5 + 0.1 * math.sin(k / 3) for k in range(steps // 10)]
    return run(train, evals)


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON after every record leaves the findings unchanged."""
    rule = Overfit(patience=2)
    records = _stream(1000)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert any(f.firing for _, f in plain) and any(not f.firing for _, f in plain)


def test_state_bounded() -> None:
    """The state stays small over 10k steps (the train window holds num_steps losses)."""
    rule = Overfit()
    state, _ = replay(rule, _stream(10_000))
    assert len(state["train"]) == 10
    assert state_size(state) < 700
    assert json.loads(json.dumps(state)) == state


def test_plateau_wobble_does_not_fire_but_a_real_rise_does() -> None:
    """With defaults, an eval loss wobbling within 5 % of its best is quiet; one climbing past it fires."""
    train = falling(200, start=0.5, rate=0.995)
    plateau = [1.0, 0.8, 0.7, 0.72, 0.71, 0.73, 0.70, 0.72, 0.73, 0.71, 0.72, 0.73, 0.72, 0.71, 0.73, 0.72]
    _, out = replay(Overfit(), run(train, plateau))
    assert not any(f.firing for _, f in out)
    rising = [1.0, 0.8, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0, 1.1]
    _, out = replay(Overfit(), run(train, rising))
    # smoothed E (mean of 3): best 0.75 at checks 3-4; >= 0.7875 at checks 5, 6, 7: fires at the 3rd
    assert [s for s, f in out if f.firing][:1] == [7]
