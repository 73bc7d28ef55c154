"""NLPSequenceRatio: share of watched token values over a sliding window of steps."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.producers.stats_numpy import token_counts
from tensorpulse.rules import NLPSequenceRatio
from tensorpulse.rules.nlp_sequence_ratio import parse_thresholds, parse_token_values
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import StepRecord, TokenCounts


def tok(total: int, **counts: int) -> TokenCounts:
    """Token counts; keyword t<id>=count (e.g. t0=5)."""
    return TokenCounts(total, {int(k[1:]): v for k, v in counts.items()})


def rec(step: int, **blocks: TokenCounts) -> StepRecord:
    return make_record(step, tokens=blocks)


def last(rule: NLPSequenceRatio, records: list[StepRecord]):
    out = replay(rule, records)[1]
    return out[-1][1] if out else None


@pytest.mark.parametrize(
    ("counts", "params", "expected", "value", "tensors"),
    [
        (tok(100, t0=50), {}, False, 50.0, ()),  # exactly the threshold does not fire
        (tok(100, t0=51), {}, True, 51.0, ("token 0",)),
        (tok(100, t0=51), {"token_thresholds_percent": "60"}, False, 51.0, ()),
        (
            tok(100, t0=10, t102=30),
            {"token_values": "0,102", "token_thresholds_percent": "50,20"},
            True,
            30.0,
            ("token 102",),
        ),
        (
            tok(100, t0=60, t102=30),
            {"token_values": "0, 102", "token_thresholds_percent": "55, 20"},
            True,
            30.0,
            ("token 0", "token 102"),
        ),
        (
            tok(100, t0=60, t102=30),
            {"token_values": [0, 102], "token_thresholds_percent": [55, 10]},
            True,
            30.0,
            ("token 0", "token 102"),
        ),
        (
            tok(100, t0=10, t102=5),
            {"token_values": 102, "token_thresholds_percent": 4.5},
            True,
            5.0,
            ("token 102",),
        ),
        (tok(100, t0=0), {"token_thresholds_percent": "0"}, False, 0.0, ()),
    ],
)
def test_threshold_table(
    counts: TokenCounts, params: dict, expected: bool, value: float, tensors: tuple
) -> None:
    """Fires when a watched value's percentage of the tokens exceeds its own threshold."""
    finding = last(NLPSequenceRatio(**params), [rec(0, input_ids=counts)])
    assert finding is not None
    assert (finding.firing, finding.value, finding.tensors) == (expected, pytest.approx(value), tensors)


@pytest.mark.parametrize(
    ("num_steps", "expected"),
    [
        (1, [False, True, False, True, False]),  # per step: flaps with every batch
        (2, [False, False, False, False, False]),  # (40 + 60) / 200 = 50 % is not over
        (10, [False, False, False, False, False]),
    ],
)
def test_window(num_steps: int, expected: list[bool]) -> None:
    """The percentage is taken over the last num_steps counted records."""
    shares = [40, 60, 40, 60, 40]
    records = [rec(s, ids=tok(100, t0=x)) for s, x in enumerate(shares)]
    assert [f.firing for _, f in replay(NLPSequenceRatio(num_steps=num_steps), records)[1]] == expected


def test_window_slides() -> None:
    """Old steps leave the window: a padded burst fires, then normal batches resolve it."""
    records = [rec(0, ids=tok(100, t0=90)), *[rec(s, ids=tok(100, t0=30)) for s in range(1, 6)]]
    out = replay(NLPSequenceRatio(num_steps=3), records)[1]
    assert [f.value for _, f in out] == pytest.approx([90, 60, 50, 30, 30, 30])
    assert [f.firing for _, f in out] == [True, True, False, False, False, False]
    assert "token 0 is 90.0 % of the tokens of the last 1 step(s) (> 50 %)" in out[0][1].message


def test_inputs_are_summed_and_selected() -> None:
    """Matching inputs add up; tensor_regex (re.search) selects them; uncounted values are not judged."""
    records = [rec(0, input_ids=tok(100, t0=70), labels=tok(300, t0=30))]
    assert last(NLPSequenceRatio(), records).value == pytest.approx(25.0)
    assert last(NLPSequenceRatio(tensor_regex="input_ids"), records).firing is True
    assert last(NLPSequenceRatio(tensor_regex="nothing"), records) is None
    # the hook counted token 0 only: token 5 cannot be judged, token 0 still is
    rule = NLPSequenceRatio(token_values="5,0", token_thresholds_percent="1,50")
    assert last(rule, records).value == pytest.approx(25.0)
    assert last(NLPSequenceRatio(token_values="5"), records) is None


def test_repeated_steps_are_not_counted() -> None:
    """A redelivered or older step does not enter the window."""
    records = [rec(3, ids=tok(100, t0=90)), rec(3, ids=tok(100, t0=90)), rec(2, ids=tok(100, t0=0))]
    assert [s for s, _ in replay(NLPSequenceRatio(), records)[1]] == [3]


@pytest.mark.parametrize(
    ("values", "thresholds", "match"),
    [
        ("0,1", "50", "2 entries but token_thresholds_percent 1"),
        ("0", "50,10", "1 entries but token_thresholds_percent 2"),
        ("a", "50", "integer token ids"),
        ("0,,1", "50,50,50", "comma-separated list"),
        ("0,0", "50,50", "repeats"),
        ("0", "150", r"\[0, 100\]"),
        ("0", "x", "percentages"),
    ],
)
def test_invalid_lists(values: str, thresholds: str, match: str) -> None:
    """The comma-separated parameters must parse, agree in length and hold valid values."""
    with pytest.raises(ConfigError, match=match):
        NLPSequenceRatio(token_values=values, token_thresholds_percent=thresholds)


@pytest.mark.parametrize("params", [{"num_steps": 0}, {"tensor_regex": "("}, {"token_values": 1.5}])
def test_invalid_params(params: dict) -> None:
    """Out-of-range values, non-integers and bad regexes are ConfigErrors."""
    with pytest.raises(ConfigError):
        NLPSequenceRatio(**params)


def test_parsers() -> None:
    """The parsers accept strings with spaces, single numbers and lists."""
    assert parse_token_values(" 0 , 102,3") == (0, 102, 3)
    assert parse_token_values(7) == (7,)
    assert parse_thresholds("50, 2.5") == (50.0, 2.5)
    assert parse_thresholds([10, 20]) == (10.0, 20.0)


def _stream(steps: int, seed: int = 0) -> list[StepRecord]:
    """Padded batches (token 0) whose padding grows mid-run; a few [UNK] (token 100) everywhere."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        length = int(rng.integers(8, 64))
        ids = rng.integers(1, 1000, (16, 64))
        pad_from = length if s < steps // 2 else length // 3
        ids[:, pad_from:] = 0
        ids[rng.random(ids.shape) < 0.02] = 100
        out.append(rec(s, input_ids=token_counts(ids, (0, 100))))
        if s % 9 == 4:
            out.append(out[-1])
    return out


def _reference(records: list[StepRecord], values, thresholds, num_steps):
    """numpy over the list of counted records: the last num_steps of them, summed."""
    counted: list[StepRecord] = []
    out = []
    for r in records:
        if counted and r.step <= counted[-1].step:
            continue
        counted.append(r)
        window = counted[-num_steps:]
        total = np.array([w.tokens["input_ids"].total for w in window]).sum()
        pct = [
            100.0 * np.array([w.tokens["input_ids"].counts[v] for w in window]).sum() / total for v in values
        ]
        over = [f"token {v}" for v, x, t in zip(values, pct, thresholds, strict=True) if x > t]
        margin = [x - t for x, t in zip(pct, thresholds, strict=True)]
        out.append((r.step, bool(over), pct[int(np.argmax(margin))], tuple(over)))
    return out


@pytest.mark.parametrize(
    ("params", "values", "thresholds"),
    [
        ({}, (0,), (50.0,)),
        (
            {"token_values": "0,100", "token_thresholds_percent": "60,1.9", "num_steps": 4},
            (0, 100),
            (60.0, 1.9),
        ),
        ({"num_steps": 1}, (0,), (50.0,)),
    ],
)
def test_matches_batch_reference(params: dict, values: tuple, thresholds: tuple) -> None:
    """Streaming findings equal a numpy recomputation over the window at every counted record."""
    records = _stream(120)
    got = [(s, f.firing, f.value, f.tensors) for s, f in replay(NLPSequenceRatio(**params), records)[1]]
    expected = _reference(records, values, thresholds, params.get("num_steps", 10))
    assert [(g[0], g[1], g[3]) for g in got] == [(e[0], e[1], e[3]) for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected])
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _stream(80, seed=4)
    rule = NLPSequenceRatio(token_values="0,100", token_thresholds_percent="50,2")
    plain = replay(rule, records)[1]
    for k in (1, 6):
        assert repr(replay(rule, records, roundtrip_every=k)[1]) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state is the window of num_steps entries: flat from 1k to 100k steps."""
    rule = NLPSequenceRatio(token_values="0,100", token_thresholds_percent="50,2")
    blocks = [tok(1024, t0=300, t100=20), tok(1000, t0=700, t100=9)]
    state, sizes = rule.initialize(), {}
    for s in range(100_000):
        state, _ = rule.update(state, make_record(s, tokens={"input_ids": blocks[s % 2]}))
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] <= sizes[1_000] + 2  # only the step gains digits
