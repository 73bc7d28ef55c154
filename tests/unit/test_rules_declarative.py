"""The declarative Threshold rule: comparisons, statistics, patience, windows, modes, and its state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import Finding
from tensorpulse.rules.config import spec_for
from tensorpulse.rules.declarative import MAX_WINDOW, Threshold, deciding, holds, push_held
from tensorpulse.rules.testing import make_record, make_stats, replay
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.wire import StepRecord


def loss_records(values: list[float | None], mode: str = "train") -> list[StepRecord]:
    """One record per value, step = index; None leaves the scalar out."""
    return [make_record(i, mode=mode, scalars={} if v is None else {"loss": v}) for i, v in enumerate(values)]


def firing(rule: Threshold, records: list[StepRecord]) -> list[bool | None]:
    """Per record: the finding's firing flag, or None when the rule checked nothing."""
    state, out = rule.initialize(), []
    for r in records:
        state, finding = rule.update(state, r)
        out.append(None if finding is None else finding.firing)
    return out


# --- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "op", "reduce", "expected"),
    [
        ([0.5, 2.0], ">", "any", True),
        ([0.5, 2.0], ">", "all", False),
        ([1.5, 2.0], ">", "all", True),
        ([1.0], ">", "any", False),
        ([1.0], ">=", "any", True),
        ([1.0], "==", "any", True),
        ([1.0], "!=", "any", False),
        ([0.0], "<", "any", True),
        ([1.0], "<=", "all", True),
        ([math.nan, 2.0], ">", "all", True),  # NaNs are ignored
        ([math.nan], "!=", "any", False),  # ...also for != (NaN != 1 would be True)
        ([], ">", "any", False),
    ],
)
def test_holds(values: list[float], op: str, reduce: str, expected: bool) -> None:
    """holds() compares every non-NaN value with 1.0 and reduces with any/all."""
    assert holds(values, op, 1.0, reduce) is expected


@pytest.mark.parametrize(
    ("op", "reduce", "index"),
    [(">", "any", 1), (">", "all", 2), ("<=", "any", 2), ("<", "all", 1), ("==", "any", 0), ("!=", "all", 0)],
)
def test_deciding(op: str, reduce: str, index: int) -> None:
    """The deciding value is the most extreme for any, the least extreme for all, the first for ==/!=."""
    assert deciding([3.0, 9.0, 1.0], op, reduce) == index


def test_push_held_keeps_the_newest() -> None:
    """The window appends '1'/'0' and keeps only the newest `size` characters."""
    assert push_held("", True, 3) == "1"
    assert push_held("110", False, 3) == "100"
    assert push_held("1", True, 1) == "1"


# --- semantics, table-driven ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "values", "expected"),
    [
        ({"op": ">", "value": 1.0}, [0.5, 2.0, 3.0, 0.5], [False, True, True, False]),
        ({"op": ">=", "value": 1.0}, [0.5, 1.0, 2.0], [False, True, True]),
        ({"op": "<", "value": 1.0}, [0.5, 1.0, 2.0], [True, False, False]),
        ({"op": "<=", "value": 1.0}, [0.5, 1.0, 2.0], [True, True, False]),
        ({"op": "==", "value": 1.0}, [0.5, 1.0, 2.0], [False, True, False]),
        ({"op": "!=", "value": 1.0}, [0.5, 1.0, 2.0], [True, False, True]),
        # patience: consecutive checked steps; a miss resets the run
        (
            {"op": ">", "value": 1.0, "patience": 3},
            [2, 2, 0, 2, 2, 2, 2, 0],
            [False, False, False, False, False, True, True, False],
        ),
        # steps without the scalar are not checked and do not break the run
        ({"op": ">", "value": 1.0, "patience": 2}, [2, None, 2, None], [False, None, True, None]),
        ({"op": ">", "value": 1.0}, [math.nan, 2.0], [None, True]),
        # num_steps: held at >= patience of the last num_steps checked steps
        (
            {"op": ">", "value": 1.0, "patience": 2, "num_steps": 4},
            [2, 0, 0, 0, 2, 0, 2, 0, 0, 0],
            [False, False, False, False, False, False, True, True, False, False],
        ),
        # while the window fills up, fewer steps suffice
        ({"op": ">", "value": 1.0, "patience": 2, "num_steps": 5}, [2, 2, 0], [False, True, True]),
        ({"op": ">", "value": 1.0, "patience": 3, "num_steps": 3}, [2, 2, 2, 0], [False, False, True, False]),
    ],
)
def test_scalar_semantics(params: dict, values: list[float | None], expected: list[bool | None]) -> None:
    """A scalar rule fires per op, patience and window as documented."""
    rule = Threshold(scalar="loss", **params)
    assert firing(rule, loss_records(values)) == expected


def test_repeated_and_older_steps_are_ignored() -> None:
    """A step at or before the last checked one is skipped (None) and does not count for patience."""
    rule = Threshold(scalar="loss", op=">", value=1.0, patience=2)
    records = [make_record(s, scalars={"loss": 5.0}) for s in (3, 3, 1, 4)]
    assert firing(rule, records) == [False, None, None, True]


def _grads(step: int, a: float, b: float, mode: str = "train") -> StepRecord:
    """Two gradient tensors and one weight tensor whose max is a, b and 100."""
    return make_record(
        step,
        mode=mode,
        tensors=[
            make_stats("gradient/fc1.weight", "gradients", [a]),
            make_stats("gradient/fc2.weight", "gradients", [b]),
            make_stats("fc1.weight", "weights", [100.0]),
        ],
    )


@pytest.mark.parametrize(
    ("reduce", "expected"),
    [("any", [False, True, True]), ("all", [False, False, True])],
)
def test_reduce_over_tensors(reduce: str, expected: list[bool]) -> None:
    """reduce: any fires when one selected tensor meets the condition, all only when every one does."""
    rule = Threshold(collection_names=["gradients"], statistic="max", op=">", value=1.0, reduce=reduce)
    records = [_grads(0, 0.5, 0.5), _grads(1, 0.5, 2.0), _grads(2, 3.0, 2.0)]
    assert firing(rule, records) == expected


def test_finding_reports_the_deciding_tensor() -> None:
    """A firing finding carries the matched tensors, the deciding value and the threshold."""
    rule = Threshold(collection_names=["gradients"], statistic="max", op=">", value=1.0)
    _, out = replay(rule, [_grads(0, 3.0, 2.0)])
    (step, finding) = out[0]
    assert step == 0 and finding.firing
    assert finding.tensors == ("gradient/fc1.weight", "gradient/fc2.weight")
    assert (finding.value, finding.threshold) == (3.0, 1.0)
    assert "gradient/fc1.weight = 3" in finding.message and "train step 0" in finding.message


def test_selection_by_collection_and_regex() -> None:
    """collection_names and tensor_regex (re.search) select the tensors read; unselected ones never count."""
    only_fc2 = Threshold(tensor_regex=r"fc2\.weight$", statistic="max", op=">", value=1.0)
    weights = Threshold(collection_names=["weights"], statistic="max", op=">", value=50.0)
    record = _grads(0, 5.0, 0.5)
    assert firing(only_fc2, [record]) == [False]
    assert replay(weights, [record])[1][0][1].tensors == ("fc1.weight",)


def test_empty_and_missing_tensors_are_not_checked() -> None:
    """Records without a selected non-empty tensor return None."""
    rule = Threshold(collection_names=["gradients"], statistic="l2", op=">", value=0.0)
    empty = make_record(0, tensors=[make_stats("gradient/x", "gradients", None)])
    other = make_record(1, tensors=[make_stats("w", "weights", [1.0])])
    assert firing(rule, [empty, other]) == [None, None]


VALUES = np.array([-3.0, 0.0, 0.0, 5.0])


@pytest.mark.parametrize(
    ("statistic", "expected"),
    [
        ("mean", 0.5),
        ("std", math.sqrt(8.25)),
        ("variance", 8.25),
        ("min", -3.0),
        ("max", 5.0),
        ("abs_mean", 2.0),
        ("l2", math.sqrt(34.0)),
        ("zero_frac", 0.5),
        ("nan", 2.0),
        ("inf", 1.0),
        ("nonfinite", 3.0),
    ],
)
def test_statistics(statistic: str, expected: float) -> None:
    """Each statistic name reads the tensor's statistic (here of [-3, 0, 0, 5] with 2 NaN, 1 inf counted)."""
    stats = make_stats("t", "weights", VALUES, nan=2, inf=1)
    rule = Threshold(statistic=statistic, op=">", value=-1e9)
    _, out = replay(rule, [make_record(0, tensors=[stats])])
    assert out[0][1].value == pytest.approx(expected)


def test_nan_statistic_is_ignored() -> None:
    """A NaN statistic (a tensor holding NaN) is neither a match nor a miss."""
    rule = Threshold(statistic="max", op="!=", value=0.0)
    bad = make_stats("t", "weights", [1.0, math.nan])
    assert math.isnan(bad.max)
    assert firing(rule, [make_record(0, tensors=[bad])]) == [None]


def test_mode() -> None:
    """A rule watches only its `mode`: its instance modes narrow to it, other modes are skipped."""
    rule = Threshold(scalar="loss", op=">", value=1.0, mode="eval")
    assert rule.modes == frozenset({"eval"}) and Threshold.modes >= {"train", "eval"}
    records = [make_record(0, scalars={"loss": 5.0}), make_record(0, mode="eval", scalars={"loss": 5.0})]
    assert firing(rule, records) == [None, True]


def test_evaluator_alerts_once_per_transition() -> None:
    """Through the stream layer's evaluator the rule raises one firing and one resolved event."""
    rule = Threshold(scalar="loss", op=">", value=1.0, patience=2)
    ev = JobEvaluator([spec_for(rule, "HighLoss", severity="critical")])
    state, events = None, []
    for r in loss_records([2, 2, 2, 0.5, 0.5]) + loss_records([9, 9], mode="eval"):
        state, out = ev.process(state, r, now=0.0)
        events += [(t.event.rule, t.event.status, t.event.step, t.event.severity) for t in out]
    assert events == [("HighLoss", "firing", 1, "critical"), ("HighLoss", "resolved", 3, "critical")]


# --- state ----------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 7])
def test_state_round_trip_and_purity(window: int | None) -> None:
    """Findings are identical when the state goes through JSON after every record; update never mutates."""
    rng = np.random.default_rng(5)
    records = loss_records([float(x) for x in rng.normal(1.0, 0.5, 200)])
    rule = Threshold(scalar="loss", op=">", value=1.2, patience=3, num_steps=window)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert any(f.firing for _, f in plain) and not all(f.firing for _, f in plain)
    state = rule.initialize()
    for r in records[:20]:
        before = json.dumps(state)
        new, finding = rule.update(state, r)
        assert json.dumps(state) == before and isinstance(finding, Finding)
        state = new


def test_state_is_bounded() -> None:
    """The window state never grows beyond num_steps characters, however long the run."""
    rule = Threshold(scalar="loss", op=">", value=0.5, patience=2, num_steps=50)
    state, _ = replay(rule, loss_records([float(i % 3) for i in range(5000)]))
    assert len(json.dumps(state)) < 100 and len(state["w"]) == 50


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"op": ">", "value": 1.0}, r"expected 'statistic' .* or 'scalar: NAME'"),
        ({"scalar": "loss", "statistic": "l2", "op": ">", "value": 1.0}, r"statistic: 'statistic' selects"),
        ({"scalar": "loss", "tensor_regex": "x", "op": ">", "value": 1.0}, r"tensor_regex: 'tensor_regex'"),
        ({"statistic": "l3", "op": ">", "value": 1.0}, r"statistic: Input should be 'mean'"),
        ({"statistic": "l2", "op": "=>", "value": 1.0}, r"op: Input should be '>'"),
        ({"statistic": "l2", "op": ">", "value": math.nan}, r"value: must be a number, not NaN"),
        ({"statistic": "l2", "op": ">"}, r"value: Field required"),
        ({"statistic": "l2", "op": ">", "value": 1, "patience": 0}, r"patience: Input should be greater"),
        ({"statistic": "l2", "op": ">", "value": 1, "patience": 4, "num_steps": 3}, r"num_steps: must be at"),
        ({"statistic": "l2", "op": ">", "value": 1, "num_steps": MAX_WINDOW + 1}, r"num_steps: Input should"),
        ({"statistic": "l2", "op": ">", "value": 1, "reduce": "most"}, r"reduce: Input should be 'any'"),
        ({"statistic": "l2", "op": ">", "value": 1, "mode": "test"}, r"mode: Input should be 'train'"),
        ({"statistic": "l2", "op": ">", "value": 1, "tensor_regex": "(x"}, r"tensor_regex: invalid regular"),
        ({"statistic": "l2", "op": ">", "value": 1, "treshold": 2}, r"treshold: Extra inputs"),
    ],
)
def test_invalid_params(params: dict, pattern: str) -> None:
    """Invalid parameters raise ConfigError naming the parameter and the problem."""
    with pytest.raises(ConfigError, match=pattern):
        Threshold(**params)


def test_state_from_other_parameters_still_reads() -> None:
    """A state saved before num_steps was added (or removed) is read, not a KeyError."""
    run_state = Threshold(scalar="loss", op=">", value=1.0).update(
        {"last": 0, "run": 1}, loss_records([5, 5])[1]
    )[0]
    windowed = Threshold(scalar="loss", op=">", value=1.0, num_steps=3)
    state, finding = windowed.update(run_state, make_record(2, scalars={"loss": 5.0}))
    assert state["w"] == "1" and finding is not None and finding.firing
    plain = Threshold(scalar="loss", op=">", value=1.0, patience=2)
    assert plain.update({"last": 1, "w": "11"}, make_record(2, scalars={"loss": 5.0}))[0]["run"] == 1
