"""Offloaded reductions give the same records as reductions on the training thread."""

from __future__ import annotations

import copy

import pytest

from tensorpulse import wire

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402


def _run(offload: bool, order: str, set_to_none: bool, model: nn.Module) -> list[wire.StepRecord]:
    sent: list[bytes] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("off", produce_fn=lambda t, v, k: sent.append(v), offload=offload, delta_every=1)
    hook.attach(model, opt)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        x, y = torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if order == "before":
            hook.step(step, loss=loss)
        opt.step()
        if order == "after":
            hook.step(step, loss=loss)
    hook.close()
    schemas = wire.SchemaCache()
    return [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"]


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_offloaded_statistics_equal_inline_ones(order: str, set_to_none: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    inline = _run(False, order, set_to_none, copy.deepcopy(model))
    offloaded = _run(True, order, set_to_none, copy.deepcopy(model))
    assert [r.step for r in offloaded] == list(range(12))
    for a, b in zip(inline, offloaded, strict=True):
        assert a.scalars == b.scalars
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for ta, tb in zip(a.tensors, b.tensors, strict=True):
            assert (ta.n, ta.mean, ta.std, ta.min, ta.max, ta.zeros) == (tb.n, tb.mean, tb.std, tb.min, tb.max, tb.zeros)
            assert ta.delta == tb.delta


def test_offload_argument_is_checked() -> None:
    from tensorpulse.errors import ConfigError

    with pytest.raises(ConfigError, match="offload"):
        TorchHook("off", produce_fn=lambda *a: None, offload="sometimes")


def test_a_tensor_changed_while_reduced_in_the_background_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    from tensorpulse.producers.torch import _version

    hook = TorchHook("off", produce_fn=lambda *a: None, offload=True)
    g = torch.ones(4)
    before = _version(g)
    hook._check_unchanged(g, before)
    assert "changed in place" not in caplog.text
    g.mul_(0.5)  # e.g. gradient clipping after step()
    hook._check_unchanged(g, before)
    assert "changed in place" in caplog.text
    hook.close()


def test_weights_are_read_between_optimizer_steps_in_the_background() -> None:
    """With an optimizer, the weights' reduction starts after its step, off the training thread."""
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("off", produce_fn=lambda *a: None, offload=True).attach(model, opt)
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        hook.step(step)
        opt.step()
        assert hook._weights is not None and hook._weights.generation == step + 1 and not hook._weights.taken
    hook.close()
