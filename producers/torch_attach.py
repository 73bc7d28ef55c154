"""Attaching TorchHook to a model: its forward hooks, optimizer hooks, tensor names and torch.compile.

Why a module of its own: what the hook registers on the user's model and optimizer, when, and
how it finds the modules to capture, is one question apart from what a step reduces
(`torch`, `offload`) and how records travel (`hook`, `records`, `publisher`). `ModelHooks` is
mixed into `TorchHook` (producers/torch.py), whose `__init__` declares the state it uses.

Which forward pass is captured: a pre-hook on the top module decides once per pass (module
docstring of producers/torch.py). Between saves the hook unhooks itself (`_disarm`) and registers
its hooks again (`_arm`) at the `step()` before a saved one, or at the first forward pass after the
model switched to a mode whose next step is saved (`_on_mode_change`). No method of the user's
model is replaced: the forward pre-hooks stay registered while attached and notice the switch
from `module.training` (public), where wrapping `model.train` would monkeypatch the model.

torch.compile: attach to the model before or after compiling it (`torch.compile(model)`); the
hook attaches to the original module either way (`_original_module`), so tensors keep their
eager names (no "_orig_mod." prefix). torch.compile runs a compiled module's own forward hooks
outside its graph, each Python frame compiled on its own: the hook's forward pre-hook and forward
hook are therefore marked `torch.compiler.disable` and run eagerly, so that arming, disarming
and capturing neither break the graph nor add guards (no recompiles). A compiled pass captures no
activations: their hooks would sit inside the graph, where they see no values and where adding
or removing them recompiles; a tiny pre-hook compiled with the model (`_on_compiled_forward`)
tells which passes are compiled. Weights, gradients, loss, learning rates and inputs are
captured as in eager mode. Submodules compiled one by one inside an eager model
(`model.block = torch.compile(model.block)`) keep their names too, and get no activation hooks.

Activations: the inputs of nn.Tanh and nn.Sigmoid modules are captured on saved steps as
`<module>/Tanh_input` / `<module>/Sigmoid_input` ("activations"), with the per-unit activity
histogram in which a unit is active when its input lies strictly inside the non-saturated range
(`tanh_range`, `sigmoid_range`), for SaturatedActivation. `record_labels` and `record_inputs`
(or `attach(..., capture_inputs=True)`) add label/confusion counts and input summaries; their
device values ride along in the step's one host copy.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from . import stats_numba
from .hook import Hook
from .offload import _Deferred
from .stats_torch import DeviceStats, reduce_on_device

#: Non-saturated input ranges of tanh and sigmoid (SageMaker's SaturatedActivation defaults).
TANH_RANGE = (-9.4999, 9.4999)
SIGMOID_RANGE = (-23.0, 16.99999)

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
    #: tanh / sigmoid: inputs are captured on every captured pass, with in-range activity
    in_range: tuple[float, float] | None = None


#: The child name under which torch.compile's wrapper module holds the module it compiles; it
#: appears as a segment of the wrapper's parameter and module names ("_orig_mod.fc1.weight").
COMPILE_WRAPPER_CHILD = "_orig_mod"


def _original_module(model: nn.Module) -> nn.Module:
    """The module that torch.compile's wrapper wraps (through nested wrappers), else `model`.

    Why: the hook names tensors by the original module's names, so that a compiled run and an
    eager one publish the same names, and it registers its forward hooks on the original module,
    whose hooks torch.compile calls outside the compiled graph. A wrapper is recognised by its
    only child being registered under COMPILE_WRAPPER_CHILD (public named_children, no private
    attribute).
    """
    while True:
        children = list(model.named_children())
        if len(children) != 1 or children[0][0] != COMPILE_WRAPPER_CHILD:
            return model
        model = children[0][1]


def _original_name(name: str) -> str:
    """A parameter or module name without the segments that a compiled submodule's wrapper adds."""
    if COMPILE_WRAPPER_CHILD not in name:
        return name
    return ".".join(part for part in name.split(".") if part != COMPILE_WRAPPER_CHILD)


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run as plain Python when torch.compile reaches it (`torch.compiler.disable`).

    The hook's top-level forward hooks: torch.compile calls a compiled module's own hooks
    outside its graph, each as a Python frame that it would otherwise try to compile (the
    hook's deques, locks and threads break such a graph, and guards on the hook's state make it
    recompile). Disabled, they run eagerly there: no graph break, no guard.
    """
    compiler = getattr(torch, "compiler", None)
    disable = getattr(compiler, "disable", None)
    return fn if disable is None else disable(fn)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


def _scaler_enabled(scaler: Any) -> bool:
    """Whether a GradScaler scales (and so may skip steps); a disabled one never skips."""
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def _collection(param_name: str) -> str:
    if param_name.endswith("bias"):
        return "biases"
    return "weights"  # "...weight" and any other parameter


class ModelHooks:
    """The hooks TorchHook registers on a model and its optimizer (module docstring)."""

    def _watch_forward(self, model: nn.Module) -> None:
        """Register the two forward pre-hooks on the top module, for as long as the hook is attached.

        They notice a switch of mode without touching the model: `model.train()` / `model.eval()`
        are the model's own methods and stay so; the next forward pass's pre-hook sees
        `module.training` differ from the last pass's and calls `_on_mode_change`. While the hook
        is disarmed between saves they cost one early return per forward pass (`_armed`).
        """
        self._forward_handles = [
            model.register_forward_pre_hook(self._on_compiled_forward),
            model.register_forward_pre_hook(self._eager_forward_start),
        ]

    def _unwatch_forward(self) -> None:
        for h in self._forward_handles:
            h.remove()
        self._forward_handles = []

    def _arm(self) -> None:
        """Register the step hooks (the optimizer's step hooks) and let the forward pre-hook capture."""
        if not self._armed:
            self._handles = [register() for register in self._arm_with]
            self._armed = True

    def _disarm(self) -> None:
        """Remove the step hooks until a step that may be saved comes near (`_settle`); the
        forward pre-hooks stay, each returning at once (`_on_forward_start`).

        Why: a step that is not saved would still run them, one Python call each, and each costs
        the training thread its cold-cache time, far more than in a micro-benchmark
        (`bench/hook_profile.py unsaved` compares the two ways on steps that are not saved).
        """
        if self._armed:
            for h in self._handles:
                h.remove()
            self._handles = []
            self._end_capture()
            self._remove_guards()
            self._weights = None
            self._generation += 1  # optimizer steps go uncounted now: no weights job is current
            self._armed = False

    def _upcoming_saved(self) -> bool:
        """Whether the next step of a mode that may run next is saved (its forward pass must be
        seen): train, the model's current mode, and every mode passed to `step()` so far."""
        last = self._last_step
        modes = {"train", *last}
        if self._model is not None:
            modes.add("train" if self._model.training else "eval")
        return any(self.save_config.should_save(last.get(m, -1) + 1, m) for m in modes)

    def _on_mode_change(self) -> None:
        """The model switched between train and eval (seen at the first forward pass after
        model.train() / model.eval()): that pass may be of a saved step again, so the hook arms
        if disarmed; back in training, an evaluation that just ended has its record published now."""
        try:
            if self._pending and self._model is not None and self._model.training:
                self._publish_evaluations()
            if not self._armed and self._upcoming_saved():
                self._arm()
        except Exception as exc:  # noqa: BLE001 - never into training
            self._note("switching modes", exc)

    def _publish_evaluations(self) -> None:
        """Publish the finished pending records of modes other than train.

        Why: a validation loss recorded with `record_loss(step, value)` (mode "eval") belongs to
        an evaluation that is over once training resumes (the first forward pass in train mode,
        or the next train `step()`); otherwise it would wait for the next eval record, often many steps later, or
        for close(). Records still being reduced in the background go out when they are done.
        """
        ready = sorted(k for k in self._pending if k[1] != "train" and not self._unfinished(*k))
        for step, mode in ready:
            Hook.publish(self, step, mode)

    def _settle(self) -> None:
        """On a step that is not saved: publish the finished offloaded steps, and disarm when
        nothing is being read in the background and no upcoming step is saved."""
        if self._awaiting_optimizer is not None:
            self._decide_skipped()  # no forward pass of this step was seen
        if self._jobs:
            self._drain(wait=False)
        if (
            self._armed
            and self._staged is None
            and not self._jobs
            and (self._weights is None or self._weights.future.done())
            and not self._upcoming_saved()
        ):
            self._disarm()

    def _on_compiled_forward(self, module: nn.Module, args: Any) -> None:
        """The first forward pre-hook: notes whether torch.compile runs the pass starting now.

        torch.compile compiles this small frame (the module's hooks run outside its graph, each
        frame compiled on its own): traced, the condition is True and the attribute store is
        replayed at every compiled call, with no graph and no guard on the hook's state; run
        eagerly it is False. `_on_forward_start` then captures no activations in that pass:
        hooks registered inside a compiled graph would be traced (they see no tensor values)
        and adding or removing them would make torch.compile recompile.
        """
        if _is_compiling():
            self._compiled_pass = True

    def _ready_for_compile(self) -> None:
        """Mark the top-level forward hooks `torch.compiler.disable` once torch._dynamo is loaded
        (the user compiled, before or after attaching), and register the marked ones.

        Checked at attach and at every `step()` (one dict lookup). Until then the hooks are
        plain; a compiled pass that reaches a plain `_on_forward_start` (a model compiled after
        attaching, before its first `step()`) finds it a no-op (`_is_compiling`), so that it
        neither breaks the graph nor adds guards.
        """
        if self._marked_for_compile or "torch._dynamo" not in sys.modules:
            return
        self._marked_for_compile = True
        self._eager_forward_start = _eager(self._on_forward_start)
        self._eager_forward_end = _eager(self._on_forward_end)
        if self._capture_handles:
            self._end_capture()
        if self._forward_handles and self._model is not None:
            self._unwatch_forward()
            self._watch_forward(self._model)

    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        """Notice a switch of mode; armed, decide whether the pass starting now is captured
        (module docstring of producers/torch.py); run eagerly."""
        if _is_compiling():  # plain, reached by torch.compile before `_ready_for_compile` marked it
            return
        if module is not self._model:  # a deepcopy of the model (an EMA copy) carries our hooks
            self._compiled_pass = False  # its pass, not ours
            return
        try:
            if module.training is not self._was_training:
                self._was_training = module.training
                self._on_mode_change()
            if not self._armed:
                self._compiled_pass = False
                return
            self._start_forward(module, args)
        except Exception as exc:  # noqa: BLE001 - never into training
            self._capturing = None
            self._fail("starting a forward pass", exc)

    def _start_forward(self, module: nn.Module, args: Any) -> None:
        self._capturing = None  # also after a forward pass that raised
        compiled, self._compiled_pass = self._compiled_pass, False
        if self._awaiting_optimizer is not None and module.training:
            self._decide_skipped()  # the next train step's first pass: the last one is over
        if self._staged is not None:
            self._flush_staged()
        if self._offloading:
            self._guard_gradients(module, compiled)
        mode = "train" if module.training else "eval"
        upcoming = self._last_step.get(mode, -1) + 1
        # not after a captured pass of this step (e.g. gradient accumulation)
        if not (self.enabled and mode not in self._acts and self.save_config.should_save(upcoming, mode)):
            if self._capture_handles:
                self._end_capture()
            return
        if self._offloading and mode == "train":
            self._prefetch_weights(mode)  # the first step, or no optimizer step since the last
        if mode == "train":
            self._steps_at_forward = self._optimizer_steps
        self._acts[mode] = []
        if self._auto_inputs is not None and args and isinstance(args[0], torch.Tensor):
            self.record_inputs(args[0], step=upcoming, mode=mode, **self._auto_inputs)
        if compiled:  # no activations (`_on_compiled_forward`); weights, gradients, inputs: yes
            if self._capture_handles:
                self._end_capture()
            self._log_once(
                "compiled",
                logging.INFO,
                "tensorpulse: job %s: the model runs under torch.compile; its activations are not "
                "captured (weights, gradients, loss and inputs are)",
                self.job,
            )
            return
        self._capturing = mode
        self._capture_inputs = self._quantiles_now(mode)
        self._calls = {}
        key = (id(module), self._capture_inputs)  # the hooks registered depend on both
        if self._capture_handles and self._capture_key != key:
            self._end_capture()
        if not self._capture_handles:
            self._begin_capture(module)
            self._capture_key = key

    def _begin_capture(self, model: nn.Module) -> None:
        handles = self._capture_handles
        for am in self._act_modules:
            pre = am.want_in and (self._capture_inputs or am.in_range is not None)
            if pre:
                handles.append(am.module.register_forward_pre_hook(am.pre_hook, prepend=True))
            hook = am.hook if pre else am.counting_hook
            if hook is not None:
                handles.append(am.module.register_forward_hook(hook, prepend=True))
        handles.append(model.register_forward_hook(self._eager_forward_end))

    def _end_capture(self) -> None:
        for h in self._capture_handles:
            h.remove()
        self._capture_handles = []
        self._capture_key = None

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is not self._model:
            return
        self._capturing = None  # modules called outside the model's forward are not captured

    def _make_pre_hook(self, in_name: str, want_input: bool, in_range: tuple[float, float] | None = None):
        """The input hook: activation inputs (early steps), or tanh/sigmoid inputs with activity."""

        def pre_hook(module: nn.Module, args: Any) -> None:
            mode = self._capturing
            if _is_compiling() or mode is None:  # traced in a compiled submodule: no values
                return
            idx = self._calls[id(module)] = self._calls.get(id(module), -1) + 1
            if not (want_input and args and isinstance(args[0], torch.Tensor)):
                return
            try:
                name = in_name + (f"_{idx}" if idx else "")
                if in_range is not None:
                    kwargs: dict[str, Any] = {"activity": True, "active_range": in_range}
                    coll = "activations"
                else:
                    kwargs, coll = {"quantiles": True}, "activation_inputs"
                # Reduced now (before forward) when the module works in place: it would overwrite
                # its input before a background reduction reads it.
                inplace = bool(getattr(module, "inplace", False))
                self._acts[mode].append((name, coll, self._reduce_activation(args[0], kwargs, now=inplace)))
            except Exception as exc:  # noqa: BLE001
                self._capturing = None
                self._fail("reducing an activation input", exc)

        return pre_hook

    def _make_hook(self, base: str, *, counts: bool):
        """The output hook; `counts`: it numbers the calls itself (no pre-hook registered)."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            mode = self._capturing
            if _is_compiling() or mode is None:  # traced in a compiled submodule: no values
                return
            calls = self._calls
            if counts:
                idx = calls[id(module)] = calls.get(id(module), -1) + 1
            else:
                idx = calls.get(id(module), 0)
            if not isinstance(output, torch.Tensor):
                return
            try:
                stats = self._reduce_activation(output, {"activity": True}, now=False)
                name = f"{base}_output" + (f"_{idx}" if idx else "")
                self._acts[mode].append((name, "activations", stats))
            except Exception as exc:  # noqa: BLE001
                self._capturing = None
                self._fail("reducing an activation", exc)

        return hook

    def _reduce_activation(self, t: torch.Tensor, kwargs: dict[str, Any], *, now: bool) -> DeviceStats | _Deferred:
        """Reduce an activation here, or keep it for the step's reduction (CPU tensors).

        Kept when offloading (the background job reads it), and on the training thread when
        autograd records the pass and the numba kernels are on: then the step reduces it in the
        same kernel call as the gradients, instead of in one call per module here. A kept
        activation stays alive until it is read; autograd keeps most of them until backward
        anyway. Its `grad_fn` tells whether it changed in place meanwhile (`_check_unchanged`).
        """
        x = t.detach()
        kernel = x.dtype == torch.float32 and torch.is_grad_enabled()  # numba is asked (and loads) only then
        if now or not x.is_cpu or not (self._offloading or (kernel and stats_numba.enabled())):
            return reduce_on_device(x, exact_nonfinite=True, **kwargs)
        return _Deferred(x, t, t.grad_fn, kwargs)
