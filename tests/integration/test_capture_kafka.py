"""Labels, inputs, weight deltas and the XGBoost callback through the real broker, decoded as they arrive."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.topics import reductions_topic

from .helpers import read_topic, wait_for

torch = pytest.importorskip("torch")
xgb = pytest.importorskip("xgboost")
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402
from tensorpulse.producers.xgboost import TensorpulseCallback  # noqa: E402

pytestmark = pytest.mark.integration


def records(bootstrap: str, job: str) -> list[wire.StepRecord]:
    """Every record of the job's reductions topic once its end record has arrived, decoded in order."""

    def complete():
        msgs = read_topic(bootstrap, reductions_topic(job), timeout=0.5)
        cache = wire.SchemaCache()
        recs = [wire.decode(m.value(), cache) for m in msgs]
        return recs if recs and recs[-1].kind == "end" else None

    return [r for r in wait_for(complete, 30, f"the end record of {job}") if r.kind == "step"]


def test_torch_labels_inputs_and_deltas_through_kafka(kafka_bootstrap: str, unique: str):
    """A tiny CNN with labels and auto-captured inputs: every saved step arrives with cls, img, deltas and tanh activity."""
    job = f"capture-torch-{unique}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook(job, kafka_bootstrap, save_interval=2, delta_every=1).attach(model, opt, capture_inputs=True)
    sent = {}
    for step in range(6):
        x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
        out = model(x)
        hook.record_labels(y, out)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook.step(step, loss=loss)
        sent[step] = (x.numpy().astype(np.float64), y.numpy(), out.argmax(1).numpy())
    hook.close(10)
    recs = records(kafka_bootstrap, job)
    assert [r.step for r in recs] == [0, 2, 4]
    for r in recs:
        x, y, pred = sent[r.step]
        np.testing.assert_allclose(r.images["inputs"].sums, x.sum(axis=(0, 2, 3)), rtol=1e-5)
        cls = r.classes["labels"]
        assert cls.labels == tuple(np.bincount(y, minlength=3).tolist())
        assert cls.correct() == tuple(int(((y == c) & (pred == c)).sum()) for c in range(3))
        tanh_in = {t.name: t for t in r.tensors}["1/Tanh_input"]
        assert tanh_in.collection == "activations" and tanh_in.activity[0] == 4
    later = {t.name: t.delta for t in recs[1].tensors if t.delta is not None}
    assert sorted(later) == ["0.weight", "3.weight"] and all(d.prev_step == 0 for d in later.values())
    # the default sketched deltas (wire `ds`): an estimate, no allclose excess, no tolerance
    assert all(not d.exact and d.update_l2 > 0 for d in later.values()) and recs[1].tolerance is None


def test_xgboost_callback_through_kafka(kafka_bootstrap: str, unique: str):
    """A tiny XGBoost training publishes one record per round with metrics, max node id and importances."""
    job = f"capture-xgb-{unique}"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = (x[:, 0] - x[:, 2] > 0).astype(int)
    dtrain = xgb.DMatrix(x, label=y, feature_names=["a", "b", "c", "d"])
    history: dict = {}
    xgb.train(
        {"objective": "binary:logistic", "max_depth": 2, "eval_metric": "logloss"},
        dtrain,
        4,
        evals=[(dtrain, "train")],
        evals_result=history,
        callbacks=[TensorpulseCallback(job, kafka_bootstrap)],
        verbose_eval=False,
    )
    recs = records(kafka_bootstrap, job)
    assert [r.step for r in recs] == [0, 1, 2, 3]
    assert [r.scalars["loss"] for r in recs] == pytest.approx(history["train"]["logloss"])
    assert all(r.scalars["xgboost/max_node_id"] >= 1 for r in recs)
    gain = recs[-1].vectors["feature_importance/gain"]
    assert gain.labels == ("a", "b", "c", "d") and all(v >= 0 for v in gain.values) and max(gain.values) > 0
