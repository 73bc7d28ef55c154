"""TorchHook with mixed precision: steps a GradScaler skips are marked skipped, gradients unscaled."""

from __future__ import annotations

import pytest

from tensorpulse import wire
from tensorpulse.rules import ExplodingTensor
from tensorpulse.rules.testing import replay

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402

STEPS = 8
INF_GRADS_AT = {2, 5}  # steps whose gradients get an inf: the scaler skips them


def _run(order: str, offload: bool, dtype: torch.dtype, nan_weight_at: int | None = None):
    """STEPS autocast steps with a GradScaler enabled on the CPU; returns (records, the l2 norm of
    fc1.weight's unscaled gradient at each step, the steps the optimizer applied)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    applied: list[int] = []
    step_of = {"now": -1}
    opt.register_step_post_hook(lambda *_: applied.append(step_of["now"]))
    sent: list[bytes] = []
    hook = TorchHook("amp", produce_fn=lambda t, v, k: sent.append(v), offload=offload)
    hook.attach(model, opt, scaler=scaler)
    true_l2: dict[int, float] = {}
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        step_of["now"] = step
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        if step == nan_weight_at:
            # With offloading the hook reads the weights in the background until the optimizer's
            # next step; after a skipped step that is later, so a write outside the optimizer
            # first lets the reading finish (publish() waits for it), or it races with it.
            hook.publish()
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if step in INF_GRADS_AT:
            model[2].weight.grad[0, 0] = float("inf")  # an overflow, as fp16 gradients have
        scaler.unscale_(opt)  # gradients unscaled in place: what the hook reports
        true_l2[step] = float(model[0].weight.grad.norm())
        if order == "before":
            hook.step(step, loss=loss)
        scaler.step(opt)
        scaler.update()
        if order == "after":
            hook.step(step, loss=loss)
        opt.zero_grad()
    hook.close()
    assert hook.stats()["errors"] == 0
    schemas = wire.SchemaCache()
    records = [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"]
    return records, true_l2, applied


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("order", ["before", "after"])
def test_steps_the_scaler_skips_are_marked_and_raise_no_alert(order: str, offload: bool, dtype: torch.dtype) -> None:
    """Injected inf gradients: those steps are skipped by the scaler, marked so, and ExplodingTensor stays quiet."""
    records, true_l2, applied = _run(order, offload, dtype)
    assert sorted(set(range(STEPS)) - set(applied)) == sorted(INF_GRADS_AT)  # the scaler did skip them
    assert [r.step for r in records] == list(range(STEPS))  # one record per step, none split
    assert {r.step for r in records if r.skipped} == INF_GRADS_AT
    bad = [r for r in records if r.step in INF_GRADS_AT]
    assert all(t.inf > 0 for r in bad for t in r.tensors if t.name == "gradient/2.weight")
    _, findings = replay(ExplodingTensor(), records)
    assert not any(f.firing for _, f in findings)
    for r in records:  # reported unscaled: the gradient as it is after scaler.unscale_
        l2 = next(t.l2 for t in r.tensors if t.name == "gradient/0.weight")
        assert l2 == pytest.approx(true_l2[r.step], rel=1e-4)


@pytest.mark.parametrize("offload", [False, True])
def test_a_nan_weight_still_fires_on_skipped_steps(offload: bool) -> None:
    """A NaN written into a weight makes every later step skipped, and still raises ExplodingTensor."""
    records, _, _ = _run("before", offload, torch.bfloat16, nan_weight_at=6)
    assert {r.step for r in records if r.skipped} == INF_GRADS_AT | {6, 7}
    _, findings = replay(ExplodingTensor(), records)
    firing = [(step, f) for step, f in findings if f.firing]
    assert firing and firing[0][0] == 6 and "0.weight" in firing[0][1].tensors


def test_a_scaler_without_an_optimizer_is_rejected() -> None:
    """The hook tells skipped steps by the optimizer's step hooks: a scaler needs the optimizer."""
    from tensorpulse.errors import ConfigError

    hook = TorchHook("amp", produce_fn=lambda *a: None)
    with pytest.raises(ConfigError, match="scaler"):
        hook.attach(nn.Linear(2, 2), None, scaler=torch.amp.GradScaler("cpu"))
    hook.close()
