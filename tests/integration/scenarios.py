"""Small real PyTorch trainings, each with one known fault (or none), instrumented with TorchHook.

Each scenario trains on CPU in a few seconds and names the rule that must fire. The same runs
back the end-to-end test and can be run by hand:  python -m tests.integration.scenarios HOST:PORT
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tensorpulse.producers.torch import TorchHook


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: frozenset[str]  # rules that must fire (empty: none may fire)
    run: Callable[[TorchHook], None]


def _data(n: int, seed: int, dim: int = 20, classes: int = 4, noise_labels: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.Generator().manual_seed(99)
    w = torch.randn(dim, classes, generator=teacher)
    x = torch.randn(n, dim, generator=g)
    y = (x @ w).argmax(dim=1)
    if noise_labels:
        flip = torch.rand(n, generator=g) < noise_labels
        y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    return x, y


def _mlp(dim: int = 20, hidden: int = 64, classes: int = 4, act: type[nn.Module] = nn.ReLU, depth: int = 2):
    layers: list[nn.Module] = []
    d = dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), act()]
        d = hidden
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def _train(
    hook: TorchHook,
    model: nn.Module,
    *,
    steps: int,
    lr: float,
    batch: int = 64,
    train_n: int = 4096,
    eval_every: int = 20,
    momentum: float = 0.0,
    noise_labels: float = 0.0,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    params=None,
) -> None:
    torch.manual_seed(0)
    x, y = _data(train_n, 1, noise_labels=noise_labels)
    xv, yv = _data(1024, 2)
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=lr, momentum=momentum)
    hook.attach(model, opt)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        if on_step:
            on_step(step, opt)
        model.train()
        idx = torch.randint(0, train_n, (min(batch, train_n),), generator=g)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        hook.step(step, loss=loss)
        if (step + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                vloss = loss_fn(model(xv), yv)
            hook.record_scalars(step, {"loss": vloss}, mode="eval")
            hook.publish()


def healthy(hook: TorchHook) -> None:
    torch.manual_seed(0)
    _train(hook, _mlp(), steps=300, lr=0.02, momentum=0.9)


def exploding_loss(hook: TorchHook) -> None:
    torch.manual_seed(0)

    def boost(step: int, opt: torch.optim.Optimizer) -> None:
        if step == 100:
            for group in opt.param_groups:
                group["lr"] *= 5000.0

    _train(hook, _mlp(), steps=160, lr=0.05, momentum=0.9, on_step=boost)


def vanishing_gradients(hook: TorchHook) -> None:
    torch.manual_seed(0)
    _train(hook, _mlp(act=nn.Sigmoid, depth=20, hidden=32), steps=60, lr=0.05)


def dead_relus(hook: TorchHook) -> None:
    torch.manual_seed(0)
    model = _mlp(depth=3)
    with torch.no_grad():
        for m in list(model)[2:-1]:
            if isinstance(m, nn.Linear):
                m.bias.fill_(-20.0)
    _train(hook, model, steps=60, lr=0.05)


def frozen_learning_rate(hook: TorchHook) -> None:
    torch.manual_seed(0)
    _train(hook, _mlp(), steps=260, lr=0.0)


def overfit_tiny_set(hook: TorchHook) -> None:
    torch.manual_seed(0)
    _train(
        hook,
        _mlp(hidden=256),
        steps=600,
        lr=0.1,
        momentum=0.9,
        batch=32,
        train_n=32,
        noise_labels=0.5,
        eval_every=10,
    )


def constant_init(hook: TorchHook) -> None:
    torch.manual_seed(0)
    model = _mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.05)
    _train(hook, model, steps=40, lr=0.05)


def frozen_layer(hook: TorchHook) -> None:
    torch.manual_seed(0)
    model = _mlp()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    _train(hook, model, steps=40, lr=0.05, params=[p for p in model.parameters() if p.requires_grad])


SCENARIOS = [
    Scenario("healthy", frozenset(), healthy),
    Scenario("exploding", frozenset({"ExplodingTensor"}), exploding_loss),
    Scenario("vanishing", frozenset({"VanishingGradient"}), vanishing_gradients),
    Scenario("deadrelu", frozenset({"DeadRelu"}), dead_relus),
    Scenario("frozenlr", frozenset({"LossNotDecreasing"}), frozen_learning_rate),
    Scenario("overfit", frozenset({"Overfit"}), overfit_tiny_set),
    Scenario("constinit", frozenset({"PoorWeightInitialization"}), constant_init),
    Scenario("frozenlayer", frozenset({"UnchangedTensor"}), frozen_layer),
]


if (
    __name__ == "__main__"
):  # run every scenario against a broker: python -m tests.integration.scenarios HOST:PORT
    import uuid

    bootstrap = sys.argv[1]
    tag = uuid.uuid4().hex[:6]
    torch.set_num_threads(1)
    for sc in SCENARIOS:
        job = f"scen-{tag}-{sc.name}"
        with TorchHook(job, bootstrap) as h:
            sc.run(h)
        print(job, "expects", sorted(sc.expected) or "nothing", flush=True)
