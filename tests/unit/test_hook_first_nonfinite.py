"""The first non-finite tensor an alert names is where the NaN appeared, not where it spread to.

A NaN put into one weight, one gradient or one activation spreads within the same step: the
forward pass carries it into the later activations and the loss, the backward pass into every
gradient, the optimizer's step into every weight. The hook records the order in which the
non-finite values of a step appeared (wire `t.nfo`), and ExplodingTensor names the earliest.
"""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.errors import DecodeError
from tensorpulse.rules import ExplodingTensor
from tensorpulse.rules.config import RuleSpec
from tensorpulse.rules.testing import make_record, make_stats
from tensorpulse.stream.evaluator import JobEvaluator

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402

STEPS = 6
BAD_STEP = 3


class Poison(nn.Module):
    """Writes a NaN into its output while `on` (the test's own module: an activation gone bad)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return x
        x = x.clone()
        x[0, 0] = float("nan")
        return x


def _model() -> nn.Sequential:
    """An embedding first, so that a NaN spread backward or by the optimizer reaches it first in record order."""
    return nn.Sequential(
        nn.Embedding(20, 8),  # 0
        nn.Flatten(),  # 1
        nn.Linear(32, 16),  # 2
        nn.ReLU(),  # 3
        nn.Linear(16, 16),  # 4: the poisoned layer
        Poison(),  # 5
        nn.ReLU(),  # 6: its input is the first activation after layer 4
        nn.Linear(16, 4),  # 7
    )


def _run(inject: str, order: str, offload: bool) -> list[wire.StepRecord]:
    """STEPS SGD steps; at BAD_STEP a NaN goes into `inject` ("weight", "gradient", "activation") of
    layer 4; `order`: hook.step() "before" or "after" optimizer.step()."""
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sent: list[bytes] = []
    hook = TorchHook("first-nf", produce_fn=lambda t, v, k: sent.append(v), offload=offload).attach(model, opt)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x, y = torch.randint(0, 20, (5, 4), generator=g), torch.randint(0, 4, (5,), generator=g)
        if step == BAD_STEP and inject == "weight":
            hook.publish()  # a write outside the optimizer waits for the hook's reading (module docstring)
            with torch.no_grad():
                model[4].weight[0, 0] = float("nan")
        model[5].on = step == BAD_STEP and inject == "activation"
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == BAD_STEP and inject == "gradient":
            model[4].weight.grad[0, 0] = float("nan")
        if order == "before":
            hook.step(step, loss=loss)
        opt.step()
        if order == "after":
            hook.step(step, loss=loss)
        opt.zero_grad()
    hook.close()
    assert hook.stats()["errors"] == 0
    schemas = wire.SchemaCache()
    return [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"]


def _first(records: list[wire.StepRecord]) -> tuple[dict, str]:
    """The first firing ExplodingTensor alert's first_nonfinite details and message, as the worker raises it."""
    ev = JobEvaluator([RuleSpec("ExplodingTensor", ExplodingTensor(), None, "critical", "none")])
    state = None
    for r in records:
        state, transitions = ev.process(state, r, now=r.ts + 0.1)
        state = json.loads(json.dumps(state))
        firing = [t.event for t in transitions if t.event.status == "firing"]
        if firing:
            return firing[0].details["first_nonfinite"], firing[0].message
    raise AssertionError("ExplodingTensor never fired")


CONFIGS = [("before", False), ("after", False), ("before", True), ("after", True)]


@pytest.mark.parametrize(("order", "offload"), CONFIGS)
def test_a_nan_gradient_is_named_not_the_weight_it_updated(order: str, offload: bool) -> None:
    """A NaN in one gradient: named itself, though the optimizer wrote it into its weight before the hook read it."""
    first, message = _first(_run("gradient", order, offload))
    assert (first["tensor"], first["step"]) == ("gradient/4.weight", BAD_STEP)
    assert message.endswith(f"first non-finite: rank 0, gradient/4.weight, step {BAD_STEP}")


@pytest.mark.parametrize(("order", "offload"), CONFIGS)
def test_a_nan_activation_is_named_not_the_gradients_it_spread_to(order: str, offload: bool) -> None:
    """A NaN in one activation: the first activation that holds it is named, not the embedding's gradient."""
    first, _ = _first(_run("activation", order, offload))
    assert (first["tensor"], first["step"]) == ("6/relu_input", BAD_STEP)


@pytest.mark.parametrize(("order", "offload"), CONFIGS)
def test_a_nan_weight_is_named_where_the_hook_first_saw_it(order: str, offload: bool) -> None:
    """A NaN written into one weight between steps: the weight itself where the hook read the weights that the
    poisoned forward pass used (step() before the optimizer, on the training thread), else the first activation
    after it; never the embedding, which holds it only after the optimizer has spread it."""
    first, _ = _first(_run("weight", order, offload))
    sees_it = order == "before" and not offload
    want = "4.weight" if sees_it else "6/relu_input"
    assert (first["tensor"], first["step"]) == (want, BAD_STEP)


def test_weights_read_before_the_update_come_before_the_activations() -> None:
    """A weight that was NaN when the forward pass used it precedes the activations it made NaN."""
    records = _run("weight", "before", False)
    bad = next(r for r in records if r.step == BAD_STEP)
    named = [bad.tensors[i].name for i in bad.nonfinite_order]
    assert named[0] == "4.weight"
    assert named.index("6/relu_input") < named.index("gradient/7.weight") < named.index("gradient/0.weight")
    assert all(r.nonfinite_order == () for r in records if r.step < BAD_STEP)  # healthy: nothing sent


def _order_record(order: tuple[int, ...]) -> wire.StepRecord:
    tensors = [
        make_stats("fc1.weight", "weights", [float("nan"), 1.0]),
        make_stats("gradient/fc2.weight", "gradients", [float("nan"), 1.0]),
        make_stats("gradient/fc1.weight", "gradients", [float("nan"), 1.0]),
    ]
    r = make_record(4, tensors=tensors, scalars={"loss": float("nan")})
    return r.__class__(**{**{f: getattr(r, f) for f in r.__slots__}, "nonfinite_order": order})


def test_exploding_tensor_names_the_earliest_in_the_records_order() -> None:
    """With an order, its first tensor is named (message and first non-finite); without, the first in record order."""
    rule = ExplodingTensor()
    state, finding = rule.update(rule.initialize(), _order_record((1, 2, 0)))
    assert finding.firing and "tensor gradient/fc2.weight has" in finding.message
    assert finding.tensors == ("fc1.weight", "gradient/fc2.weight", "gradient/fc1.weight", "loss")  # record order
    assert state["first"]["train"][3] == "gradient/fc2.weight"
    state, finding = rule.update(rule.initialize(), _order_record(()))
    assert state["first"]["train"][3] == "fc1.weight" and "tensor fc1.weight has" in finding.message


def test_the_order_round_trips_and_bad_orders_are_rejected() -> None:
    """`t.nfo` travels only when given; out-of-range or repeated indices are a DecodeError."""
    block = wire.TensorBlock(
        names=["a", "b"],
        collections=["weights", "gradients"],
        n=np.array([2, 2]),
        floats=np.zeros((2, len(wire.FLOAT_COLUMNS)), dtype=np.float32),
        zeros=np.array([0, 0]),
        nan=np.array([1, 1]),
    )
    kw = dict(job="j", rank=0, world=1, step=1, mode="train", ts=1.0)
    assert wire.decode(wire.encode(**kw, tensors=block)).nonfinite_order == ()
    block.nonfinite_order = [1, 0]
    assert wire.decode(wire.encode(**kw, tensors=block)).nonfinite_order == (1, 0)
    raw = msgpack.unpackb(wire.encode(**kw, tensors=block), strict_map_key=False)
    for bad in ([2], [0, 0], [-1], "01", [True], [0.0]):
        raw["t"]["nfo"] = bad
        with pytest.raises(DecodeError, match="nfo"):
            wire.decode(msgpack.packb(raw))
