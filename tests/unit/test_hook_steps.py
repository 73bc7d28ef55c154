"""The step axis is the optimizer step (gradient accumulation), eval records go out when their
evaluation ends, and a step's scalars recorded early stay in that step's one record."""

from __future__ import annotations

import pytest

from tensorpulse import wire

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from waits import wait_for  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402


def _records(sent: list[bytes]) -> list[wire.StepRecord]:
    schemas = wire.SchemaCache()
    return [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_accumulation_records_one_step_per_optimizer_step(offload: bool) -> None:
    """Four micro-batches per optimizer step: one record per optimizer step, with the accumulated
    gradient and one capture of each activation (the first micro-batch's)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sent: list[bytes] = []
    hook = TorchHook("accum", produce_fn=lambda t, v, k: sent.append(v), offload=offload).attach(model, opt)
    accumulated: dict[int, float] = {}
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        for _ in range(4):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            (nn.functional.cross_entropy(model(x), y) / 4).backward()
        accumulated[step] = float(model[0].weight.grad.norm())
        hook.step(step)
        opt.step()
        opt.zero_grad()
    hook.close()
    records = _records(sent)
    assert [r.step for r in records] == list(range(5))
    for r in records:
        names = [t.name for t in r.tensors]
        assert len(names) == len(set(names))
        assert [n for n in names if "relu_output" in n] == ["1/relu_output"]  # not once per micro-batch
        l2 = next(t.l2 for t in r.tensors if t.name == "gradient/0.weight")
        assert l2 == pytest.approx(accumulated[r.step], rel=1e-5)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("back_to_training", ["model.train()", "next train step"])
def test_a_validation_loss_is_published_when_its_evaluation_ends(offload: bool, back_to_training: str) -> None:
    """record_loss(step, v) in eval mode goes out when training resumes (the first forward pass in
    train mode, or the next train step()), not at the next eval or close()."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sent: list[bytes] = []
    hook = TorchHook("val", produce_fn=lambda t, v, k: sent.append(v), offload=offload).attach(model, opt)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for step in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        hook.step(step)
        opt.step()
        opt.zero_grad()
    if back_to_training == "model.train()":
        model.eval()
    with torch.no_grad():
        val = nn.functional.cross_entropy(model(x), y)
    hook.record_loss(2, val)
    if back_to_training == "model.train()":
        model.train()
        model(x)  # training resumes: its first forward pass sees the switch (model.train is not wrapped)
    else:
        nn.functional.cross_entropy(model(x), y).backward()
        hook.step(3)
    # sent by the publisher thread now, before any flush() or close()
    evals = wait_for(lambda: [r for r in _records(list(sent)) if r.mode == "eval"], 5.0, "the eval record")
    assert [(r.step, r.scalars["loss"]) for r in evals] == [(2, pytest.approx(float(val)))]
    hook.close()


def test_scalars_recorded_before_an_offloaded_step_stay_in_its_one_record() -> None:
    """Scalars of step s recorded before step(s), then a record call for s+1 while step s is still
    being reduced: one record per step, holding both its tensors and its scalars."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sent: list[bytes] = []
    hook = TorchHook("split", produce_fn=lambda t, v, k: sent.append(v), offload=True).attach(model, opt)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    hook.record_scalars(0, {"accuracy": 0.5})
    for step in range(4):
        nn.functional.cross_entropy(model(x), y).backward()
        hook.step(step)  # staged: reduced in the background, with the weights, after opt.step()
        hook.record_scalars(step + 1, {"accuracy": 0.5 + step / 10})  # step+1's, while step is unfinished
        opt.step()
        opt.zero_grad()
    hook.close()
    records = _records(sent)
    assert sorted(r.step for r in records) == [0, 1, 2, 3, 4]
    for r in records[:4]:
        assert "accuracy" in r.scalars and any(t.collection == "gradients" for t in r.tensors)
