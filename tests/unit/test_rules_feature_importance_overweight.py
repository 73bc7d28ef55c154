"""FeatureImportanceOverweight: share of the nfeatures largest importances in the total."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import FeatureImportanceOverweight
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import StepRecord, Vector

GAIN = "feature_importance/gain"


def gain(*values: float, labels: tuple[str, ...] | None = None) -> dict[str, Vector]:
    return {GAIN: Vector(tuple(values), labels)}


@pytest.mark.parametrize(
    ("values", "params", "expected", "value", "tensors"),
    [
        ((5, 3, 2, 10), {}, True, 18 / 20, ("f3", "f0", "f1")),
        ((4, 4, 4, 4, 4), {}, False, 0.6, ()),
        ((4, 2, 2, 1, 1), {}, False, 0.8, ()),  # exactly the threshold does not fire
        ((8, 1, 0, 1), {"nfeatures": 1}, False, 0.8, ()),
        ((9, 1, 0, 0), {"nfeatures": 1}, True, 0.9, ("f0",)),
        ((1, 1, 1, 1), {"nfeatures": 2, "threshold": 0.4}, True, 0.5, ("f0", "f1")),  # ties by position
        ((5, float("nan"), 3, 2, 10), {}, True, 18 / 20, ("f4", "f0", "f2")),  # NaN is left out
    ],
)
def test_share_table(values: tuple, params: dict, expected: bool, value: float, tensors: tuple) -> None:
    """Fires when the top-nfeatures share of the total importance exceeds the threshold."""
    finding = FeatureImportanceOverweight(**params).update({}, make_record(0, vectors=gain(*values)))[1]
    assert (finding.firing, finding.value, finding.tensors) == (expected, pytest.approx(value), tensors)
    assert finding.threshold == params.get("threshold", 0.8)


@pytest.mark.parametrize(
    "values", [(), (5.0,), (5.0, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0), (1.0, -2.0, 3.0, -1.0)]
)
def test_not_judged_with_nfeatures_or_fewer(values: tuple) -> None:
    """With at most nfeatures usable values (or a zero total) the share is 1 by construction: None."""
    assert FeatureImportanceOverweight().update({}, make_record(0, vectors=gain(*values))) == ({}, None)


def test_labels_name_the_features() -> None:
    """Finding.tensors are the feature labels, and the message names the vector and the features."""
    vec = gain(0.5, 30.0, 1.0, 2.0, 40.0, labels=("age", "income", "zip", "height", "score"))
    finding = FeatureImportanceOverweight().update({}, make_record(9, vectors=vec))[1]
    assert finding.tensors == ("score", "income", "height")
    assert "feature_importance/gain at step 9: the top 3 features (score, income, height) hold 98.0%" in (
        finding.message
    )


def test_vector_selection() -> None:
    """tensor_regex (re.search) picks vectors; the default reads gain, not total_gain or weight."""
    record = make_record(
        0,
        vectors={
            GAIN: Vector((1.0, 1.0, 1.0, 1.0, 1.0)),
            "feature_importance/total_gain": Vector((100.0, 1.0, 1.0, 1.0, 1.0)),
            "feature_importance/weight": Vector((50.0, 1.0, 1.0, 1.0, 1.0)),
        },
    )
    assert FeatureImportanceOverweight().update({}, record)[1].firing is False
    finding = FeatureImportanceOverweight(tensor_regex="feature_importance/").update({}, record)[1]
    assert finding.firing and finding.value == pytest.approx(102 / 104)  # the worst vector is reported
    assert finding.message.startswith("feature_importance/total_gain")
    assert FeatureImportanceOverweight(tensor_regex="shap").update({}, record) == ({}, None)


@pytest.mark.parametrize("params", [{"threshold": 1.5}, {"nfeatures": 0}, {"tensor_regex": "("}])
def test_invalid_params(params: dict) -> None:
    """Out-of-range values and bad regexes are ConfigErrors."""
    with pytest.raises(ConfigError):
        FeatureImportanceOverweight(**params)


def _stream(steps: int, seed: int = 0) -> list[StepRecord]:
    """Importances over 8 features that concentrate on 2 features as boosting goes on."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        n = 2 + s % 9  # features used so far (get_score leaves out unused ones)
        values = rng.random(n) * np.r_[1 + s / 5, 1 + s / 10, np.ones(n - 2)]
        out.append(make_record(s, vectors=gain(*values.tolist(), labels=tuple(f"x{i}" for i in range(n)))))
    return out


@pytest.mark.parametrize("params", [{}, {"nfeatures": 2, "threshold": 0.7}])
def test_matches_batch_reference(params: dict) -> None:
    """Findings equal numpy: sorted values, top-n sum over total, for vectors with more than n values."""
    records = _stream(200)
    rule = FeatureImportanceOverweight(**params)
    n, threshold = rule.params.nfeatures, rule.params.threshold
    expected = []
    for r in records:
        v = np.array(r.vectors[GAIN].values)
        if v.size <= n:
            continue
        order = np.argsort(-v, kind="stable")[:n]
        share = v[order].sum() / v.sum()
        tensors = tuple(r.vectors[GAIN].labels[i] for i in order) if share > threshold else ()
        expected.append((r.step, bool(share > threshold), share, tensors))
    got = [(s, f.firing, f.value, f.tensors) for s, f in replay(rule, records)[1]]
    assert [(g[0], g[1], g[3]) for g in got] == [(e[0], e[1], e[3]) for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected])
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip_and_flat() -> None:
    """Stateless: a JSON round trip changes nothing, and the state is {} at 1k and 100k steps."""
    rule = FeatureImportanceOverweight()
    records = _stream(60, seed=2)
    assert repr(replay(rule, records, roundtrip_every=2)[1]) == repr(replay(rule, records)[1])
    vec = gain(5.0, 3.0, 2.0, 10.0)
    state = rule.initialize()
    for s in range(100_000):
        state, _ = rule.update(state, make_record(s, vectors=vec))
        if s + 1 == 1_000:
            at_1k = state_size(state)
    assert state_size(state) == at_1k == 2
