#!/usr/bin/env python
"""The held-out corpus: healthy runs of different shapes and faulty runs, and what the default rules say.

Each run is a small real PyTorch training on the CPU (fixed seeds, a few hundred steps, a few
seconds) instrumented with the real TorchHook, whose records go to a list (`produce_fn`) instead
of Kafka. `evaluate` replays a run's records through the worker's own evaluator
(`tensorpulse.replay.Replay`) with the default rule set, so an alert here is an alert a user
would get. The healthy runs are shaped like the runs that made rules cry wolf (issue 19): a
noisy minibatch loss, a warm-up then cosine decay to a floor well above half the start, a plateau
that then improves, a fine-tuning run, an oscillating loss, frozen layers. None may raise an
alert. The faults reuse the end-to-end scenarios (tests/integration/scenarios.py) and the demo's
dead-ReLU fault; each must raise the rule that names it.

    python tests/heldout.py              # the table per rule (false alarms, faults caught)
    python tests/heldout.py --runs       # the alerts of every run
    python tests/heldout.py --write-docs # refresh the table in docs/rules.md

tests/unit/test_heldout.py runs the same corpus and checks docs/rules.md shows these figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: tests/ holds the scenarios this corpus reuses
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration.scenarios import (  # noqa: E402
    _data,
    _mlp,
    _train,
    dead_relus,
    exploding_loss,
    frozen_learning_rate,
    overfit_tiny_set,
    vanishing_gradients,
)
from memory_sink import MemorySink  # noqa: E402

from tensorpulse.events import AlertEvent  # noqa: E402
from tensorpulse.producers.torch import TorchHook  # noqa: E402
from tensorpulse.replay import Replay  # noqa: E402
from tensorpulse.rules import default_rules  # noqa: E402
from tensorpulse.rules.config import RuleSpec, default_specs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "rules.md"
#: Where the figures live for the rule reference (rules/reference.py renders them into DOCS).
MEASURED = ROOT / "rules" / "measured.py"


@dataclass(frozen=True)
class Run:
    """One training of the corpus: `expected` is the rule that must fire (None: a healthy run, no alert)."""

    name: str
    shape: str
    train: Callable[[TorchHook], None]
    expected: str | None = None


# --------------------------------------------------------------------------- healthy shapes


def noisy_minibatch(hook: TorchHook) -> None:
    """Batches of 8 with 30 % of the labels flipped: the loss jumps by +-50 % from step to step."""
    torch.manual_seed(0)
    _train(hook, _mlp(), steps=400, lr=0.05, batch=8, noise_labels=0.3)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def warmup_cosine(hook: TorchHook) -> None:
    """Linear warm-up over 40 steps to 0.1, then cosine decay to 0.001; 40 % noisy labels put the
    loss floor at about two thirds of the starting loss, where the schedule flattens it out."""
    torch.manual_seed(0)
    steps, warm, peak, floor = 500, 40, 0.1, 0.001

    def schedule(step: int, opt: torch.optim.Optimizer) -> None:
        if step < warm:
            _set_lr(opt, peak * (step + 1) / warm)
        else:
            t = (step - warm) / (steps - warm)
            _set_lr(opt, floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t)))

    _train(hook, _mlp(), steps=steps, lr=peak / warm, momentum=0.9, noise_labels=0.4, on_step=schedule)


def _parity(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """20 features, label = whether the first two have the same sign (XOR): no linear signal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return x, ((x[:, 0] > 0) == (x[:, 1] > 0)).long()


def plateau_then_improves(hook: TorchHook) -> None:
    """XOR of two of 20 features: the loss sits at ln 2 while the net finds the interaction, then falls."""
    torch.manual_seed(0)
    x, y = _parity(4096, 1)
    xv, yv = _parity(1024, 2)
    _train(hook, _mlp(classes=2), steps=400, lr=0.02, momentum=0.9, data=(x, y, xv, yv))


def fine_tuning(hook: TorchHook) -> None:
    """A model trained (without the hook) on one teacher, then fine-tuned at a 20x smaller learning
    rate on a shifted teacher: the loss starts low and moves little, updates are small."""
    torch.manual_seed(0)
    model = _mlp()
    _train(_NullHook(), model, steps=300, lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    shift = 0.5 * torch.randn(20, 4, generator=g)
    teacher = torch.randn(20, 4, generator=torch.Generator().manual_seed(99)) + shift
    x, _ = _data(4096, 11)
    xv, _ = _data(1024, 12)
    _train(
        hook, model, steps=300, lr=0.0025, momentum=0.9,
        data=(x, (x @ teacher).argmax(1), xv, (xv @ teacher).argmax(1)),
    )  # fmt: skip


def oscillating(hook: TorchHook) -> None:
    """A triangular cyclic learning rate (0.01 to 0.6, period 80): the loss swings up at every peak of
    the schedule and down after it, the way adversarial (GAN) losses swing, while trending down."""
    torch.manual_seed(0)

    def cyclic(step: int, opt: torch.optim.Optimizer) -> None:
        phase = (step % 80) / 80
        _set_lr(opt, 0.01 + (0.6 - 0.01) * (1 - abs(2 * phase - 1)))

    _train(hook, _mlp(), steps=400, lr=0.01, on_step=cyclic)


def frozen_layers(hook: TorchHook) -> None:
    """A three-layer net whose first layer is frozen on purpose (requires_grad False, not in the
    optimizer), as when only a head is trained: its weights never change, by design."""
    torch.manual_seed(0)
    model = _mlp(depth=3)
    for p in model[0].parameters():
        p.requires_grad_(False)
    _train(
        hook,
        model,
        steps=300,
        lr=0.05,
        momentum=0.9,
        params=[p for p in model.parameters() if p.requires_grad],
    )


def forgotten_parameters(hook: TorchHook) -> None:
    """A bug: the first layer is left out of the optimizer while it still gets gradients, so it never learns."""
    torch.manual_seed(0)
    model = _mlp(depth=3)
    _train(hook, model, steps=200, lr=0.05, momentum=0.9, params=list(model[2:].parameters()))


class _NullHook:
    """What `_train` needs of a hook, doing nothing (pre-training outside the corpus)."""

    def attach(self, *args: object, **kwargs: object) -> None: ...
    def step(self, *args: object, **kwargs: object) -> None: ...
    def record_scalars(self, *args: object, **kwargs: object) -> None: ...
    def publish(self, *args: object, **kwargs: object) -> None: ...
    def record_labels(self, *args: object, **kwargs: object) -> None: ...


# --------------------------------------------------------------------------- faults


def demo_dead_relu(hook: TorchHook) -> None:
    """`tensorpulse demo --fault dead-relu`: ReLU biases pushed to -50 at step 120 of 300."""
    from tensorpulse.demo import _build_model, _inject
    from tensorpulse.demo import _data as demo_data

    model = _build_model("dead-relu")
    x, y = demo_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook.attach(model, opt)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    for step in range(300):
        if step == 120:
            _inject("dead-relu", model, opt)
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        hook.step(step, loss=loss)


RUNS: tuple[Run, ...] = (
    Run("noisy", "noisy minibatch loss (batch 8, 30 % flipped labels)", noisy_minibatch),
    Run("cosine", "warm-up then cosine decay to a floor at ~2/3 of the start", warmup_cosine),
    Run("plateau", "plateau at ln 2, then improves (XOR)", plateau_then_improves),
    Run("finetune", "fine-tuning a trained model at a small learning rate", fine_tuning),
    Run("oscillating", "oscillating loss (cyclic learning rate)", oscillating),
    Run("frozen", "first layer frozen on purpose", frozen_layers),
    Run("exploding", "learning rate x5000 at step 100 (NaN)", exploding_loss, "ExplodingTensor"),
    Run("vanishing", "20-layer sigmoid net", vanishing_gradients, "VanishingGradient"),
    Run("deadrelu", "ReLU biases at -20", dead_relus, "DeadRelu"),
    Run("demo-deadrelu", "the demo's dead-ReLU fault (biases -50 at step 120)", demo_dead_relu, "DeadRelu"),
    Run("stalled", "learning rate 0: the loss never moves", frozen_learning_rate, "LossNotDecreasing"),
    Run("overfit", "memorising 32 noisy samples", overfit_tiny_set, "Overfit"),
    Run("forgotten", "first layer left out of the optimizer", forgotten_parameters, "UnchangedTensor"),
)


# --------------------------------------------------------------------------- records and alerts


@cache
def payloads(name: str) -> tuple[bytes, ...]:
    """The wire payloads the real TorchHook publishes for run `name` (computed once per process)."""
    run = next(r for r in RUNS if r.name == name)
    sink = MemorySink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on every machine
    try:
        with TorchHook(f"heldout-{name}", produce_fn=sink, offload=False) as hook:
            run.train(hook)
    finally:
        torch.set_num_threads(threads)
    return tuple(sink.payloads)


def evaluate(name: str, specs: Sequence[RuleSpec] | None = None) -> list[AlertEvent]:
    """The alert events (firing and resolved) the worker would raise on run `name`, default rules unless `specs`."""
    r = Replay(f"heldout-{name}", default_specs() if specs is None else specs)
    for p in payloads(name):
        r.feed(p)
    return r.events


def firing(events: Iterable[AlertEvent]) -> Counter[str]:
    """Firing events per rule (a rule that fires, resolves and fires again counts twice)."""
    return Counter(e.rule for e in events if e.status == "firing")


def table(results: dict[str, list[AlertEvent]]) -> list[str]:
    """Markdown rows: per default rule, its alerts on the healthy runs and the faults it must catch."""
    healthy = [r for r in RUNS if r.expected is None]
    rows = [
        f"| Rule | False alarms on {len(healthy)} healthy runs (runs, alerts) | Faults it must catch |",
        "|---|---|---|",
    ]
    for rule in default_rules():
        hits = [firing(results[r.name])[rule.name] for r in healthy]
        runs = sum(1 for h in hits if h)
        faults = [
            f"{r.name}: {'caught' if firing(results[r.name])[rule.name] else 'MISSED'}"
            for r in RUNS
            if r.expected == rule.name
        ]
        rows.append(f"| {rule.name} | {runs}, {sum(hits)} | {'; '.join(faults) or '-'} |")
    return rows


def runs_lines(results: dict[str, list[AlertEvent]]) -> list[str]:
    out = []
    for r in RUNS:
        fired = firing(results[r.name])
        verdict = (
            ("ok" if not fired else "FALSE ALARM")
            if r.expected is None
            else ("caught" if fired[r.expected] else "MISSED")
        )
        detail = ", ".join(f"{k} x{v}" for k, v in sorted(fired.items())) or "no alert"
        out.append(f"{r.name:14s} {verdict:11s} {detail}   ({r.shape})")
    return out


def write_docs(rows: list[str]) -> None:
    """Write the table into rules/measured.py and regenerate docs/rules.md from the registry."""
    body = "".join(f"    {json.dumps(row, ensure_ascii=False)},\n" for row in rows)
    MEASURED.write_text(
        '"""The default rule set on the held-out corpus: generated by python tests/heldout.py --write-docs."""\n\n'
        "#: Markdown rows of the table in docs/rules.md (tests/unit/test_heldout.py checks they are current).\n"
        f"ROWS = [\n{body}]\n"
    )
    import importlib

    from tensorpulse.rules import measured, reference

    importlib.reload(measured)
    importlib.reload(reference)
    DOCS.write_text(reference.render())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", action="store_true", help="print the alerts of every run")
    ap.add_argument("--write-docs", action="store_true", help=f"refresh {MEASURED} and {DOCS}")
    args = ap.parse_args(argv)
    results = {r.name: evaluate(r.name) for r in RUNS}
    if args.runs:
        print("\n".join(runs_lines(results)))
    print("\n".join(table(results)))
    if args.write_docs:
        write_docs(table(results))
    bad = [
        r.name
        for r in RUNS
        if (r.expected is None and firing(results[r.name]))
        or (r.expected and not firing(results[r.name])[r.expected])
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
