"""Small real PyTorch trainings, each with one known fault (or none), instrumented with TorchHook.

Each scenario trains on CPU in a few seconds and names the rules that must fire. The worker runs
the default rule set plus `scenario_rules.yaml` (next to this file), whose opt-in rules and
tighter parameters are scoped to the scenario they are built for by a `jobs:` regex on the job
id's suffix (`-<scenario name>`). The same runs back the end-to-end test and can be run by
hand:  python -m tests.integration.scenarios HOST:PORT  (with `tensorpulse stream --rules
tests/integration/scenario_rules.yaml` running).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorpulse.producers.torch import TorchHook

#: The rules file the scenario worker runs (defaults plus opt-in rules scoped per scenario).
RULES_FILE = Path(__file__).with_name("scenario_rules.yaml")

#: StalledTrainingRule's threshold in RULES_FILE (seconds) and how long the stall scenario pauses.
STALL_THRESHOLD = 3.0
STALL_PAUSE = 7.0
#: The last train step the stall scenario publishes before it pauses.
STALL_STEP = 19
#: The step at which the second of two identically seeded runs gets a corrupted batch.
DIVERGE_STEP = 30


@dataclass(frozen=True)
class Scenario:
    """A training with one known fault: `expected` rules must fire (the healthy run: none may fire).

    `at_step`: rule -> a step at which that rule must have fired (a fault injected at a known
    step). `at_end`: rules that must still be firing when the run ends (where an untrained model
    fires them too, early on, and only the fault keeps them firing). `says`: rule -> text its
    firing alert's message must contain (which of the rule's conditions fired). A scenario with
    no expectations (a partner run) is only run. `world`: the number of ranks; `run` gets one
    hook per rank (rank 0 first), all of the same job.
    """

    name: str
    expected: frozenset[str]
    run: Callable[..., None]
    at_step: Mapping[str, int] = field(default_factory=dict)
    at_end: frozenset[str] = frozenset()
    says: Mapping[str, str] = field(default_factory=dict)
    world: int = 1


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


Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


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
    data: Data | None = None,
    attach: Mapping[str, Any] | None = None,
    labels: bool = False,
    target: Callable[[torch.Tensor], torch.Tensor] | None = None,
    corrupt: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """SGD on a synthetic classification set, with the hook's step and an eval loss every `eval_every`.

    `data`: (x, y, x_val, y_val) instead of the default teacher set; `attach`: extra keyword
    arguments of hook.attach; `labels`: record_labels(true labels, logits) on every step;
    `target`: what the loss is computed against (a label-mapping bug); `corrupt(step, batch)`:
    the batch the model sees at a step (a data-loader bug).
    """
    torch.manual_seed(0)
    if data is None:
        x, y = _data(train_n, 1, noise_labels=noise_labels)
        xv, yv = _data(1024, 2)
    else:
        x, y, xv, yv = data
    train_n = len(x)
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=lr, momentum=momentum)
    hook.attach(model, opt, **(attach or {}))
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        if on_step:
            on_step(step, opt)
        model.train()
        idx = torch.randint(0, train_n, (min(batch, train_n),), generator=g)
        xb, yb = x[idx], y[idx]
        if corrupt is not None:
            xb = corrupt(step, xb)
        opt.zero_grad()
        logits = model(xb)
        loss = loss_fn(logits, yb if target is None else target(yb))
        loss.backward()
        opt.step()
        if labels:
            hook.record_labels(yb, logits.detach())
        hook.step(step, loss=loss)
        if (step + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                vloss = loss_fn(model(xv), yv if target is None else target(yv))
            hook.record_scalars(step, {"loss": vloss}, mode="eval")
            hook.publish()


# --------------------------------------------------------------------------- the original faults


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
    """A bug: the first layer is left out of the optimizer while it still gets gradients. (A layer
    frozen on purpose, requires_grad off, gets no gradient and is not judged: tests/heldout.py.)"""
    torch.manual_seed(0)
    model = _mlp()
    _train(hook, model, steps=40, lr=0.05, params=list(model[1:].parameters()))


# --------------------------------------------------------------------------- catalogue, continued


def saturated_tanh(hook: TorchHook) -> None:
    """Raw features with a large offset (e.g. a year or a price) fed unscaled to a tanh net: the
    first layer's pre-activations sit outside (-9.5, 9.5) on every sample for most (~70 %) of its units."""
    torch.manual_seed(0)
    x, y = _data(4096, 1)
    xv, yv = _data(1024, 2)
    raw = (x * 10.0 + 100.0, y, xv * 10.0 + 100.0, yv)
    _train(hook, _mlp(act=nn.Tanh), steps=30, lr=0.01, data=raw)


def lr_jump(hook: TorchHook) -> None:
    """A warm-up schedule bug: the learning rate jumps from 0.05 to 50 at step 5. The tanh net stays
    finite (nothing for ExplodingTensor), but the next updates are hundreds of times the weights."""
    torch.manual_seed(0)

    def jump(step: int, opt: torch.optim.Optimizer) -> None:
        if step == 5:
            for group in opt.param_groups:
                group["lr"] *= 1000.0

    _train(hook, _mlp(act=nn.Tanh), steps=20, lr=0.05, on_step=jump)


def growing_weights(hook: TorchHook) -> None:
    """A weight-decay sign bug: every optimizer step multiplies the weights by 1.25 instead of
    shrinking them, so their variance grows without bound (TensorVariance, max_threshold 1)."""
    torch.manual_seed(0)
    model = _mlp()

    def grow(step: int, opt: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(1.25)

    _train(hook, model, steps=20, lr=0.01, on_step=grow)


def zeroed_layer(hook: TorchHook) -> None:
    """A pruning mask that masks everything: after every optimizer step, layer 2's weights are
    set to zero, so that layer's weights and the first layer's gradients are all zeros."""
    torch.manual_seed(0)
    model = _mlp()

    def prune(step: int, opt: torch.optim.Optimizer) -> None:
        if step == 0:
            opt.register_step_post_hook(lambda *_: model[2].weight.data.zero_())
            model[2].weight.data.zero_()

    _train(hook, model, steps=30, lr=0.05, on_step=prune)


def memorised_set(hook: TorchHook) -> None:
    """A large net on 64 noisy samples: validation loss stops improving after a few evaluations
    while training goes on (Overtraining with patience_validation 4)."""
    torch.manual_seed(0)
    _train(
        hook,
        _mlp(hidden=256),
        steps=300,
        lr=0.1,
        momentum=0.9,
        batch=64,
        train_n=64,
        noise_labels=0.5,
        eval_every=10,
    )


def imbalanced_labels(hook: TorchHook) -> None:
    """98 % of the labels are class 0; the labels and logits are recorded every step."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 20, generator=g)
    y = torch.zeros(4096, dtype=torch.long)
    rare = torch.rand(4096, generator=g) < 0.02
    y[rare] = torch.randint(1, 4, (int(rare.sum()),), generator=g)
    x[:, :4] += 2.0 * nn.functional.one_hot(y, 4).float()
    xv, yv = _data(1024, 2)
    _train(hook, _mlp(), steps=40, lr=0.05, data=(x, y, xv, yv), labels=True)


def swapped_labels(hook: TorchHook) -> None:
    """A label-mapping bug: the loss sees classes 1 and 2 swapped while the true labels are what
    the job records, so the classifier systematically predicts 2 for 1 and 1 for 2."""
    torch.manual_seed(0)
    swap = torch.tensor([0, 2, 1, 3])
    _train(hook, _mlp(), steps=120, lr=0.05, momentum=0.9, labels=True, target=lambda y: swap[y])


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 3x8x8 images with pixel values 0..255 (not scaled) whose label is the brightest channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g).float()
    y = x.mean(dim=(2, 3)).argmax(dim=1)
    return x, y


def raw_pixels(hook: TorchHook) -> None:
    """Images fed as raw 0-255 pixel values (no normalisation) to a tiny conv net; the hook
    summarises the model's input on every step (capture_inputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    x, y = _images(1024, 1)
    xv, yv = _images(256, 2)
    _train(
        hook,
        model,
        steps=20,
        lr=1e-5,
        batch=32,
        data=(x, y, xv, yv),
        attach={"capture_inputs": {"name": "images", "kind": "images"}},
    )


class _BagOfTokens(nn.Module):
    """Embedding -> mean over the sequence -> linear: the smallest token classifier."""

    def __init__(self, vocab: int = 100, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.out = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids).mean(dim=1))


def _tokens(n: int, seed: int, length: int = 64, padded: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of token ids 1..99 whose last `padded` share is padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    ids[:, int(length * (1 - padded)) :] = 0
    y = ids[:, 0] % 4
    return ids, y


def padded_sequences(hook: TorchHook) -> None:
    """Sequences padded to a fixed length 5x the real text: 80 % of the tokens are padding."""
    torch.manual_seed(0)
    x, y = _tokens(1024, 1)
    xv, yv = _tokens(256, 2)
    _train(
        hook,
        _BagOfTokens(),
        steps=20,
        lr=0.1,
        batch=32,
        data=(x, y, xv, yv),
        attach={"capture_inputs": {"name": "tokens", "kind": "tokens", "token_values": [0]}},
    )


def lr_drops_to_zero(hook: TorchHook) -> None:
    """A scheduler bug sets the learning rate to 0 at step 40: the validation loss stops moving."""
    torch.manual_seed(0)

    def schedule(step: int, opt: torch.optim.Optimizer) -> None:
        if step == 40:
            for group in opt.param_groups:
                group["lr"] = 0.0

    _train(hook, _mlp(), steps=140, lr=0.05, momentum=0.0, on_step=schedule, eval_every=10)


def stalled(hook: TorchHook) -> None:
    """A job that publishes STALL_STEP + 1 steps, then stops sending (a hung data loader) for
    STALL_PAUSE seconds, then goes on: StalledTrainingRule (threshold STALL_THRESHOLD) fires at the
    last step before the pause and resolves when the job resumes."""
    torch.manual_seed(0)
    model = _mlp()

    def hang(step: int, opt: torch.optim.Optimizer) -> None:
        if step == STALL_STEP + 1:
            hook.flush()
            time.sleep(STALL_PAUSE)  # sleep-ok: the hung data loader is the fault under test, not a wait

    _train(hook, model, steps=STALL_STEP + 11, lr=0.05, on_step=hang, eval_every=1000)


def _seeded_run(hook: TorchHook, *, diverge: bool) -> None:
    """Two identically seeded runs; with `diverge`, the batch of step DIVERGE_STEP is corrupted
    (scaled by 3), so every statistic differs from that step on."""
    torch.manual_seed(0)

    def corrupt(step: int, xb: torch.Tensor) -> torch.Tensor:
        return xb * 3.0 if diverge and step == DIVERGE_STEP else xb

    _train(hook, _mlp(), steps=DIVERGE_STEP + 10, lr=0.05, corrupt=corrupt, eval_every=1000)


def seeded_reference(hook: TorchHook) -> None:
    _seeded_run(hook, diverge=False)


def seeded_diverging(hook: TorchHook) -> None:
    _seeded_run(hook, diverge=True)


def unnormalised_rank(rank0: TorchHook, rank1: TorchHook) -> None:
    """Data-parallel training on two ranks (one process, gradients averaged as an all-reduce
    would) where rank 1's data loader skips normalisation: its inputs are 100x rank 0's, so its
    activations are too, while the shared weights stay identical."""
    torch.manual_seed(0)
    base = _mlp()
    models = [base, copy.deepcopy(base)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    for hook, model, opt in zip((rank0, rank1), models, opts, strict=True):
        hook.attach(model, opt)
    x, y = _data(4096, 1)
    shards = [(x[:2048], y[:2048]), (x[2048:] * 100.0, y[2048:])]
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    for step in range(20):
        idx = torch.randint(0, 2048, (32,), generator=g)
        losses = []
        for model, opt, (xs, ys) in zip(models, opts, shards, strict=True):
            opt.zero_grad()
            loss = loss_fn(model(xs[idx]), ys[idx])
            loss.backward()
            losses.append(loss)
        for pair in zip(*(m.parameters() for m in models), strict=True):
            mean = torch.stack([p.grad for p in pair]).mean(dim=0)
            for p in pair:
                p.grad.copy_(mean)
        for opt in opts:
            opt.step()
        for hook, loss in zip((rank0, rank1), losses, strict=True):
            hook.step(step, loss=loss)


SCENARIOS = [
    Scenario("healthy", frozenset(), healthy),
    Scenario("exploding", frozenset({"ExplodingTensor", "GradientNormHigh"}), exploding_loss),
    Scenario("vanishing", frozenset({"VanishingGradient"}), vanishing_gradients),
    Scenario("deadrelu", frozenset({"DeadRelu"}), dead_relus),
    Scenario("frozenlr", frozenset({"LossNotDecreasing"}), frozen_learning_rate),
    Scenario("overfit", frozenset({"Overfit"}), overfit_tiny_set),
    Scenario("constinit", frozenset({"PoorWeightInitialization"}), constant_init),
    Scenario("frozenlayer", frozenset({"UnchangedTensor"}), frozen_layer),
    Scenario("saturated", frozenset({"SaturatedActivation"}), saturated_tanh),
    Scenario("lrjump", frozenset({"WeightUpdateRatio"}), lr_jump),
    Scenario("variance", frozenset({"TensorVariance"}), growing_weights),
    Scenario("allzero", frozenset({"AllZero"}), zeroed_layer),
    Scenario("overtraining", frozenset({"Overtraining"}), memorised_set),
    Scenario("imbalance", frozenset({"ClassImbalance"}), imbalanced_labels, says={"ClassImbalance": "ratio"}),
    Scenario("confusion", frozenset({"Confusion"}), swapped_labels, at_end=frozenset({"Confusion"})),
    Scenario("rawimages", frozenset({"CheckInputImages"}), raw_pixels),
    Scenario("padding", frozenset({"NLPSequenceRatio"}), padded_sequences),
    Scenario("earlystop", frozenset({"EarlyStopping"}), lr_drops_to_zero),
    Scenario("stall", frozenset({"StalledTraining3s"}), stalled, {"StalledTraining3s": STALL_STEP}),
    # simb's records reach sima's SimilarAcrossRuns (other_trials "-simb$"); its alerts are sima's.
    Scenario("sima", frozenset({"SimilarAcrossRuns"}), seeded_reference, {"SimilarAcrossRuns": DIVERGE_STEP}),
    Scenario("simb", frozenset(), seeded_diverging),
    Scenario(
        "rankdiverge",
        frozenset({"RankDivergence"}),
        unnormalised_rank,
        says={"RankDivergence": "on rank 1 ="},
        world=2,
    ),
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
        ranks = [TorchHook(job, bootstrap, rank=r, world_size=sc.world) for r in range(sc.world)]
        sc.run(*ranks)
        for h in reversed(ranks):  # rank 0's end record last: it marks the job finished
            h.close()
        print(job, "expects", sorted(sc.expected) or "nothing", flush=True)
