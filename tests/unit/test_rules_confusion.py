"""Confusion: row-normalised (recall) checks of the accumulated confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.producers.stats_numpy import class_counts
from tensorpulse.rules import Confusion, default_rules
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import ClassCounts, StepRecord


def matrix(rows: list[list[int]]) -> ClassCounts:
    k = len(rows)
    return ClassCounts(k, tuple(sum(r) for r in rows), tuple(x for r in rows for x in r))


def rec(step: int, **blocks: ClassCounts) -> StepRecord:
    return make_record(step, classes=blocks)


def last(rule: Confusion, records: list[StepRecord]):
    out = replay(rule, records)[1]
    return out[-1][1] if out else None


def test_perfect_ten_class_prediction_never_fires() -> None:
    """The spec's edge case: a perfect 10-class prediction does not fire, at any step."""
    rng = np.random.default_rng(0)
    records = []
    for s in range(50):
        y = rng.integers(0, 10, 64)
        records.append(rec(s, labels=class_counts(y, y, 10)))
    out = replay(Confusion(), records)[1]
    assert out and not any(f.firing for _, f in out)
    assert all(f.value == 1.0 for _, f in out)


@pytest.mark.parametrize(
    ("rows", "params", "expected", "value", "threshold", "tensors"),
    [
        ([[90, 10], [5, 95]], {}, False, 0.9, 0.9, ()),  # exactly min_diag and max_off_diag
        ([[85, 15], [5, 95]], {}, True, 0.85, 0.9, ("recall[0]", "confusion[0,1]")),
        ([[85, 15], [5, 95]], {"min_diag": 0.8, "max_off_diag": 0.2}, False, 0.85, 0.8, ()),
        ([[60, 30, 10], [0, 10, 0], [0, 0, 10]], {"min_diag": 0.5}, True, 0.3, 0.1, ("confusion[0,1]",)),
        ([[60, 30, 10], [0, 10, 0], [0, 0, 10]], {"min_diag": 0.5, "max_off_diag": 0.3}, False, 0.6, 0.5, ()),
        ([[100, 0], [0, 9]], {}, False, 1.0, 0.9, ()),  # row 1 too small to judge (9 < 10) ...
        ([[100, 0], [9, 0]], {}, False, 1.0, 0.9, ()),  # ... even when all wrong
        ([[100, 0], [9, 0]], {"min_class_samples": 9}, True, 0.0, 0.9, ("recall[1]", "confusion[1,0]")),
        ([[50, 0], [30, 20]], {}, True, 0.4, 0.9, ("recall[1]", "confusion[1,0]")),
    ],
)
def test_threshold_table(
    rows: list[list[int]], params: dict, expected: bool, value: float, threshold: float, tensors: tuple
) -> None:
    """Fires on a judged row whose diagonal share < min_diag or an off-diagonal share > max_off_diag."""
    finding = last(Confusion(**params), [rec(0, labels=matrix(rows))])
    assert finding is not None
    assert (finding.firing, finding.value, finding.threshold, finding.tensors) == (
        expected,
        pytest.approx(value),
        threshold,
        tensors,
    )


def test_nothing_judged_without_enough_samples() -> None:
    """No row reaches min_class_samples: None; records without confusion counts: None."""
    assert last(Confusion(), [rec(0, labels=matrix([[5, 4], [0, 9]]))]) is None
    assert last(Confusion(), [rec(0, labels=ClassCounts(2, (50, 50)))]) is None


def test_counts_accumulate_and_grow() -> None:
    """Rows are judged on the sum over steps; a later block with more classes grows the matrix."""
    records = [
        rec(0, labels=matrix([[5, 0], [0, 5]])),
        rec(1, labels=matrix([[5, 0, 0], [0, 5, 0], [0, 10, 0]])),
    ]
    out = replay(Confusion(), records)[1]
    assert [(s, f.firing, f.tensors) for s, f in out] == [(1, True, ("recall[2]", "confusion[2,1]"))]


def test_category_no() -> None:
    """With category_no, smaller blocks fit; a block with more classes is an error that names it."""
    rule = Confusion(category_no=4)
    assert rule.initialize()["k"] == 4
    finding = last(rule, [rec(0, labels=matrix([[10, 0], [0, 10]]))])
    assert finding is not None and not finding.firing
    with pytest.raises(ValueError, match="'labels' .* 5 classes, more than category_no=4"):
        rule.update(rule.initialize(), rec(0, labels=matrix([[1] * 5] * 5)))


def test_block_selection() -> None:
    """A block counts when its name matches both `labels` and `predictions` (re.search)."""
    bad = matrix([[0, 20], [20, 0]])
    assert last(Confusion(), [rec(0, val_labels=bad)]).firing is True
    assert last(Confusion(), [rec(0, targets=bad)]) is None
    assert last(Confusion(labels="targets"), [rec(0, targets=bad)]) is None  # predictions still "labels"
    assert last(Confusion(labels="targets", predictions=None), [rec(0, targets=bad)]).firing is True


def test_repeated_steps_are_not_counted() -> None:
    """A redelivered or older step adds nothing."""
    block = matrix([[6, 0], [0, 6]])
    out = replay(Confusion(), [rec(1, labels=block), rec(1, labels=block), rec(0, labels=block)])[1]
    assert out == []


def test_opt_in() -> None:
    """The cumulative recall bar fires through healthy runs, so the rule is not a default rule."""
    assert "Confusion" not in {r.name for r in default_rules()}


@pytest.mark.parametrize(
    "params", [{"min_diag": 1.5}, {"category_no": 0}, {"labels": "["}, {"max_off_diag": -1}]
)
def test_invalid_params(params: dict) -> None:
    """Out-of-range values and bad regexes are ConfigErrors."""
    with pytest.raises(ConfigError):
        Confusion(**params)


def _stream(steps: int, seed: int = 0) -> list[StepRecord]:
    """A 5-class model: perfect first, then noisy and confusing class 4 with 3; k sometimes inferred."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        y = rng.integers(0, 5, int(rng.integers(5, 40)))
        pred = y.copy()
        if s > steps // 3:
            pred = np.where(rng.random(y.size) < 0.9, y, rng.integers(0, 5, y.size))
            pred[(y == 4) & (rng.random(y.size) < 0.8)] = 3
        out.append(rec(s, labels=class_counts(y, pred, None if s % 4 == 0 else 5)))
        if s % 13 == 2:
            out.append(out[-1])
    return out


def _reference(records: list[StepRecord], p) -> list[tuple[int, bool, float, tuple[str, ...]]]:
    """numpy: sum every counted block so far, normalise rows, compare."""
    out, seen = [], []
    for r in records:
        if seen and r.step <= seen[-1].step:
            continue
        seen.append(r)
        k = max(x.classes["labels"].k for x in seen)
        m = np.zeros((k, k))
        for x in seen:
            c = x.classes["labels"]
            m[: c.k, : c.k] += np.array(c.confusion).reshape(c.k, c.k)
        n = m.sum(axis=1)
        judged = n >= p.min_class_samples
        if not judged.any():
            continue
        share = m / np.maximum(n, 1)[:, None]
        diag = np.diagonal(share)
        low = sorted((float(diag[i]), i) for i in range(k) if judged[i] and diag[i] < p.min_diag)
        off = share.copy()
        np.fill_diagonal(off, 0)
        high = sorted(
            (-float(off[i, j]), i, j)
            for i in range(k)
            for j in range(k)
            if judged[i] and off[i, j] > p.max_off_diag
        )
        tensors = tuple(f"recall[{i}]" for _, i in low) + tuple(f"confusion[{i},{j}]" for _, i, j in high)
        value = low[0][0] if low else -high[0][0] if high else float(diag[judged].min())
        out.append((r.step, bool(low or high), value, tensors[:32]))
    return out


@pytest.mark.parametrize("params", [{}, {"min_diag": 0.7, "max_off_diag": 0.25}, {"min_class_samples": 40}])
def test_matches_batch_reference(params: dict) -> None:
    """Streaming findings equal a numpy recomputation over the full history at every counted record."""
    records = _stream(150)
    rule = Confusion(**params)
    got = [(s, f.firing, f.value, f.tensors) for s, f in replay(rule, records)[1]]
    expected = _reference(records, rule.params)
    assert [(g[0], g[1], g[3]) for g in got] == [(e[0], e[1], e[3]) for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected])
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _stream(100, seed=2)
    plain = replay(Confusion(), records)[1]
    for k in (1, 9):
        assert repr(replay(Confusion(), records, roundtrip_every=k)[1]) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state is k×k counts: from 1k to 100k steps only the counts (and the step) gain digits."""
    rule = Confusion()
    block = class_counts(np.arange(100) % 10, (np.arange(100) * 3) % 10, 10)
    state, sizes = rule.initialize(), {}
    for s in range(100_000):
        state, _ = rule.update(state, make_record(s, classes={"labels": block}))
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] <= sizes[1_000] + 2 * 100 + 2
    assert sizes[100_000] < 1_500
