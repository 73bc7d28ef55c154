"""ExplodingTensor: NaN/inf counts of tensors and non-finite scalars, in every mode."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import ExplodingTensor
from tensorpulse.rules.testing import make_record, make_stats, replay, state_size
from tensorpulse.wire import MODES, TensorStats


def one_nan_in_a_million() -> TensorStats:
    values = np.random.default_rng(0).standard_normal(1_000_000)
    values[123_456] = np.nan
    return make_stats("gradient/fc.weight", "gradients", values)


def float32_l2(values: np.ndarray) -> float:
    """The l2 norm as a float32 device reduction computes it (sum of squares in float32)."""
    v = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        return float(np.sqrt(np.sum(v * v, dtype=np.float32)))


def test_one_nan_in_a_million_fires() -> None:
    """A single NaN among a million elements fires, with value 1 and the tensor named."""
    _, finding = ExplodingTensor().update({}, make_record(7, tensors=[one_nan_in_a_million()]))
    assert finding is not None and finding.firing
    assert finding.value == 1.0
    assert finding.tensors == ("gradient/fc.weight",)
    assert "gradient/fc.weight" in finding.message and "step 7" in finding.message


@pytest.mark.parametrize(
    "tensor",
    [
        # one finite float32 element of 3e38: its float32 l2 (sqrt of 9e76) overflows
        make_stats("fc.weight", "weights", None, n=1, mean=3e38, std=0.0, min=3e38, max=3e38, abs_mean=3e38),
        # a million finite elements near float32 max: the device's float32 mean overflowed to inf
        # and its std became NaN, yet min/max are finite and there is no NaN or inf element
        make_stats(
            "fc.weight",
            "weights",
            None,
            n=1_000_000,
            mean=math.inf,
            std=math.nan,
            min=3.0e38,
            max=3.3e38,
            abs_mean=math.inf,
        ),
    ],
)
def test_finite_tensor_whose_reductions_overflow_does_not_fire(tensor: TensorStats) -> None:
    """A finite tensor whose l2/sum/mean overflow to inf is not exploding: only counts decide."""
    assert math.isinf(float32_l2(np.full(max(1, min(tensor.n, 1000)), tensor.max)))
    _, finding = ExplodingTensor().update({}, make_record(1, tensors=[tensor]))
    assert finding is not None and not finding.firing
    assert finding.value == 0.0


@pytest.mark.parametrize(
    ("values", "only_nan", "expected", "count"),
    [
        ([1.0, 2.0, 3.0], False, False, 0),
        ([1.0, np.inf, 3.0], False, True, 1),
        ([1.0, np.inf, 3.0], True, False, 0),  # only_nan ignores inf
        ([-np.inf, np.inf, np.nan], False, True, 3),
        ([-np.inf, np.inf, np.nan], True, True, 1),
        ([np.nan] * 4, True, True, 4),
    ],
)
def test_tensor_counts_table(values: list[float], only_nan: bool, expected: bool, count: int) -> None:
    """Value is the number of non-finite elements; inf counts unless only_nan."""
    record = make_record(3, tensors=[make_stats("w", "weights", values)])
    _, finding = ExplodingTensor(only_nan=only_nan).update({}, record)
    assert finding is not None and finding.firing is expected
    assert finding.value == count


@pytest.mark.parametrize(
    ("loss", "only_nan", "expected"),
    [
        (0.5, False, False),
        (math.nan, False, True),
        (math.inf, False, True),
        (-math.inf, False, True),
        (math.inf, True, False),
        (math.nan, True, True),
    ],
)
def test_scalar_table(loss: float, only_nan: bool, expected: bool) -> None:
    """A NaN loss fires; ±inf fires unless only_nan."""
    _, finding = ExplodingTensor(only_nan=only_nan).update({}, make_record(4, scalars={"loss": loss}))
    assert finding is not None and finding.firing is expected
    assert finding.tensors == (("loss",) if expected else ())


def test_nan_min_without_count_is_a_cross_check() -> None:
    """A NaN min with a zero NaN count still fires (min/max propagate NaN on the device)."""
    t = make_stats("w", "weights", [1.0, 2.0], min=math.nan)
    _, finding = ExplodingTensor().update({}, make_record(1, tensors=[t]))
    assert finding is not None and finding.firing and finding.value == 1.0


@pytest.mark.parametrize(
    ("params", "expected_tensors"),
    [
        ({}, ("gradient/fc.weight", "net.0/relu_output", "loss")),
        ({"collection_names": ["gradients"]}, ("gradient/fc.weight",)),
        ({"collection_names": ["losses"]}, ("loss",)),
        ({"collection_names": ["metrics", "activations"]}, ("net.0/relu_output", "loss")),
        ({"tensor_regex": "relu"}, ("net.0/relu_output",)),
        ({"tensor_regex": "^loss$"}, ("loss",)),
        ({"collection_names": ["weights"]}, ()),
    ],
)
def test_selection(params: dict, expected_tensors: tuple[str, ...]) -> None:
    """collection_names and tensor_regex restrict which tensors and scalars are checked."""
    record = make_record(
        2,
        scalars={"loss": math.nan, "accuracy": 0.5},
        tensors=[
            make_stats("gradient/fc.weight", "gradients", [np.nan, 1.0]),
            make_stats("net.0/relu_output", "activations", [[np.inf, 1.0]]),
            make_stats("fc.weight", "weights", [1.0, 2.0]),
        ],
    )
    _, finding = ExplodingTensor(**params).update({}, record)
    assert finding is not None
    assert finding.tensors == expected_tensors
    assert finding.firing is bool(expected_tensors)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode(mode: str) -> None:
    """The rule watches every mode, and a NaN eval/predict/global loss fires."""
    rule = ExplodingTensor()
    assert mode in rule.modes
    _, out = replay(rule, [make_record(0, mode=mode, scalars={"loss": math.nan})])
    assert [(s, f.firing) for s, f in out] == [(0, True)]


def test_severity_is_critical_and_bad_regex_rejected() -> None:
    """The rule is critical and an invalid tensor_regex is a ConfigError."""
    assert ExplodingTensor.severity == "critical"
    with pytest.raises(ConfigError, match="tensor_regex"):
        ExplodingTensor(tensor_regex="(")


def _stream(steps: int) -> list:
    return [
        make_record(
            s,
            scalars={"loss": math.nan if s % 11 == 5 else 1.0 / (s + 1)},
            tensors=[make_stats("w", "weights", [1.0, math.inf if s % 13 == 0 else 2.0])],
        )
        for s in range(steps)
    ]


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON after every record leaves the findings unchanged."""
    rule = ExplodingTensor()
    records = _stream(300)
    _, plain = replay(rule, records)
    _, trip = replay(rule, records, roundtrip_every=1)
    assert repr(plain) == repr(trip)
    assert sum(f.firing for _, f in plain) == sum(1 for s in range(300) if s % 11 == 5 or s % 13 == 0)


def test_state_bounded() -> None:
    """The state holds one first occurrence per mode: it does not grow from 100 to 10k steps."""
    rule = ExplodingTensor()
    early, _ = replay(rule, _stream(100))
    state, _ = replay(rule, _stream(10_000))
    assert state_size(state) == state_size(early) < 100
    assert json.loads(json.dumps(state)) == state


def test_remembers_the_first_offender_per_mode() -> None:
    """The state keeps the earliest (step, ts, position) offender; later or later-listed ones do not replace it."""
    rule = ExplodingTensor()
    tensors = [make_stats("a", "weights", [1.0]), make_stats("b", "weights", [math.nan])]
    state, _ = rule.update(rule.initialize(), make_record(9, tensors=tensors))
    assert state["first"] == {"train": [9, 9.0, 1, "b", 0]}  # phase 0: a weight
    later, _ = rule.update(state, make_record(12, scalars={"loss": math.inf}))
    assert later["first"] == state["first"]
    earlier, _ = rule.update(state, make_record(4, scalars={"loss": math.nan}))
    assert earlier["first"]["train"] == [4, 4.0, 0, "loss", 1]
    assert state["first"]["train"][0] == 9, "update mutated the state it was given"
    summary = rule.job_summary({0: state, 3: earlier, 1: {}}, "train")
    assert summary is not None and summary[1] == "first non-finite: rank 3, loss, step 4"
    assert rule.job_summary({0: state}, "eval") is None


def test_a_parameter_first_on_its_rank_comes_before_other_ranks_activations_of_that_step() -> None:
    """FSDP2: rank 1's shard of 2.weight holds the NaN; rank 0 only gets NaN activations from it, and its
    record may come first. The job's first non-finite is rank 1's weight, not rank 0's earlier record."""
    import dataclasses

    rule = ExplodingTensor()
    act = make_stats("3/relu_output", "activations", [math.nan, 1.0])
    weight = make_stats("2.weight", "weights", [math.nan, 1.0])
    first = dataclasses.replace(make_record(11, tensors=[act]), ts=100.0)
    later = dataclasses.replace(make_record(11, rank=1, tensors=[weight, act]), ts=100.5)
    rank0, _ = rule.update(rule.initialize(), first)
    rank1, _ = rule.update(rule.initialize(), later)
    summary = rule.job_summary({0: rank0, 1: rank1}, "train")
    assert summary is not None and summary[1] == "first non-finite: rank 1, 2.weight, step 11"
    # an earlier step still wins over the phase, and an entry stored before the phase reads as phase 1
    older = {"first": {"train": [10, 200.0, 3, "3/relu_output"]}}
    assert (
        rule.job_summary({0: older, 1: rank1}, "train")[1]
        == "first non-finite: rank 0, 3/relu_output, step 10"
    )
    same_step_old = {"first": {"train": [11, 99.0, 0, "gradient/x"]}}
    assert rule.job_summary({0: same_step_old, 1: rank1}, "train")[1].startswith(
        "first non-finite: rank 1, 2.weight"
    )


def test_gradients_of_a_step_the_scaler_skipped_do_not_fire() -> None:
    """A skipped step's inf gradients are the GradScaler's doing; its weights and loss still count."""
    import dataclasses

    inf_grad = make_stats("gradient/fc.weight", "gradients", np.array([1.0, np.inf, -np.inf]))
    nan_weight = make_stats("fc.weight", "weights", np.array([1.0, np.nan]))
    rule = ExplodingTensor()
    skipped = dataclasses.replace(make_record(3, tensors=[inf_grad]), skipped=True)
    assert not rule.update({}, skipped)[1].firing
    assert rule.update({}, make_record(3, tensors=[inf_grad]))[1].firing  # not skipped: fires
    with_weight = dataclasses.replace(make_record(4, tensors=[inf_grad, nan_weight]), skipped=True)
    _, finding = rule.update({}, with_weight)
    assert finding.firing and finding.tensors == ("fc.weight",)
    with_loss = dataclasses.replace(
        make_record(5, tensors=[inf_grad], scalars={"loss": math.inf}), skipped=True
    )
    _, finding = rule.update({}, with_loss)
    assert finding.firing and finding.tensors == ("loss",)


def test_decoded_records_give_the_same_findings_as_their_tensors_in_a_plain_tuple() -> None:
    """Through the wire a record of finite statistics is marked `finite` (the rule then skips its
    per-tensor checks); one with a NaN or inf statistic, or a NaN/inf count, is not. Either way
    the findings, skipped steps and non-finite scalars included, equal those of the same record
    with its tensors in a plain tuple (the full check)."""
    import dataclasses

    from tensorpulse import wire

    names = ["layer0.weight", "gradient/layer0.weight", "relu_output", "layer1.bias"]
    colls = ["weights", "gradients", "activations", "biases"]
    cases = {  # (a float statistic to set: (row, column, value), NaN/inf counts by row, skipped, loss)
        "finite": (None, None, False, 0.5),
        "nan min": ((1, 2, math.nan), None, False, 0.5),
        "inf max": ((3, 3, math.inf), None, False, 0.5),
        "nan count": (None, np.array([0, 4, 0, 0]), False, 0.5),
        "zero counts": (None, np.array([0, 0, 0, 0]), False, 0.5),
        "skipped nan gradient": ((1, 0, math.nan), None, True, 0.5),
        "skipped, nan loss": (None, None, True, math.nan),
        "nan loss": (None, None, False, math.nan),
    }
    finite_flags = {}
    for label, (cell, nan, skipped, loss) in cases.items():
        floats = np.tile(np.array([0.1, 1.0, -2.0, 2.0, 0.5], dtype=np.float32), (4, 1))
        if cell is not None:
            floats[cell[0], cell[1]] = cell[2]
        block = wire.TensorBlock(names, colls, np.full(4, 100), floats, np.zeros(4, dtype=np.int64), nan=nan)
        payload = wire.encode(
            job="j", rank=0, world=1, step=3, mode="train", ts=1.0, scalars={"loss": loss}, tensors=block,
            skipped=skipped,
        )
        decoded = wire.decode(payload, wire.SchemaCache())
        finite_flags[label] = decoded.tensors.finite
        plain = dataclasses.replace(decoded, tensors=tuple(decoded.tensors))
        for params in ({}, {"only_nan": True}):
            rule = ExplodingTensor(**params)
            assert repr(rule.update(rule.initialize(), decoded)) == repr(rule.update(rule.initialize(), plain)), label
    assert finite_flags == {
        "finite": True,
        "nan min": False,
        "inf max": False,
        "nan count": False,
        "zero counts": True,
        "skipped nan gradient": False,
        "skipped, nan loss": True,
        "nan loss": True,
    }
