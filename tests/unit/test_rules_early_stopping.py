"""EarlyStopping: Keras-style wait counter on any scalar, for one record mode."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import EarlyStopping, default_rules
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import StepRecord


def evals(*values: float, name: str = "loss", mode: str = "eval") -> list[StepRecord]:
    return [make_record(i, mode=mode, scalars={name: v}) for i, v in enumerate(values)]


def waits(rule: EarlyStopping, records: list[StepRecord]) -> list[tuple[bool, float]]:
    return [(f.firing, f.value) for _, f in replay(rule, records)[1]]


T, F = True, False


@pytest.mark.parametrize(
    ("values", "params", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], {}, [(F, 0), (F, 1), (F, 2), (T, 3)]),  # patience 3
        ([1.0, 0.9, 0.8, 0.7], {}, [(F, 0)] * 4),
        ([1.0, 2.0, 3.0, 0.5, 0.6], {"patience": 2}, [(F, 0), (F, 1), (T, 2), (F, 0), (F, 1)]),
        # min_delta: the improvement must be strictly larger than min_delta
        ([1.0, 0.875, 0.875, 0.75], {"min_delta": 0.125, "patience": 2}, [(F, 0), (F, 1), (T, 2), (F, 0)]),
        ([1.0, 0.875, 0.75], {"min_delta": 0.1, "patience": 1}, [(F, 0), (F, 0), (F, 0)]),
        # small steps add up against the unchanged best
        ([1.0, 0.95, 0.9, 0.85], {"min_delta": 0.1, "patience": 5}, [(F, 0), (F, 1), (F, 2), (F, 0)]),
        # mode max
        ([0.5, 0.6, 0.6, 0.55], {"mode": "max", "patience": 2}, [(F, 0), (F, 0), (F, 1), (T, 2)]),
        ([0.5, 0.4, 0.3], {"mode": "max", "patience": 2}, [(F, 0), (F, 1), (T, 2)]),
        # patience 0: every check that does not reset wait fires
        ([1.0, 0.9, 0.9, 0.8], {"patience": 0}, [(F, 0), (F, 0), (T, 1), (F, 0)]),
        # baseline: improving on best but not on the baseline still counts
        ([2.0, 1.9, 1.8, 0.9], {"baseline": 1.0, "patience": 3}, [(F, 1), (F, 2), (T, 3), (F, 0)]),
        ([0.9, 0.95], {"baseline": 1.0, "patience": 1}, [(F, 0), (T, 1)]),
        # NaN and inf never improve
        ([1.0, math.nan, math.inf, 0.5], {"patience": 2}, [(F, 0), (F, 1), (T, 2), (F, 0)]),
        ([math.nan, math.nan, 3.0], {"patience": 2}, [(F, 1), (T, 2), (F, 0)]),
        ([-math.inf, 1.0], {"patience": 5}, [(F, 1), (F, 0)]),
    ],
)
def test_keras_wait_table(values: list[float], params: dict, expected: list[tuple[bool, float]]) -> None:
    """wait counts checks since the last improvement by more than min_delta (that also beats baseline)."""
    rule = EarlyStopping(**params)
    assert waits(rule, evals(*values)) == [(f, float(w)) for f, w in expected]


def test_finding_fields() -> None:
    """value is wait, threshold patience, tensors the monitored scalar; the message gives the best."""
    _, out = replay(EarlyStopping(patience=2), evals(1.0, 1.5, 1.25))
    finding = out[-1][1]
    assert (finding.value, finding.threshold, finding.tensors) == (2.0, 2.0, ("loss",))
    assert (
        "eval loss has not improved by more than 0 for 2 check(s) (patience 2; best 1, now 1.25)"
        in finding.message
    )


def test_record_mode_and_monitor() -> None:
    """Only records of record_mode carrying `monitor` are checks; the instance watches that mode only."""
    rule = EarlyStopping(monitor="val_acc", mode="max", record_mode="train", patience=1)
    assert rule.modes == frozenset({"train"}) and EarlyStopping().modes == frozenset({"eval"})
    records = [
        *evals(0.9, 0.8, name="val_acc"),  # eval records: not watched
        *evals(0.5, 0.5, name="val_acc", mode="train"),
        make_record(2, scalars={"loss": 1.0}),  # no val_acc
    ]
    assert waits(rule, records) == [(F, 0.0), (T, 1.0)]
    assert rule.update(rule.initialize(), evals(1.0)[0]) == (rule.initialize(), None)


def test_repeated_steps_are_not_checks() -> None:
    """A redelivered or older step is skipped."""
    records = [*evals(1.0, 1.0), *evals(1.0, 1.0)]
    assert [s for s, _ in replay(EarlyStopping(), records)[1]] == [0, 1]


def test_opt_in() -> None:
    """The rule says when training could stop, not a fault: it is not a default rule."""
    assert "EarlyStopping" not in {r.name for r in default_rules()}


@pytest.mark.parametrize(
    "params",
    [{"mode": "auto"}, {"patience": -1}, {"min_delta": -0.1}, {"record_mode": "test"}, {"monitor": ""}],
)
def test_invalid_params(params: dict) -> None:
    """Unknown modes, negative patience or min_delta and an empty name are ConfigErrors."""
    with pytest.raises(ConfigError):
        EarlyStopping(**params)


def _values(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = 1.0 + 0.5 * np.cos(np.arange(n) / 15.0)
    return base + rng.normal(0, 0.03, n)


@pytest.mark.parametrize(("mode", "patience"), [("min", 3), ("min", 8), ("max", 5)])
def test_matches_batch_reference(mode: str, patience: int) -> None:
    """min_delta 0: wait is the distance to the last new running extreme (numpy cumulative min/max)."""
    v = _values(300)
    ext = np.minimum.accumulate(v) if mode == "min" else np.maximum.accumulate(v)
    better = v[1:] < ext[:-1] if mode == "min" else v[1:] > ext[:-1]
    is_new = np.r_[True, better]
    last_new = np.maximum.accumulate(np.where(is_new, np.arange(v.size), 0))
    wait = np.arange(v.size) - last_new
    expected = list(zip(((wait > 0) & (wait >= patience)).tolist(), wait.astype(float).tolist(), strict=True))
    got = waits(EarlyStopping(mode=mode, patience=patience), evals(*v.tolist()))
    assert got == expected
    assert {e[0] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = evals(*_values(200, seed=1).tolist(), math.nan, 0.1)
    rule = EarlyStopping(min_delta=0.01, patience=4, baseline=1.2)
    plain = replay(rule, records)[1]
    for k in (1, 3):
        assert repr(replay(rule, records, roundtrip_every=k)[1]) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state is a step, a best value and wait: only those integers gain digits."""
    rule = EarlyStopping()
    state, sizes = rule.initialize(), {}
    scalars = [{"loss": 1.0}, {"loss": 1.5}]
    for s in range(100_000):
        state, _ = rule.update(state, make_record(s, mode="eval", scalars=scalars[s % 2]))
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] <= sizes[1_000] + 4
    assert sizes[100_000] < 100
