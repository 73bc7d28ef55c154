"""Overtraining: early stopping on the train loss (patience_train) or the validation loss (patience_validation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import Overtraining, default_rules, functional
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import StepRecord


def train(*losses: float, start: int = 0) -> list[StepRecord]:
    return [make_record(start + i, scalars={"loss": x}) for i, x in enumerate(losses)]


def evals(*losses: float, start: int = 0) -> list[StepRecord]:
    return [make_record(start + i, mode="eval", scalars={"loss": x}) for i, x in enumerate(losses)]


def firing(rule: Overtraining, records: list[StepRecord]) -> list[bool]:
    return [f.firing for _, f in replay(rule, records)[1]]


T, F = True, False


@pytest.mark.parametrize(
    ("losses", "params", "expected"),
    [
        ([1.0] * 7, {}, [F, F, F, F, F, T, T]),  # fires at the 5th step without improvement
        ([1.0] * 4, {"patience_train": 3}, [F, F, F, T]),
        ([1.0] * 4, {"patience_train": 4}, [F, F, F, F]),
        ([1.0, 0.75, 0.5, 0.25, 0.0, -0.25, -0.5], {"patience_train": 1}, [F] * 7),  # keeps improving
        ([1.0, 1.5, 2.0, 2.5], {"patience_train": 3}, [F, F, F, T]),  # rising
        # delta is absolute: 0.125 steps improve with delta 0.125, not with delta 0.25
        ([1.0, 0.875, 0.75, 0.625], {"patience_train": 2, "delta": 0.125}, [F, F, F, F]),
        ([1.0, 0.875, 0.8125, 0.78125], {"patience_train": 2, "delta": 0.25}, [F, F, T, T]),
        # two small steps add up to an improvement on the (unchanged) best
        ([1.0, 0.875, 0.75, 0.7, 0.65], {"patience_train": 2, "delta": 0.25}, [F, F, F, F, T]),
        # delta 0: any decrease improves, an equal loss does not
        ([1.0, 0.999, 0.999, 0.999], {"patience_train": 2, "delta": 0.0}, [F, F, F, T]),
        ([1.0, 0.999, 0.998, 0.997], {"patience_train": 2, "delta": 0.0}, [F, F, F, F]),
        # resolves when the loss improves again, fires again after another patience
        ([1.0, 1.0, 1.0, 0.5, 0.5, 0.5], {"patience_train": 2}, [F, F, T, F, F, T]),
    ],
)
def test_train_patience_table(losses: list[float], params: dict, expected: list[bool]) -> None:
    """Train loss: fires after patience_train steps without an improvement of at least delta."""
    assert firing(Overtraining(**params), train(*losses)) == expected


@pytest.mark.parametrize(
    ("losses", "params", "expected"),
    [
        ([2.0] * 11, {}, [F] * 10 + [T]),  # patience_validation = 10 evaluations
        ([2.0] * 4, {"patience_validation": 3}, [F, F, F, T]),
        ([2.0, 1.5, 1.6, 1.7, 1.8], {"patience_validation": 3}, [F, F, F, F, T]),
        ([2.0, 1.996, 1.993, 1.991], {"patience_validation": 3}, [F, F, F, T]),  # < 0.01 in total
        ([2.0, 1.5, 1.6, 1.7, 1.8, 1.2], {"patience_validation": 3}, [F, F, F, F, T, F]),
    ],
)
def test_validation_patience_table(losses: list[float], params: dict, expected: list[bool]) -> None:
    """Validation loss: fires after patience_validation evaluations without improvement."""
    assert firing(Overtraining(**params), evals(*losses)) == expected


def test_either_loss_fires_and_both_are_reported() -> None:
    """A stalled train loss fires while validation improves, and both are named when both stall."""
    rule = Overtraining(patience_train=2, patience_validation=2)
    records = [*train(1.0, 1.0, 1.0), *evals(3.0, 2.0), *evals(2.0, 2.0, start=2), *train(0.5, start=3)]
    _, out = replay(rule, records)
    assert [(s, f.firing, f.tensors) for s, f in out] == [
        (0, F, ()),
        (1, F, ()),
        (2, T, ("train/loss",)),
        (0, T, ("train/loss",)),
        (1, T, ("train/loss",)),
        (2, T, ("train/loss",)),
        (3, T, ("train/loss", "eval/loss")),  # eval: two evaluations without improvement
        (3, T, ("eval/loss",)),  # the train loss improved; the validation loss is still stalled
    ]
    assert (out[2][1].value, out[2][1].threshold) == (2.0, 2.0)
    assert "train loss has not improved" in out[2][1].message
    assert (out[-1][1].value, out[-1][1].threshold) == (2.0, 2.0)


def test_ignored_records() -> None:
    """NaN/inf losses, records without a loss and repeated or older steps are not counted."""
    records = [
        *train(1.0, 1.0),
        make_record(2, scalars={"loss": math.nan}),
        make_record(2, scalars={"loss": math.inf}),
        make_record(2, scalars={"acc": 0.5}),
        *train(1.0, start=1),  # step 1 again (another rank)
        *train(1.0, start=0),
        *train(1.0, start=2),
    ]
    _, out = replay(Overtraining(patience_train=2), records)
    assert [(s, f.firing, f.value) for s, f in out] == [(0, F, 0.0), (1, F, 1.0), (2, T, 2.0)]


def test_other_modes_are_ignored() -> None:
    """Predict and global records are not passed in, and update ignores them if they are."""
    rule = Overtraining()
    assert rule.modes == frozenset({"train", "eval"})
    state = rule.initialize()
    assert rule.update(state, make_record(0, mode="predict", scalars={"loss": 1.0})) == (state, None)


@pytest.mark.parametrize("params", [{"patience_train": 0}, {"patience_validation": 0}, {"delta": -0.1}])
def test_invalid_params(params: dict) -> None:
    """Patience is at least 1 and delta is not negative."""
    with pytest.raises(ConfigError):
        Overtraining(**params)


def test_opt_in() -> None:
    """The literal early-stopping test flaps on noisy healthy runs, so it is not a default rule."""
    assert "Overtraining" not in {r.name for r in default_rules()}


def _stream(train_steps: int, seed: int = 0, eval_every: int = 5) -> list[StepRecord]:
    """A noisy decreasing train loss with a plateau, eval losses, NaNs and duplicated steps."""
    rng = np.random.default_rng(seed)
    out: list[StepRecord] = []
    for s in range(train_steps):
        base = 2.0 * math.exp(-s / 60) if s < 150 or s > 220 else 2.0 * math.exp(-150 / 60)
        loss = math.nan if s % 37 == 36 else base + float(rng.normal(0, 0.02))
        out.append(make_record(s, scalars={"loss": loss}))
        if s % 23 == 5:
            out.append(make_record(s, rank=1, scalars={"loss": loss + 5}))  # same step again
        if s % eval_every == eval_every - 1:
            e = s // eval_every
            out.append(
                make_record(
                    e, mode="eval", scalars={"loss": 1.0 + 0.5 * math.cos(e / 8) + rng.normal(0, 0.01)}
                )
            )
    return out


def _steps_since_improvement(losses: list[float], delta: float) -> int:
    """Over a whole series: steps after the index of the last improvement (< best − delta, best the last improver)."""
    j = 0
    for i in range(1, len(losses)):
        if losses[i] < losses[j] and losses[j] - losses[i] >= delta:
            j = i
    return len(losses) - 1 - j


def _reference(
    records: list[StepRecord], pt: int, pv: int, delta: float
) -> list[tuple[int, bool, tuple[str, ...]]]:
    """Recompute from the full list of accepted losses at every counted record."""
    series: dict[str, list[float]] = {"train": [], "eval": []}
    last: dict[str, int] = {}
    out = []
    for r in records:
        loss = r.scalars.get("loss")
        if loss is None or not math.isfinite(loss) or r.step <= last.get(r.mode, -1):
            continue
        last[r.mode] = r.step
        series[r.mode].append(loss)
        stalled = tuple(
            name
            for name, mode, patience in (("train/loss", "train", pt), ("eval/loss", "eval", pv))
            if series[mode] and _steps_since_improvement(series[mode], delta) >= patience
        )
        out.append((r.step, bool(stalled), stalled))
    return out


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"patience_train": 20, "delta": 0.0},
        {"patience_train": 12, "patience_validation": 4, "delta": 0.05},
    ],
)
def test_matches_batch_reference(params: dict) -> None:
    """Streaming findings equal a recomputation over the full loss series at every step."""
    records = _stream(300)
    rule = Overtraining(**params)
    p = rule.params
    _, out = replay(rule, records)
    expected = _reference(records, p.patience_train, p.patience_validation, p.delta)
    assert [(s, f.firing, f.tensors) for s, f in out] == expected
    assert {e[1] for e in expected} == {True, False}


def test_delta_zero_matches_running_minimum() -> None:
    """With delta 0 a step improves exactly when it sets a new running minimum (numpy cumulative min)."""
    losses = np.array([r.scalars["loss"] for r in _stream(300) if r.mode == "train" and r.rank == 0])
    losses = losses[np.isfinite(losses)]
    new_min = np.r_[True, losses[1:] < np.minimum.accumulate(losses)[:-1]]
    last_improvement = np.maximum.accumulate(np.where(new_min, np.arange(losses.size), 0))
    expected = (np.arange(losses.size) - last_improvement) >= 20
    _, out = replay(Overtraining(patience_train=20, patience_validation=10**6, delta=0.0), train(*losses))
    assert [f.firing for _, f in out] == expected.tolist()


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _stream(200)
    rule = Overtraining(patience_train=8, patience_validation=3)
    _, plain = replay(rule, records)
    for k in (1, 3, 50):
        assert repr(replay(rule, records, roundtrip_every=k)[1]) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state holds per mode a step, a best loss and a count: flat from 1k to 100k steps."""
    rule = Overtraining()
    records = [
        make_record(s, mode="eval" if s % 10 == 9 else "train", scalars={"loss": 1.0 + (s % 7) / 8})
        for s in range(100_000)
    ]
    state, sizes = rule.initialize(), {}
    for i, record in enumerate(records, 1):
        state, _ = rule.update(state, record)
        if i in (1_000, 100_000):
            sizes[i] = state_size(state)
    # Only the four integers (two steps, two counts) may gain digits: 1k to 100k is 2 digits each.
    assert sizes[100_000] <= sizes[1_000] + 8
    assert sizes[100_000] < 200


@pytest.mark.parametrize(
    ("best", "since", "value", "min_delta", "expected"),
    [
        (None, 0, 3.0, 0.5, (3.0, 0)),  # the first value sets best
        (3.0, 2, 2.5, 0.5, (2.5, 0)),  # exactly min_delta lower improves
        (3.0, 2, 2.75, 0.5, (3.0, 3)),
        (3.0, 2, 3.0, 0.0, (3.0, 3)),  # equal never improves, even with min_delta 0
        (3.0, 2, 2.9, 0.0, (2.9, 0)),
        (3.0, 0, 4.0, 0.5, (3.0, 1)),
    ],
)
def test_patience_count_function(
    best: float | None, since: int, value: float, min_delta: float, expected: tuple[float, int]
) -> None:
    """functional.patience_count is early-stopping bookkeeping with an absolute min_delta."""
    assert functional.patience_count(best, since, value, min_delta) == expected
