"""The XGBoost callback on a small real training, publishing through the Hook's in-memory test seam."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest

from tensorpulse.producers import Hook

xgb = pytest.importorskip("xgboost")
from memory_sink import MemorySink  # noqa: E402

from tensorpulse.producers.xgboost import IMPORTANCE_TYPES, TensorpulseCallback  # noqa: E402

FEATURES = ["f_a", "f_b", "f_c", "f_d", "f_e"]


def data(seed: int = 0) -> tuple[xgb.DMatrix, xgb.DMatrix]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 5))
    y = x[:, 0] * 2 + x[:, 1] - x[:, 3] * 0.5 + rng.normal(0, 0.1, 400)
    return (
        xgb.DMatrix(x[:300], label=y[:300], feature_names=FEATURES),
        xgb.DMatrix(x[300:], label=y[300:], feature_names=FEATURES),
    )


def max_node(booster) -> int:
    """Largest node id, by walking the parsed JSON trees (independent of the callback's regex)."""

    def walk(node) -> int:
        return max([node["nodeid"], *(walk(c) for c in node.get("children", ()))])

    return max(walk(json.loads(t)) for t in booster.get_dump(dump_format="json"))


def test_callback_publishes_metrics_tree_size_and_importances_per_round():
    """Each round: eval metrics, "loss" (first set, last metric), max node id and raw importances by feature."""
    dtrain, dval = data()
    sink = MemorySink()
    cb = TensorpulseCallback("xgb-unit", produce_fn=sink)
    history: dict = {}
    rounds = 6
    booster = xgb.train(
        {"max_depth": 3, "eta": 0.3, "eval_metric": ["mae", "rmse"]},
        dtrain,
        rounds,
        evals=[(dtrain, "train"), (dval, "eval")],
        evals_result=history,
        callbacks=[cb],
        verbose_eval=False,
    )
    assert not cb.hook.enabled  # the callback created the hook, so it closed it
    recs = sink.records()
    assert [r.step for r in recs] == list(range(rounds))
    for r in recs:
        s = r.step
        assert r.mode == "train"
        for data_name, metrics in history.items():
            for metric, values in metrics.items():
                assert r.scalars[f"{data_name}-{metric}"] == pytest.approx(values[s])
        assert r.scalars["loss"] == pytest.approx(history["train"]["rmse"][s])
        sofar = booster[: s + 1]
        assert r.scalars["xgboost/max_node_id"] == max_node(sofar)
        assert set(r.vectors) == {f"feature_importance/{t}" for t in IMPORTANCE_TYPES}
        for t in IMPORTANCE_TYPES:
            want = sofar.get_score(importance_type=t)
            vec = r.vectors[f"feature_importance/{t}"]
            assert vec.labels == tuple(booster.feature_names)  # every feature, unused ones as 0
            np.testing.assert_allclose(
                vec.values, [want.get(n, 0.0) for n in booster.feature_names], rtol=1e-6
            )
    assert recs[-1].scalars["xgboost/max_node_id"] >= 7  # depth-3 trees: the value is not trivial


def test_callback_uses_a_given_hook_schedule_and_importance_interval():
    """With a caller's Hook: its save schedule picks rounds, importances every n saved rounds, hook left open."""
    dtrain, dval = data(1)
    sink = MemorySink()
    hook = Hook("xgb-given", produce_fn=sink, save_interval=2)
    cb = TensorpulseCallback(hook, importance_types=("gain",), importance_every=2)
    booster = xgb.train(
        {"max_depth": 2}, dtrain, 7, evals=[(dval, "val")], callbacks=[cb], verbose_eval=False
    )
    assert hook.enabled
    hook.close(2)
    recs = sink.records()
    assert [r.step for r in recs] == [0, 2, 4, 6]
    assert [bool(r.vectors) for r in recs] == [True, False, True, False]
    assert set(recs[0].vectors) == {"feature_importance/gain"}
    assert recs[2].scalars["loss"] == recs[2].scalars["val-rmse"]
    # the max node id still covers the trees of the rounds that were not saved
    assert recs[-1].scalars["xgboost/max_node_id"] == max_node(booster)


def test_stop_action_ends_training(monkeypatch):
    """When a rule asked the job to stop, the callback returns True and xgboost stops after that round."""
    dtrain, _ = data(2)
    sink = MemorySink()
    monkeypatch.setattr(Hook, "should_stop", property(lambda self: True))
    cb = TensorpulseCallback("xgb-stop", produce_fn=sink)
    booster = xgb.train(
        {"max_depth": 2}, dtrain, 10, evals=[(dtrain, "train")], callbacks=[cb], verbose_eval=False
    )
    assert booster.num_boosted_rounds() == 1
    assert [r.step for r in sink.records()] == [0]


def test_bad_arguments_and_missing_xgboost(monkeypatch):
    """Unknown importance types and mixed hook arguments are refused; without xgboost the import says what to install."""
    with pytest.raises(ValueError, match="importance"):
        TensorpulseCallback("xgb-bad", produce_fn=MemorySink(), importance_types=("split",))
    hook = Hook("xgb-bad2", produce_fn=MemorySink())
    with pytest.raises(ValueError, match="either a Hook"):
        TensorpulseCallback(hook, "127.0.0.1:9092")
    hook.close(1)
    monkeypatch.setitem(sys.modules, "xgboost", None)
    monkeypatch.setitem(sys.modules, "xgboost.callback", None)
    monkeypatch.delitem(sys.modules, "tensorpulse.producers.xgboost")
    with pytest.raises(ImportError, match="pip install"):
        importlib.import_module("tensorpulse.producers.xgboost")
