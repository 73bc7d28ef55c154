"""Helpers to build records for rule tests and back-tests, without a hook or a broker.

`make_stats` computes a tensor's statistics from a numpy array the way the hook defines them
(float64, population std, per-unit activity for activations); `make_record` wraps them in a
StepRecord; `replay` drives a rule like the stream layer, optionally round-tripping its state
through JSON mid-stream. `RuleTester` (rules/tester.py, re-exported here) runs the checks every
rule must pass: batch reference, state round-trip, determinism, fresh starts, bounded state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tensorpulse import statistics
from tensorpulse.wire import (
    ACTIVITY_EDGES,
    ClassCounts,
    ImageSums,
    StepRecord,
    TensorStats,
    TokenCounts,
    Vector,
)

from .base import Finding, Rule, State
from .tester import RuleCheckError, RuleTester, UndeclaredStateWarning, lengthen

#: The per-tensor numbers a record carries for every tensor (n, the float columns, the counts).
_SENT_SCALARS = tuple(s for s in statistics.STATISTICS if s.wire in ("n", "f", "z", "nf"))

__all__ = [
    "RuleCheckError",
    "RuleTester",
    "UndeclaredStateWarning",
    "activity_histogram",
    "lengthen",
    "make_record",
    "make_stats",
    "mlp_run",
    "replay",
    "state_size",
]


def activity_histogram(values: Any) -> tuple[int, ...]:
    """(units, units active (> 0) in fewer than each ACTIVITY_EDGES fraction of samples).

    `values` is (samples, units); a 1-D array is one sample, higher ranks are flattened to
    (samples, units) keeping the last axis as units.
    """
    a = np.asarray(values, dtype=np.float64)
    a = a.reshape(1, -1) if a.ndim < 2 else a.reshape(-1, a.shape[-1])
    units = a.shape[1]
    if a.shape[0] == 0 or units == 0:
        return (units, *([0] * len(ACTIVITY_EDGES)))
    active = (a > 0).mean(axis=0)
    return (units, *(int((active < edge).sum()) for edge in ACTIVITY_EDGES))


def make_stats(name: str, collection: str, values: Any | None = None, **overrides: Any) -> TensorStats:
    """TensorStats of `values` (any array-like); keyword arguments override computed fields.

    With values None every statistic is 0 (n = 0) unless overridden. NaN and inf propagate
    into mean/std/min/max as they do on the device, and are counted in `nan` / `inf`.
    Activity is computed for collection "activations" (values as (samples, units)).
    `quantiles=True` computes (p5, p95) of the finite values.
    """
    fields: dict[str, Any] = {
        "n": 0,
        "mean": 0.0,
        "std": 0.0,
        "min": 0.0,
        "max": 0.0,
        "abs_mean": 0.0,
        "zeros": 0,
        "nan": 0,
        "inf": 0,
        "activity": None,
        "quantiles": None,
    }
    if values is not None:
        a = np.asarray(values, dtype=np.float64)
        flat = a.reshape(-1)
        if flat.size:
            # the declared float64 references (tensorpulse/statistics.py) of what the wire sends
            fields.update({s.name: s.reference(flat) for s in _SENT_SCALARS})
            if collection == "activations":
                fields["activity"] = activity_histogram(a)
            if overrides.get("quantiles") is True:
                finite = flat[np.isfinite(flat)]
                p5, p95 = np.percentile(finite, [5, 95]) if finite.size else (float("nan"),) * 2
                overrides["quantiles"] = (float(p5), float(p95))
    if overrides.get("quantiles") is True:
        overrides["quantiles"] = None
    fields.update(overrides)
    return TensorStats(name=name, collection=collection, **fields)


def make_record(
    step: int,
    *,
    mode: str = "train",
    job: str = "job",
    rank: int = 0,
    scalars: Mapping[str, float] | None = None,
    tensors: Iterable[TensorStats] = (),
    classes: Mapping[str, ClassCounts] | None = None,
    images: Mapping[str, ImageSums] | None = None,
    tokens: Mapping[str, TokenCounts] | None = None,
    vectors: Mapping[str, Vector] | None = None,
) -> StepRecord:
    """A StepRecord of one step (world = rank + 1, ts = step, seq = step), with optional wire blocks."""
    return StepRecord(
        job=job,
        rank=rank,
        world=rank + 1,
        step=step,
        mode=mode,
        ts=float(step),
        seq=step,
        scalars=dict(scalars or {}),
        tensors=tuple(tensors),
        classes=dict(classes or {}),
        images=dict(images or {}),
        tokens=dict(tokens or {}),
        vectors=dict(vectors or {}),
    )


def replay(
    rule: Rule,
    records: Iterable[StepRecord],
    state: State | None = None,
    *,
    roundtrip_every: int | None = None,
) -> tuple[State, list[tuple[int, Finding]]]:
    """Like `run_rule`, also returning the final state; with `roundtrip_every=k` the state is
    passed through json.dumps/json.loads after every k-th record the rule sees (as a
    changelog-backed store would)."""
    state = rule.initialize() if state is None else state
    out: list[tuple[int, Finding]] = []
    seen = 0
    for record in records:
        if record.kind != "step" or record.mode not in rule.modes:
            continue
        state, finding = rule.update(state, record)
        seen += 1
        if roundtrip_every and seen % roundtrip_every == 0:
            state = json.loads(json.dumps(state))
        if finding is not None:
            out.append((record.step, finding))
    return state, out


def state_size(state: State) -> int:
    """Length of the state's JSON encoding (what a state store would hold)."""
    return len(json.dumps(state))


def mlp_run(
    *,
    steps: int = 200,
    init: str = "kaiming",
    lr: float = 0.05,
    seed: int = 0,
    batch: int = 128,
    hidden: tuple[int, ...] = (64, 64),
    eval_every: int = 20,
    early_steps: int = 10,
    job: str = "job",
) -> list[StepRecord]:
    """Records of a small PyTorch ReLU MLP trained with SGD on a learnable task, as the hook sends.

    Each train step carries the weights and biases before the forward pass, the gradients
    (with (p5, p95) quantiles during the first `early_steps` steps), the ReLU outputs with
    per-unit activity, the ReLU inputs (collection "activation_inputs", first `early_steps`
    steps only) and scalar "loss". Every `eval_every` train steps an eval record (its own step
    counter, as in smdebug) carries the held-out loss. `init` is "kaiming" (He normal weights,
    zero biases), "constant" (every weight 0.05) or "small" (weights N(0, 1e-3²)).
    Needs torch (imported here, so the package does not depend on it).
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    n_in, n_out = 20, 5
    teacher = torch.randn(n_in, n_out)
    x_val = torch.randn(1024, n_in)
    y_val = (x_val @ teacher).argmax(dim=1)
    sizes = (n_in, *hidden, n_out)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                if init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif init == "constant":
                    nn.init.constant_(m.weight, 0.05)
                elif init == "small":
                    nn.init.normal_(m.weight, std=1e-3)
                else:
                    raise ValueError(f"unknown init {init!r}")
                nn.init.zeros_(m.bias)
    captured: list[tuple[str, str, torch.Tensor]] = []

    def hook(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, path: str = ""
    ) -> None:
        captured.append((f"{path}/relu_input", "activation_inputs", inputs[0].detach()))
        captured.append((f"{path}/relu_output", "activations", output.detach()))

    for path, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda mod, i, o, p=f"net.{path}": hook(mod, i, o, p))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    def np_of(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    records: list[StepRecord] = []
    for step in range(steps):
        early = step < early_steps
        tensors = [
            make_stats(f"net.{name}", "weights" if name.endswith("weight") else "biases", np_of(p))
            for name, p in model.named_parameters()
        ]
        x = torch.randn(batch, n_in)
        y = (x @ teacher).argmax(dim=1)
        captured.clear()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            tensors.append(make_stats(f"gradient/net.{name}", "gradients", np_of(p.grad), quantiles=early))
        for name, coll, value in captured:
            if coll == "activations" or early:
                tensors.append(make_stats(name, coll, np_of(value)))
        opt.step()
        records.append(make_record(step, job=job, scalars={"loss": loss.item()}, tensors=tensors))
        if eval_every and (step + 1) % eval_every == 0:
            with torch.no_grad():
                captured.clear()
                val = float(loss_fn(model(x_val), y_val))
            records.append(
                make_record((step + 1) // eval_every - 1, mode="eval", job=job, scalars={"loss": val})
            )
    return records
