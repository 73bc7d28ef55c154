"""ClassImbalance: cumulative label-count ratio, and per-class misprediction over blocks of `samples`."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.producers.stats_numpy import class_counts
from tensorpulse.rules import ClassImbalance
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import ClassCounts, StepRecord


def labels_only(*counts: int) -> ClassCounts:
    return ClassCounts(len(counts), tuple(counts))


def with_predictions(rows: list[list[int]]) -> ClassCounts:
    """A block from a confusion matrix given row by row (row = label, column = prediction)."""
    k = len(rows)
    return ClassCounts(k, tuple(sum(r) for r in rows), tuple(x for r in rows for x in r))


def rec(step: int, **blocks: ClassCounts) -> StepRecord:
    return make_record(step, classes=blocks)


def last(rule: ClassImbalance, records: list[StepRecord]):
    """The last finding of a replay (None when the rule judged nothing)."""
    out = replay(rule, records)[1]
    return out[-1][1] if out else None


@pytest.mark.parametrize(
    ("counts", "params", "expected", "ratio"),
    [
        ((990, 10), {}, True, 99.0),  # the spec's edge case
        ((500, 500), {}, False, 1.0),
        ((1000, 100), {}, False, 10.0),  # exactly the threshold does not fire
        ((1010, 100), {}, True, 10.1),
        ((990, 10), {"threshold_imbalance": 99.0}, False, 99.0),
        ((990, 10), {"threshold_imbalance": 98.9}, True, 99.0),
        ((300, 200, 0), {}, True, 300.0),  # a class never seen counts as one sample
        ((6, 4, 0), {"samples": 10}, False, 6.0),  # ... so a small sample does not fire on it
        ((11, 4, 0), {"samples": 10}, True, 11.0),
        ((700,), {}, False, 1.0),  # one class only: nothing to compare
        ((200, 50, 250, 5), {}, True, 50.0),
    ],
)
def test_imbalance_table(counts: tuple[int, ...], params: dict, expected: bool, ratio: float) -> None:
    """Fires when largest/smallest count (a zero counting as one) exceeds threshold_imbalance."""
    finding = last(ClassImbalance(**params), [rec(0, labels=labels_only(*counts))])
    assert finding is not None
    assert (finding.firing, finding.value) == (expected, pytest.approx(ratio))
    assert finding.threshold == params.get("threshold_imbalance", 10.0)


def test_990_zeros_and_10_ones_over_steps() -> None:
    """Labels arriving 99:1 per step are judged from the step where 500 labels were seen, and fire."""
    records = [rec(s, labels=labels_only(99, 1)) for s in range(10)]
    _, out = replay(ClassImbalance(), records)
    assert [s for s, _ in out] == [4, 5, 6, 7, 8, 9]  # 5 × 100 = 500 labels at step 4
    assert all(f.firing and f.value == pytest.approx(99.0) for _, f in out)
    assert out[0][1].tensors == ("class 0", "class 1")
    assert "class 0 has 495 of 500 labels, class 1 5" in out[0][1].message


@pytest.mark.parametrize(
    ("seen", "samples", "judged"), [(499, 500, False), (500, 500, True), (990, 1000, False)]
)
def test_samples_gate(seen: int, samples: int, judged: bool) -> None:
    """Nothing is judged before `samples` labels were counted."""
    finding = last(ClassImbalance(samples=samples), [rec(0, labels=labels_only(seen - seen // 2, seen // 2))])
    assert (finding is not None) is judged


def test_imbalance_resolves_as_counts_even_out() -> None:
    """A skewed start fires, and balanced later batches bring the cumulative ratio back under."""
    records = [
        rec(0, labels=labels_only(990, 10)),
        *[rec(s, labels=labels_only(50, 50)) for s in range(1, 5)],
    ]
    out = replay(ClassImbalance(), records)[1]
    assert [f.firing for _, f in out] == [True, True, False, False, False]
    assert [f.value for _, f in out] == pytest.approx([99.0, 1040 / 60, 1090 / 110, 1140 / 160, 1190 / 210])


def _balanced(wrong_of_ten: int, cls: int = 1, k: int = 3, n: int = 10) -> ClassCounts:
    """k classes with n samples each, class `cls` predicted as class 0 in `wrong_of_ten` of them."""
    rows = [[n if i == j else 0 for j in range(k)] for i in range(k)]
    rows[cls][cls] -= wrong_of_ten * n // 10
    rows[cls][(cls + 1) % k] += wrong_of_ten * n // 10
    return with_predictions(rows)


@pytest.mark.parametrize(
    ("wrong", "n", "params", "expected"),
    [
        (8, 200, {}, True),
        (6, 200, {}, False),
        (8, 200, {"threshold_misprediction": 0.85}, False),
        (10, 200, {"threshold_misprediction": 0.95}, True),
        (10, 20, {"samples": 60}, True),
        (10, 20, {"samples": 60, "min_class_samples": 21}, False),  # class too rare to judge
        (10, 20, {"samples": 60, "min_class_samples": 20}, True),
    ],
)
def test_misprediction_table(wrong: int, n: int, params: dict, expected: bool) -> None:
    """Fires when a class with >= min_class_samples samples is mispredicted more than the threshold."""
    finding = last(ClassImbalance(**params), [rec(0, labels=_balanced(wrong, n=n))])
    assert finding is not None and finding.firing is expected
    if expected:
        assert finding.value == pytest.approx(wrong / 10)
        assert finding.threshold == params.get("threshold_misprediction", 0.7)
        assert finding.tensors == ("class 1",)


def test_misprediction_uses_the_last_closed_block() -> None:
    """A bad first block fires; the next good block of `samples` predictions resolves it."""
    bad, good = _balanced(10, n=100), _balanced(0, n=100)  # 300 labels per record
    records = [rec(0, labels=bad), rec(1, labels=bad), rec(2, labels=good), rec(3, labels=good)]
    out = replay(ClassImbalance(), records)[1]
    # block 1 closes at step 1 (600 >= 500): bad; block 2 closes at step 3: good
    assert [(s, f.firing) for s, f in out] == [(1, True), (2, True), (3, False)]


def test_both_conditions_name_all_classes() -> None:
    """Imbalance and misprediction together: the ratio is the value, every class involved is named."""
    block = with_predictions([[900, 0], [90, 10]])  # 900:100 labels, class 1 90 % wrong
    finding = last(ClassImbalance(), [rec(0, labels=block)])
    assert (finding.firing, finding.value, finding.threshold) == (True, pytest.approx(0.9), 0.7)
    assert finding.tensors == ("class 1",)
    finding = last(ClassImbalance(threshold_imbalance=5), [rec(0, labels=block)])
    assert finding.tensors == ("class 0", "class 1") and "mispredicted" in finding.message
    assert (finding.value, finding.threshold) == (pytest.approx(9.0), 5.0)


def test_block_selection_and_argmax() -> None:
    """labels_regex / predictions_regex pick blocks by name (re.search); argmax changes nothing."""
    skew, fair = labels_only(990, 10), with_predictions([[250, 250], [250, 250]])
    records = [rec(0, labels=fair, targets=skew)]
    assert last(ClassImbalance(), records).firing is False  # "targets" is not read by default
    assert last(ClassImbalance(labels_regex="targets"), records).firing is True
    assert last(ClassImbalance(labels_regex=None), records).value == pytest.approx(1490 / 510)
    assert last(ClassImbalance(argmax=True), records) == last(ClassImbalance(), records)
    # predictions from another block than the labels
    wrong = with_predictions([[0, 300], [300, 0]])
    records = [rec(0, labels=labels_only(300, 300), preds=wrong)]
    assert last(ClassImbalance(), records).firing is False
    assert last(ClassImbalance(predictions_regex="preds"), records).firing is True
    assert last(ClassImbalance(), [rec(0, other=skew)]) is None


def test_repeated_steps_are_not_counted() -> None:
    """A redelivered or older step adds nothing."""
    block = labels_only(200, 100)
    out = replay(ClassImbalance(), [rec(0, labels=block), rec(0, labels=block), rec(1, labels=block)])[1]
    assert [s for s, _ in out] == [1]


@pytest.mark.parametrize(
    "params",
    [{"threshold_misprediction": 1.5}, {"samples": 0}, {"labels_regex": "("}, {"threshold_imbalance": 0}],
)
def test_invalid_params(params: dict) -> None:
    """Out-of-range values and bad regexes are ConfigErrors."""
    with pytest.raises(ConfigError):
        ClassImbalance(**params)


def _stream(steps: int, seed: int = 0) -> list[StepRecord]:
    """Batches from a shifting 4-class distribution with a model that learns class 3 late."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        p = np.array([0.5, 0.3, 0.18, 0.02]) if s < steps // 2 else np.array([0.3, 0.3, 0.2, 0.2])
        y = rng.choice(4, size=int(rng.integers(20, 80)), p=p)
        accuracy = 0.2 if s < steps // 3 else 0.9
        pred = np.where(rng.random(y.size) < accuracy, y, rng.integers(0, 4, y.size))
        pred[y == 3] = 0 if s < 2 * steps // 3 else pred[y == 3]
        k = 4 if s % 5 else None  # the hook sometimes infers k from the batch
        out.append(rec(s, labels=class_counts(y, pred, k)))
        if s % 17 == 3:
            out.append(out[-1])  # redelivered
    return out


def _reference(records: list[StepRecord], p) -> list[tuple[int, bool, float, tuple[str, ...]]]:
    """Recompute from all records so far: numpy sums of counts; prediction blocks by cumulative size."""
    out = []
    seen: list[StepRecord] = []
    for r in records:
        if seen and r.step <= seen[-1].step:
            continue
        seen.append(r)
        k = max(x.classes["labels"].k for x in seen)
        labels = np.zeros(k, dtype=np.int64)
        for x in seen:
            labels[: x.classes["labels"].k] += x.classes["labels"].labels
        if labels.sum() < p.samples:
            continue
        # close prediction blocks over the whole history
        block = np.zeros((k, k), dtype=np.int64)
        closed = None
        for x in seen:
            c = x.classes["labels"]
            m = np.zeros((k, k), dtype=np.int64)
            m[: c.k, : c.k] = np.array(c.confusion).reshape(c.k, c.k)
            block += m
            if block.sum() >= p.samples:
                closed, block = block, np.zeros((k, k), dtype=np.int64)
        safe = np.maximum(labels, 1)
        ratio = labels.max() / safe[np.argmin(labels)]
        imbalanced = ratio > p.threshold_imbalance
        wrong: list[tuple[int, float]] = []
        if closed is not None:
            n = closed.sum(axis=1)
            frac = 1 - np.diagonal(closed) / np.maximum(n, 1)
            wrong = sorted(
                (
                    (c, float(frac[c]))
                    for c in range(k)
                    if n[c] >= p.min_class_samples and frac[c] > p.threshold_misprediction
                ),
                key=lambda cf: (-cf[1], cf[0]),
            )
        tensors = (f"class {int(np.argmax(labels))}", f"class {int(np.argmin(labels))}") if imbalanced else ()
        tensors += tuple(f"class {c}" for c, _ in wrong if f"class {c}" not in tensors)
        value = ratio if imbalanced or not wrong else wrong[0][1]
        out.append((r.step, bool(imbalanced or wrong), float(value), tensors))
    return out


@pytest.mark.parametrize(
    "params", [{}, {"samples": 100, "threshold_imbalance": 4.0}, {"threshold_misprediction": 0.5}]
)
def test_matches_batch_reference(params: dict) -> None:
    """Streaming findings equal a recomputation from the full history at every counted record."""
    records = _stream(160)
    rule = ClassImbalance(**params)
    out = replay(rule, records)[1]
    got = [(s, f.firing, f.value, f.tensors) for s, f in out]
    expected = _reference(records, rule.params)
    assert [g[:2] + g[3:] for g in got] == [e[:2] + e[3:] for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected])
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _stream(120, seed=1)
    rule = ClassImbalance(samples=200)
    plain = replay(rule, records)[1]
    for k in (1, 7):
        assert repr(replay(rule, records, roundtrip_every=k)[1]) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state holds count vectors of length k: from 1k to 100k steps only the counts gain digits."""
    rule = ClassImbalance()
    blocks = [
        class_counts(np.arange(64) % 10, (np.arange(64) * 7) % 10, 10),
        class_counts(np.arange(64) % 10),
    ]
    state, sizes = rule.initialize(), {}
    for s in range(100_000):
        state, _ = rule.update(state, make_record(s, classes={"labels": blocks[s % 2]}))
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] <= sizes[1_000] + 2 * 10 + 8  # ten label counts gain two digits, the step too
    assert sizes[100_000] < 500
