"""PyTorch integration: weights, biases, gradients, activations and loss of a model, per saved step.

Usage::

    hook = TorchHook("my-job", "kafka:9092").attach(model, optimizer)
    for step, (x, y) in enumerate(loader):
        loss = criterion(model(x), y)
        loss.backward()
        hook.step(step, loss=loss)      # one device->host copy, then asynchronous publishing
        optimizer.step(); optimizer.zero_grad()
        if hook.should_stop:
            break
    hook.close()

Activations are reduced inside forward hooks, on the device, to a few scalars per module (the
activation itself is not kept). Whether a forward pass is captured is decided once, by a
pre-hook on the top module: mode = "train" if model.training else "eval", and the upcoming step
is the last step passed to `step()` for that mode plus one (0 at first). Only the first forward
pass after each `step()` is captured (gradient accumulation would otherwise repeat names).
The activation hooks themselves are registered for a captured pass only (and removed when it
ends): a step that is not saved costs one Python call per forward pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .hook import Hook, _Part
from .stats_torch import DeviceStats, reduce_many, reduce_on_device, transfer

#: Modules whose outputs are captured as activations (with per-unit activity).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
)


class _ActModule(NamedTuple):
    module: nn.Module
    pre_hook: Any
    hook: Any  # output hook when the pre-hook numbers the calls
    counting_hook: Any  # output hook that numbers the calls itself
    want_in: bool


def _collection(param_name: str) -> str:
    if param_name.endswith("bias"):
        return "biases"
    return "weights"  # "...weight" and any other parameter


class TorchHook(Hook):
    """A Hook that attaches to an nn.Module (and optionally its optimizer) and reports every saved step."""

    def __init__(self, job: str, bootstrap: str | None = None, **kwargs: Any) -> None:
        super().__init__(job, bootstrap, **kwargs)
        self._model: nn.Module | None = None
        self._optimizer: Any = None
        self._params: list[tuple[str, str, nn.Parameter]] = []
        self._handles: list[Any] = []
        self._capture_handles: list[Any] = []
        self._act_modules: list[_ActModule] = []
        self._param_items: list[tuple[str, str, nn.Parameter]] = []
        self._grad_items: list[tuple[str, nn.Parameter]] = []
        self._acts: dict[str, list[tuple[str, str, DeviceStats]]] = {}
        self._capturing: str | None = None
        self._capture_inputs = False
        self._calls: dict[int, int] = {}
        self._last_step: dict[str, int] = {}
        self._include: re.Pattern[str] | None = None
        self._exclude: re.Pattern[str] | None = None

    # ------------------------------------------------------------------ attach / detach
    def attach(
        self,
        model: nn.Module,
        optimizer: Any = None,
        *,
        activations: bool = True,
        include: str | None = None,
        exclude: str | None = None,
    ) -> TorchHook:
        """Capture `model`'s parameters, gradients and (optionally) activation outputs.

        `include` / `exclude` are regexes searched in the published tensor names (e.g.
        "fc1.weight", "gradient/fc1.weight", "act1/relu_output"). With an optimizer, its
        learning rate(s) are published as scalars "lr" (or "lr/<group>").
        """
        self.detach()
        self._model = model
        self._optimizer = optimizer
        self._include = re.compile(include) if include else None
        self._exclude = re.compile(exclude) if exclude else None
        self._params = [(name, _collection(name), p) for name, p in model.named_parameters()]
        # The include/exclude filters are applied once here, not on every step.
        self._param_items = [(name, coll, p) for name, coll, p in self._params if self._wanted(name)]
        self._grad_items = [
            (f"gradient/{name}", p) for name, _, p in self._params if self._wanted(f"gradient/{name}")
        ]
        self._act_modules = []
        if activations:
            for path, module in model.named_modules():
                if not isinstance(module, ACTIVATION_TYPES):
                    continue
                base = f"{path or 'model'}/{type(module).__name__.lower()}"
                want_out = self._wanted(f"{base}_output")
                want_in = self._wanted(f"{base}_input")
                if not (want_out or want_in):
                    continue
                self._act_modules.append(
                    _ActModule(
                        module,
                        self._make_pre_hook(base, want_in),
                        self._make_hook(base, counts=False) if want_out else None,
                        self._make_hook(base, counts=True) if want_out else None,
                        want_in,
                    )
                )
            # The only permanent hook: steps that are not saved cost one call per forward pass.
            # The activation hooks are registered when a capture starts and removed when it ends.
            self._handles.append(model.register_forward_pre_hook(self._on_forward_start))
        return self

    def detach(self) -> None:
        """Remove every hook from the model; the Kafka side stays open until close()."""
        self._end_capture()
        for h in self._handles:
            h.remove()
        self._handles = []
        self._act_modules = []
        self._acts = {}
        self._capturing = None
        self._model = None

    def _wanted(self, name: str) -> bool:
        if self._include is not None and not self._include.search(name):
            return False
        return not (self._exclude is not None and self._exclude.search(name))

    # ------------------------------------------------------------------ forward hooks
    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        self._capturing = None
        if self._capture_handles:
            self._end_capture()  # a forward pass that raised left its hooks behind
        if not self.enabled:
            return
        mode = "train" if module.training else "eval"
        if self._acts.get(mode):
            return  # already captured a forward pass for this step (e.g. gradient accumulation)
        upcoming = self._last_step.get(mode, -1) + 1
        if self.save_config.should_save(upcoming, mode):
            self._capturing = mode
            self._capture_inputs = self._quantiles_now(mode)
            self._calls = {}
            self._acts[mode] = []
            self._begin_capture(module)

    def _begin_capture(self, model: nn.Module) -> None:
        handles = self._capture_handles
        for am in self._act_modules:
            pre = am.want_in and self._capture_inputs
            if pre:
                handles.append(am.module.register_forward_pre_hook(am.pre_hook, prepend=True))
            hook = am.hook if pre else am.counting_hook
            if hook is not None:
                handles.append(am.module.register_forward_hook(hook, prepend=True))
        handles.append(model.register_forward_hook(self._on_forward_end))

    def _end_capture(self) -> None:
        for h in self._capture_handles:
            h.remove()
        self._capture_handles = []

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._capturing = None  # modules called outside the model's forward are not captured
        self._end_capture()

    def _make_pre_hook(self, base: str, want_input: bool):
        def pre_hook(module: nn.Module, args: Any) -> None:
            mode = self._capturing
            if mode is None:
                return
            idx = self._calls[id(module)] = self._calls.get(id(module), -1) + 1
            if not (want_input and args and isinstance(args[0], torch.Tensor)):
                return
            try:
                # Before forward: in-place activations would overwrite their input.
                stats = reduce_on_device(args[0], quantiles=True, exact_nonfinite=True)
                name = f"{base}_input" + (f"_{idx}" if idx else "")
                self._acts[mode].append((name, "activation_inputs", stats))
            except Exception as exc:  # noqa: BLE001
                self._capturing = None
                self._fail("reducing an activation input", exc)

        return pre_hook

    def _make_hook(self, base: str, *, counts: bool):
        """The output hook; `counts`: it numbers the calls itself (no pre-hook registered)."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            mode = self._capturing
            if mode is None:
                return
            calls = self._calls
            if counts:
                idx = calls[id(module)] = calls.get(id(module), -1) + 1
            else:
                idx = calls.get(id(module), 0)
            if not isinstance(output, torch.Tensor):
                return
            try:
                stats = reduce_on_device(output, activity=True, exact_nonfinite=True)
                name = f"{base}_output" + (f"_{idx}" if idx else "")
                self._acts[mode].append((name, "activations", stats))
            except Exception as exc:  # noqa: BLE001
                self._capturing = None
                self._fail("reducing an activation", exc)

        return hook

    # ------------------------------------------------------------------ per step
    def step(self, step: int, *, loss: Any = None, mode: str | None = None) -> None:
        """Reduce everything of `step` (one device->host copy), add scalar "loss", publish.

        `mode` defaults to "train" if the model is in training mode, else "eval". Gradients are
        captured in train mode only. `loss` may be a tensor (copied with the statistics, no
        .item()) or a number.
        """
        self._capturing = None
        if self._capture_handles:
            self._end_capture()
        if mode is None:
            mode = "train" if self._model is None or self._model.training else "eval"
        acts = self._acts.pop(mode, None) or []
        if not (self.enabled and self._valid(step, mode)):
            return
        self._last_step[mode] = step
        if not self.save_config.should_save(step, mode):
            return
        try:
            quant = self._quantiles_now(mode)
            names = [name for name, _, _ in self._param_items]
            colls = [coll for _, coll, _ in self._param_items]
            tensors: list[torch.Tensor] = [p for _, _, p in self._param_items]
            if mode == "train":
                for gname, p in self._grad_items:
                    if p.grad is not None:
                        names.append(gname)
                        colls.append("gradients")
                        tensors.append(p.grad)
            nparams = len(self._param_items)
            stats = reduce_many(tensors, quantiles=[False] * nparams + [quant] * (len(tensors) - nparams))
            for name, coll, s in acts:
                names.append(name)
                colls.append(coll)
                stats.append(s)
            extras: list[Any] = []
            extra_names: list[str] = []
            if loss is not None:
                extras.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))
                extra_names.append("loss")
            for name, lr in self._learning_rates():
                extras.append(lr)
                extra_names.append(name)
            host, values = transfer(stats, extras)
            rec = self._record_for(step, mode)
            if names:
                rec.parts.append(_Part(names, colls, host))
            rec.scalars.update(zip(extra_names, values, strict=True))
        except Exception as exc:  # noqa: BLE001
            self._fail("computing statistics", exc)
            return
        self.publish(step, mode)

    def record_loss(self, step: int, loss: Any, mode: str = "eval") -> None:
        """Record a loss (e.g. a validation loss) as scalar "loss" of (step, mode); no .item()."""
        self.record_scalars(step, {"loss": loss}, mode=mode)

    def _learning_rates(self) -> list[tuple[str, Any]]:
        opt = self._optimizer
        groups = getattr(opt, "param_groups", None)
        if not groups:
            return []
        out = []
        for i, g in enumerate(groups):
            lr = g.get("lr") if isinstance(g, Mapping) else None
            if isinstance(lr, torch.Tensor):
                out.append(("lr" if len(groups) == 1 else f"lr/{i}", lr.detach()))
            elif isinstance(lr, (int, float)):
                out.append(("lr" if len(groups) == 1 else f"lr/{i}", float(lr)))
        return out
