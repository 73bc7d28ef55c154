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
activation itself is not kept), or, on the CPU, kept until the step reduces them with the
gradients (offloading, or autograd recording the pass with the numba kernels on). Whether a forward pass is captured is decided once, by a
pre-hook on the top module: mode = "train" if model.training else "eval", and the upcoming step
is the last step passed to `step()` for that mode plus one (0 at first). Only the first forward
pass after each `step()` is captured (gradient accumulation would otherwise repeat names).
The activation hooks themselves are registered for captured passes only: they stay from one
captured pass to the next (registering them costs more than the hooks' calls) and are removed
before a pass that is not captured. Between saves the hook unhooks itself altogether (`_disarm`):
once a saved step's background job has been read (and its record handed on, a step or two
after the save instead of at the next one), `step()` removes the forward pre-hook and the
optimizer's step hooks while no upcoming step is saved, and registers them again at the
`step()` before a saved one, or when model.train() / model.eval() switches to a mode whose
next step is saved. A step that is not saved then costs one `step()` call.

Offloading (CPU models, when torch leaves a core free, or `offload=True`): the training thread
only collects references and a background thread reduces them. Weights are read between two
optimizer steps: their reduction starts right after the optimizer's step (or at the first saved
forward pass) and the optimizer's next step waits for it, so it overlaps the forward and
backward passes. A step's gradients and activations are reduced after `step()` returns, while
the optimizer steps and the next forward pass runs: when `step()` comes before the optimizer's
step, in the same background job as the next step's weights (one hand-over per step; the
optimizer still waits for the weights alone). The next backward waits only if it would
accumulate into a gradient still being read (checked at the forward pass before it, which then
registers the gradient guards), and zero_grad(set_to_none=False) waits too. Records
are published one step later. In-place changes to a gradient or activation after `step()` (for
example clipping after it) would race with the reading; a tensor whose version counter moved
meanwhile is reported once in the log. Without an optimizer passed to `attach`, weights are
reduced on the training thread. A write to the weights outside the optimizer (loading a
checkpoint, a hand-made fault), above all after a step the GradScaler skipped, should come after
`hook.publish()`, which waits for the reading. The background thread is not woken for each job: it looks for
jobs on its own clock, without the GIL when numba is installed (`worker.PollingWorker`).

Non-finite values: a record that holds one also says in which order its non-finite tensors'
values appeared within the step (wire `t.nfo`, `records.nonfinite_order`), so that an alert names
the tensor where a NaN appeared, not one it spread to. Weights count as read after the update
when the optimizer ran a step since the step's first forward pass (`_weights_after_update`;
the optimizer's step post-hook counts steps while the hook is armed). Healthy records cost
nothing more: the order is computed on the publisher thread from the nan/inf counts.

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

With numba installed (`pip install tensorpulse[fast]`), the float32 CPU tensors of a job (the
weights; or the gradients and activations) are reduced by one kernel call, one fused pass each,
that releases the GIL and also checks the results and computes their wire columns
(`stats_fused.reduce_host_fused`); weight deltas likewise. Set
TENSORPULSE_NUMBA=0 to use torch ops.

The inputs of nn.Tanh and nn.Sigmoid modules are captured on saved steps as
`<module>/Tanh_input` / `<module>/Sigmoid_input` ("activations"), with the per-unit activity
histogram in which a unit is active when its input lies strictly inside the non-saturated range
(`tanh_range`, `sigmoid_range`), for SaturatedActivation. `record_labels` and `record_inputs`
(or `attach(..., capture_inputs=True)`) add label/confusion counts and input summaries; their
device values ride along in the step's one host copy.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from tensorpulse.errors import ConfigError

from . import stats_numba
from .hook import Hook
from .shards import ShardedParams, local_tensors
from .stats_fused import reduce_host_fused
from .stats_host import HostStats, transfer
from .stats_torch import DeviceStats, reduce_many, reduce_on_device
from .records import Part
from .worker import Outcome, PollingWorker

#: Non-saturated input ranges of tanh and sigmoid (SageMaker's SaturatedActivation defaults).
TANH_RANGE = (-9.4999, 9.4999)
SIGMOID_RANGE = (-23.0, 16.99999)
#: A ReLU-like unit is active where its output is > 0.
_POSITIVE = (0.0, math.inf)

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


class _WeightsJob(NamedTuple):
    """The weights of one optimizer generation, being reduced in the background."""

    generation: int
    upcoming: int  # the step expected to save them (the label of their weight deltas)
    deltas: bool
    future: Outcome  # -> HostStats of the hook's parameter items
    taken: bool = False


class _Job(NamedTuple):
    """One offloaded step: gradients, activations and scalars, plus the weights' reduction."""

    step: int
    mode: str
    names: list[str]
    colls: list[str]
    extra_names: list[str]
    caps: list[Any]
    future: Outcome  # -> (HostStats, scalar values); None while staged
    weights: Outcome | None = None
    weight_names: list[str] = []
    weight_colls: list[str] = []
    weights_after: bool = False  # read after the optimizer applied this step (Record.weights_after)

    def weights_done(self) -> bool:
        return self.weights is None or self.weights.done()

    @property
    def is_train_save(self) -> bool:
        """A train step with tensors: it counts among the earlier saves (quantiles, deltas)."""
        return self.mode == "train" and bool(self.names)


class _Staged(NamedTuple):
    """A step whose background job waits for the optimizer's step (to share the weights' job)."""

    args: tuple  # `_reduce` arguments
    job: _Job  # its future still None: set when submitted


class _Deferred(NamedTuple):
    """An activation captured on the training thread and reduced later, off it."""

    tensor: torch.Tensor
    version: int | None  # the tensor's version counter when captured (None: not tracked)
    kwargs: dict[str, Any]


def _first_value(v: Any) -> float:
    """A scalar extra (loss, learning rate, recorded scalar) as a float, as `transfer` reads it."""
    if not isinstance(v, torch.Tensor):
        return float(v)
    n = v.numel()
    if n == 1:
        return float(v.item())  # one call: this runs beside training, on the GIL
    return float(v.detach().reshape(-1)[0]) if n else math.nan


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _versions(tensors: list[torch.Tensor]) -> list[int | None]:
    """`_version` of each tensor; one comprehension, per-tensor calls only for inference tensors."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return [_version(t) for t in tensors]


class TorchHook(Hook):
    """A Hook that attaches to an nn.Module (and optionally its optimizer) and reports every saved step."""

    def __init__(
        self,
        job: str | None = None,
        bootstrap: str | None = None,
        *,
        tanh_range: tuple[float, float] = TANH_RANGE,
        sigmoid_range: tuple[float, float] = SIGMOID_RANGE,
        offload: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        """`tanh_range` / `sigmoid_range`: the (lo, hi) input range in which a unit counts as
        active (not saturated). `offload`: reduce on a background thread instead of the training
        thread (see "Offloading" in the module docstring): True, False, or "auto" (the default:
        when the model is on the CPU and torch leaves a core free: torch.get_num_threads() times
        $LOCAL_WORLD_SIZE < os.cpu_count()). Other arguments as for Hook: those not given (job,
        bootstrap, save_interval, enabled, ...) come from TENSORPULSE_* variables or
        $TENSORPULSE_CONFIG (producers/settings.py)."""
        if offload not in (True, False, "auto"):
            raise ConfigError(f"Expected argument `offload` to be True, False or 'auto' but got {offload!r}")
        for what, rng in (("tanh_range", tanh_range), ("sigmoid_range", sigmoid_range)):
            if len(rng) != 2 or not float(rng[0]) < float(rng[1]):
                raise ConfigError(f"Expected argument `{what}` to be (lo, hi) with lo < hi but got {rng!r}")
        super().__init__(job, bootstrap, **kwargs)
        self.tanh_range = (float(tanh_range[0]), float(tanh_range[1]))
        self.sigmoid_range = (float(sigmoid_range[0]), float(sigmoid_range[1]))
        self._model: nn.Module | None = None
        self._optimizer: Any = None
        self._params: list[tuple[str, str, nn.Parameter]] = []
        self._handles: list[Any] = []  # the step hooks registered now (see _arm)
        self._arm_with: list[Callable[[], Any]] = []  # what registers each of them, made at attach
        self._armed = False
        self._grad_guards: list[tuple[nn.Parameter, Any]] = []  # (parameter, its guard), made at attach
        self._guard_handles: list[Any] = []  # the guards registered now (see _guard_gradients)
        self._capture_handles: list[Any] = []
        self._capture_key: Any = None  # what the registered capture hooks were registered for
        self._act_modules: list[_ActModule] = []
        self._param_items: list[tuple[str, str, nn.Parameter]] = []
        self._grad_items: list[tuple[str, nn.Parameter]] = []
        self._wnames: list[str] = []
        self._wcolls: list[str] = []
        self._wtensors: list[nn.Parameter] = []
        self._gnames: list[str] = []
        self._gparams: list[nn.Parameter] = []
        self._sharded: ShardedParams | None = None  # set at attach for DTensor parameters
        self._acts: dict[str, list[tuple[str, str, DeviceStats]]] = {}
        self._capturing: str | None = None
        self._capture_inputs = False
        self._calls: dict[int, int] = {}
        self._last_step: dict[str, int] = {}
        self._include: re.Pattern[str] | None = None
        self._exclude: re.Pattern[str] | None = None
        self._delta_idx: list[int] = []  # positions in _param_items whose collection is tracked
        self._auto_inputs: dict[str, Any] | None = None
        self.offload = offload
        self._offloading = False  # decided at attach
        self._pool: PollingWorker | None = None  # the background thread, started at its first job
        self._jobs: collections.deque[_Job] = collections.deque()  # offloaded steps, in order
        # An offloaded step whose job waits for the optimizer's step, to share the weights' job:
        # (_reduce arguments, _Job fields); submitted on its own when no optimizer step comes.
        self._staged: _Staged | None = None
        self._unreported_train = 0  # staged or queued jobs that are train saves (`_train_index`)
        self._restore: list[Any] = []  # undo functions for wrapped zero_grad methods
        # Weights may be read off the training thread only between two optimizer steps, which
        # the optimizer's step hooks delimit: `_generation` counts optimizer steps, and
        # `_weights` is the background reduction of the weights of the current generation.
        self._generation = 0
        self._weights: _WeightsJob | None = None
        self._weights_offloadable = False  # an optimizer with step hooks is attached
        self._held: tuple[int, str] | None = None  # (step, mode) kept open by step(..., hold=True)
        # Mixed precision (attach(..., scaler=)): optimizer steps applied so far, counted by a step
        # post-hook; their count when the current train step's first forward pass started; and
        # the saved train step whose record waits to learn whether the optimizer applied it:
        # (step, the count at its forward pass). See `_decide_skipped`.
        self._scaler: Any = None
        self._optimizer_steps = 0
        self._steps_at_forward: int | None = None
        self._awaiting_optimizer: tuple[int, int] | None = None
        # torch.compile: set by `_on_compiled_forward` when the pass starting now is compiled.
        self._compiled_pass = False
        # The top-level forward hooks, marked `torch.compiler.disable` once torch.compile is in
        # use (`_ready_for_compile`): marking them imports torch._dynamo, about 140 MiB of
        # resident memory and 1.5 s, which a job that never compiles should not pay.
        self._eager_forward_start = self._on_forward_start
        self._eager_forward_end = self._on_forward_end
        self._marked_for_compile = False

    # ------------------------------------------------------------------ attach / detach
    def attach(
        self,
        model: nn.Module,
        optimizer: Any = None,
        *,
        activations: bool = True,
        include: str | None = None,
        exclude: str | None = None,
        capture_inputs: bool | Mapping[str, Any] = False,
        scaler: Any = None,
    ) -> TorchHook:
        """Capture `model`'s parameters, gradients and (optionally) activation outputs.

        `include` / `exclude` are regexes searched in the published tensor names (e.g.
        "fc1.weight", "gradient/fc1.weight", "act1/relu_output"); the hook's `include_collections` /
        `exclude_collections` select collections ("weights", "biases", "gradients", "activations",
        "activation_inputs"), fixed here at attach time. With an optimizer, its
        learning rate(s) are published as scalars "lr" (or "lr/<group>").
        `capture_inputs`: summarise the model's first positional input on saved steps, as
        `record_inputs` does (True, or a dict of record_inputs keyword arguments: name, kind,
        channel, token_values); a forward pre-hook on `model`, nothing on other steps.
        `scaler`: the run's `torch.amp.GradScaler` (mixed precision): a saved train step that it
        skips (inf/NaN gradients, on purpose) is published marked skipped (wire `skip`), which
        ExplodingTensor does not count against the gradients. Call `step()` after
        `scaler.unscale_(optimizer)`, so that gradients are reported unscaled, and before
        `scaler.step(optimizer)` (README, "Mixed precision"). Needs the optimizer.
        """
        if scaler is not None and not hasattr(optimizer, "register_step_post_hook"):
            raise ConfigError(
                "Expected argument `optimizer` to be a torch optimizer when `scaler` is given (the hook "
                f"tells skipped steps by the optimizer's step hooks) but got {type(optimizer).__name__}"
            )
        self.detach()
        if self._torch_deltas is not None:
            self._torch_deltas.clear()
        if capture_inputs:
            opts = {} if capture_inputs is True else dict(capture_inputs)  # type: ignore[arg-type]
            unknown = set(opts) - {"name", "kind", "channel", "token_values"}
            if unknown:
                raise ValueError(f"capture_inputs: unknown options {sorted(unknown)}")
            self._auto_inputs = opts
        else:
            self._auto_inputs = None
        outer, model = model, _original_module(model)
        self._model = model
        self._optimizer = optimizer
        self._include = re.compile(include) if include else None
        self._exclude = re.compile(exclude) if exclude else None
        self._params = [
            (_original_name(name), _collection(name), p) for name, p in model.named_parameters()
        ]
        # The include/exclude filters are applied once here, not on every step.
        self._param_items = [
            (name, coll, p)
            for name, coll, p in self._params
            if self.wants_collection(coll) and self._wanted(name)
        ]
        self._delta_idx = [i for i, (_, coll, _) in enumerate(self._param_items) if coll in self.track_deltas]
        self._grad_items = [
            (f"gradient/{name}", p)
            for name, _, p in self._params
            if self.wants_collection("gradients") and self._wanted(f"gradient/{name}")
        ]
        # What step() reads at every saved step, laid out once.
        self._wnames = [name for name, _, _ in self._param_items]
        self._wcolls = [coll for _, coll, _ in self._param_items]
        self._wtensors = [p for _, _, p in self._param_items]
        self._gnames = [gname for gname, _ in self._grad_items]
        self._gparams = [p for _, p in self._grad_items]
        # FSDP2 / DTensor: each rank reads its own shards, marked for the worker (producers/shards.py)
        self._sharded = ShardedParams.of(self._wnames, self._wtensors, self._gnames, self._gparams)
        self._shard_marks = self._sharded.rows if self._sharded is not None else None
        self._act_modules = []
        if activations:
            for path, module in model.named_modules():
                if not isinstance(module, ACTIVATION_TYPES):
                    continue
                if COMPILE_WRAPPER_CHILD in path.split("."):
                    continue  # inside a compiled submodule: traced, never captured (module docstring)
                base = f"{path or 'model'}/{type(module).__name__.lower()}"
                in_range = None
                in_name = f"{base}_input"
                if isinstance(module, (nn.Tanh, nn.Sigmoid)):
                    kind = "Tanh" if isinstance(module, nn.Tanh) else "Sigmoid"
                    in_range = self.tanh_range if kind == "Tanh" else self.sigmoid_range
                    in_name = f"{path or 'model'}/{kind}_input"
                in_coll = "activations" if in_range is not None else "activation_inputs"
                want_out = self.wants_collection("activations") and self._wanted(f"{base}_output")
                want_in = self.wants_collection(in_coll) and self._wanted(in_name)
                if not (want_out or want_in):
                    continue
                self._act_modules.append(
                    _ActModule(
                        module,
                        self._make_pre_hook(in_name, want_in, in_range),
                        self._make_hook(base, counts=False) if want_out else None,
                        self._make_hook(base, counts=True) if want_out else None,
                        want_in,
                        in_range,
                    )
                )
        self._offloading = self._should_offload(model)
        self._scaler = scaler if scaler is not None and _scaler_enabled(scaler) else None
        forward_hooks = activations or self._auto_inputs is not None or self._offloading or self._scaler is not None
        offload_hooks = self._offloading and hasattr(optimizer, "register_step_pre_hook")
        if self._scaler is not None or (
            forward_hooks and not offload_hooks and hasattr(optimizer, "register_step_post_hook")
        ):
            # Counts optimizer steps (offloading's `_on_optimizer_step` counts them itself): did
            # the optimizer apply a step since the forward pass (`_weights_after_update`)?
            self._arm_with.append(lambda: optimizer.register_step_post_hook(self._count_optimizer_step))
        if forward_hooks:
            # Registered while a saved step may come (`_arm` / `_disarm`); the activation hooks
            # are registered when a capture starts and removed when it ends.
            self._arm_with.append(lambda: model.register_forward_pre_hook(self._on_compiled_forward))
            self._arm_with.append(lambda: model.register_forward_pre_hook(self._eager_forward_start))
        if self._offloading:
            self._guard_offloaded_reads(model, optimizer, outer)
        if self._arm_with:
            self._watch_mode(model)
        self._ready_for_compile()
        self._arm()
        return self

    def _watch_mode(self, model: nn.Module) -> None:
        """Wrap model.train (which model.eval calls): a switch of mode re-arms the hook if the
        new mode's next step is saved (`_disarm`). A bound method, so that a deepcopy of the
        model (an EMA copy, say) switches its own mode, not this one's."""
        hook = self

        def train(module: nn.Module, mode: bool = True) -> nn.Module:
            out = type(module).train(module, mode)
            hook._on_mode_change()
            return out

        model.train = types.MethodType(train, model)  # type: ignore[method-assign]
        self._restore.append(lambda: model.__dict__.pop("train", None))

    # ------------------------------------------------------------------ offloading
    def _should_offload(self, model: nn.Module) -> bool:
        if self.offload is False:
            return False
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if self.offload is True:
            return True
        # Ranks on this machine (torchrun sets LOCAL_WORLD_SIZE) share its cores.
        try:
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            local = 1
        return on_cpu and torch.get_num_threads() * local < (os.cpu_count() or 1)

    def _guard_offloaded_reads(self, model: nn.Module, optimizer: Any, outer: nn.Module) -> None:
        """Nothing may change a tensor while the background thread reads it: wait for the weights
        before the optimizer updates them, and for a step's gradients before a gradient is
        accumulated into one in place (guards registered only when needed: `_guard_gradients`)
        or gradients are zeroed in place (zero_grad(set_to_none=False)). With set_to_none (the
        default) a new step's gradients are new tensors, so the previous ones stay readable."""
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            self._arm_with.append(lambda: optimizer.register_step_pre_hook(self._on_optimizer_pre_step))
            self._arm_with.append(lambda: optimizer.register_step_post_hook(self._on_optimizer_step))
            self._weights_offloadable = True
        self._grad_guards = [(p, self._make_grad_guard(p)) for p in self._gparams if p.requires_grad]
        for owner in (optimizer, model, outer) if outer is not model else (optimizer, model):
            original = getattr(owner, "zero_grad", None)
            if original is None:
                continue

            def zero_grad(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                set_to_none = kwargs.get("set_to_none", args[0] if args else True)
                if not set_to_none:
                    self._wait_jobs()
                return _original(*args, **kwargs)

            owner.zero_grad = zero_grad
            self._restore.append(lambda owner=owner: owner.__dict__.pop("zero_grad", None))

    def _train_index(self) -> int:
        # Offloaded train steps not yet turned into records count too: they are the earlier saves.
        return self._train_saves + self._unreported_train

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Outcome:
        if self._pool is None:
            self._pool = PollingWorker(f"tensorpulse-stats-{self.job}")
        return self._pool.submit(fn, *args)

    # ------------------------------------------------------------------ arming
    def _arm(self) -> None:
        """Register the step hooks (forward pre-hook, optimizer step hooks)."""
        if not self._armed:
            self._handles = [register() for register in self._arm_with]
            self._armed = True

    def _disarm(self) -> None:
        """Remove the step hooks until a step that may be saved comes near (`_settle`).

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
        """model.train() / model.eval(): the next forward pass may be of a saved step again; back
        in training, an evaluation that just ended has its record published now."""
        try:
            if self._pending and self._model is not None and self._model.training:
                self._publish_evaluations()
            if not self._armed and self._arm_with and self._upcoming_saved():
                self._arm()
        except Exception as exc:  # noqa: BLE001 - never into training
            self._note("switching modes", exc)

    def _publish_evaluations(self) -> None:
        """Publish the finished pending records of modes other than train.

        Why: a validation loss recorded with `record_loss(step, value)` (mode "eval") belongs to
        an evaluation that is over once training resumes (model.train(), or the next train
        `step()`); otherwise it would wait for the next eval record, often many steps later, or
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

    def _on_optimizer_pre_step(self, *_: Any) -> None:
        self._wait_weights()

    def _on_optimizer_step(self, *_: Any) -> None:
        """The weights changed: a new generation, whose weights can be read until the next step."""
        self._generation += 1
        if self._scaler is None:  # with a scaler, `_count_optimizer_step` counts them
            self._optimizer_steps += 1
        self._weights = None
        try:
            self._prefetch_weights("train")
            self._flush_staged()  # no weights to read for the upcoming step
        except Exception as exc:  # noqa: BLE001 - never into training
            self._fail("starting a background reduction", exc)

    def _prefetch_weights(self, mode: str) -> None:
        """Start reducing the weights now if the upcoming step of `mode` is saved.

        They stay unchanged until the optimizer's next step, which waits for the reduction: it
        overlaps the forward and backward passes instead of delaying the training thread. A step
        staged by `step()` (its gradients and activations) goes into the same background job:
        one handover to the background thread per step instead of two (`bench/hook_profile.py`).
        """
        if not (self._weights_offloadable and self.enabled and self._param_items):
            return
        if self._weights is not None and self._weights.generation == self._generation:
            return
        upcoming = self._last_step.get(mode, -1) + 1
        if not self.save_config.should_save(upcoming, mode):
            return
        delta_keys = self._delta_keys(mode)  # counts the staged step among the earlier saves
        tensors = self._wtensors if self._sharded is None else local_tensors(self._wtensors)
        staged, self._staged = self._staged, None
        weights = Outcome()
        both = self._submit(self._reduce_both, weights, upcoming, tensors, delta_keys, staged.args if staged else None)
        self._weights = _WeightsJob(self._generation, upcoming, delta_keys is not None, weights)
        if staged is not None:
            self._jobs.append(staged.job._replace(future=both))

    def _reduce_both(
        self, weights: Outcome, upcoming: int, tensors: list[torch.Tensor], delta_keys: Any, step_args: tuple | None
    ) -> Any:
        """One background job: the weights of the upcoming step (into `weights`, at once: the
        optimizer's next step waits for them alone), then a staged step (the job's result)."""
        try:
            weights.set_result(self._reduce_weights(upcoming, tensors, delta_keys))
        except Exception as exc:  # noqa: BLE001 - reported when the weights are read
            weights.set_exception(exc)
        return None if step_args is None else self._reduce(*step_args)

    def _flush_staged(self) -> None:
        """Submit the step staged by `step()` on its own (no optimizer step came to carry it)."""
        staged, self._staged = self._staged, None
        if staged is not None:
            self._jobs.append(staged.job._replace(future=self._submit(self._reduce, *staged.args)))

    def _delta_keys(self, mode: str) -> list[tuple[str, str]] | None:
        """(collection, name) of the tracked weights when this save reports weight deltas."""
        if not (self._delta_idx and self._deltas_now(mode)):
            return None
        return [(self._param_items[i][1], self._param_items[i][0]) for i in self._delta_idx]

    def _reduce_weights(self, step: int, tensors: list[torch.Tensor], delta_keys: Any) -> HostStats:
        if delta_keys is None:
            host = reduce_host_fused(tensors)
            if host is not None:
                return host
        stats = reduce_many(tensors)
        if delta_keys is not None:
            idx = self._delta_idx
            self._delta_tracker().track(step, delta_keys, [tensors[i] for i in idx], [stats[i] for i in idx])
        return transfer(stats)[0]

    def _take_weights(self, step: int, mode: str) -> Outcome | None:
        """The background reduction of this generation's weights, if it fits (step, mode)."""
        w = self._weights
        if w is None or w.generation != self._generation or w.taken:
            return None
        if w.deltas and not (mode == "train" and w.upcoming == step):
            # Tracked under another step number than the one saved (steps that skip numbers):
            # its weight deltas would be mislabelled, so start them afresh and reduce inline.
            self._wait_weights()
            if self._torch_deltas is not None:
                self._torch_deltas.clear()
            return None
        self._weights = w._replace(taken=True)
        return w.future

    def _guard_gradients(self) -> None:
        """Before a forward pass: register the gradient guards if a job may still be reading
        gradients that this pass's backward would accumulate into in place, else remove them.

        Why not keep them registered: each is a Python call from autograd, per parameter, at
        every backward; gradients already set at a forward pass are rare (gradient accumulation,
        or zero_grad after the forward pass). A backward that follows no forward
        pass of the model is not covered: the version check in `_reduce` warns if it changed a
        gradient being read.
        """
        jobs = self._jobs
        need = False
        if jobs and not jobs[-1].future.done():
            for p in self._gparams:  # a loop, not any(genexpr): one frame fewer per parameter
                if p.grad is not None:
                    need = True
                    break
        if need and not self._guard_handles:
            self._guard_handles = [p.register_hook(guard) for p, guard in self._grad_guards]
        elif not need and self._guard_handles:
            self._remove_guards()

    def _remove_guards(self) -> None:
        for h in self._guard_handles:
            h.remove()
        self._guard_handles = []

    def _make_grad_guard(self, p: nn.Parameter):
        def guard(grad: torch.Tensor) -> None:
            if (self._jobs or self._staged is not None) and p.grad is not None:  # added into p.grad
                self._wait_jobs()

        return guard

    def _wait_weights(self) -> None:
        if self._weights is not None:
            # exception() only waits: a failure is reported when the step drains
            self._weights.future.exception()

    def _wait_jobs(self) -> None:
        self._flush_staged()
        self._wait_weights()
        for job in list(self._jobs):
            job.future.exception()  # only waits: a failed job is reported when it is drained

    def _drain(self, wait: bool) -> None:
        """Turn finished offloaded steps (all of them with `wait`) into records, in order."""
        if wait:
            self._flush_staged()
        while self._jobs and (wait or (self._jobs[0].future.done() and self._jobs[0].weights_done())):
            job = self._jobs.popleft()
            self._unreported_train -= job.is_train_save
            try:
                weights = job.weights.result() if job.weights is not None else None
                host, values = job.future.result()
                if weights is not None:
                    self._record_for(job.step, job.mode).parts.append(
                        Part(job.weight_names, job.weight_colls, weights)
                    )
                self._assemble(
                    job.step, job.mode, job.names, job.colls, job.extra_names, job.caps, host, values, job.weights_after
                )
            except Exception as exc:  # noqa: BLE001
                self._fail("computing statistics", exc)
                continue
            if not self._held_back(job.step, job.mode):
                Hook.publish(self, job.step, job.mode)

    def _assemble(self, step, mode, names, colls, extra_names, caps, host, values, weights_after=False) -> None:
        rec = self._record_for(step, mode)
        rec.weights_after = weights_after
        if names:
            rec.parts.append(Part(names, colls, host))
        rec.scalars.update(zip(extra_names, values, strict=True))
        for c, v in zip(caps, host.vectors, strict=True):
            rec.add_host_block(c.kind, c.name, c.finish(v))

    def publish(self, step: int | None = None, mode: str | None = None) -> None:
        """As Hook.publish; steps still being reduced in the background are finished first."""
        self._decide_skipped()
        self._drain(wait=True)
        super().publish(step, mode)

    def close(self, timeout: float = 10.0) -> None:
        self._decide_skipped()
        self._drain(wait=True)
        super().close(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def detach(self) -> None:
        """Remove every hook from the model; the Kafka side stays open until close()."""
        self._decide_skipped()
        self._drain(wait=True)
        self._disarm()  # also ends a capture and removes the gradient guards
        self._arm_with = []
        self._grad_guards = []
        for undo in self._restore:
            undo()
        self._restore = []
        self._act_modules = []
        self._acts = {}
        self._capturing = None
        self._model = None

    def _wanted(self, name: str) -> bool:
        if self._include is not None and not self._include.search(name):
            return False
        return not (self._exclude is not None and self._exclude.search(name))

    # ------------------------------------------------------------------ mixed precision, holding
    def _count_optimizer_step(self, *_: Any) -> None:
        """The optimizer's step post-hook: the optimizer applied a step."""
        self._optimizer_steps += 1

    def _weights_after_update(self, mode: str) -> bool:
        """Whether weights read now were read after the optimizer applied this step's gradients.

        True when the optimizer ran a step since the step's first forward pass (`step()` called
        after `optimizer.step()`): the weights then hold what the gradients did to them, so a
        NaN they hold came after the gradients' (wire `t.nfo`, `records.nonfinite_order`). Offloaded
        weights are read in the current generation, after the optimizer's last step, so the same
        test holds for them. False when no forward pass was seen (the hook's forward pre-hook is
        not registered: `activations=False`): the README's order, `step()` before the optimizer.
        """
        seen = self._steps_at_forward if mode == "train" else None
        return seen is not None and self._optimizer_steps > seen

    def _decide_skipped(self) -> None:
        """Mark the awaited saved train step skipped if the optimizer applied no step since its
        first forward pass, then let its record go.

        Why this way: a GradScaler that finds inf or NaN gradients skips `optimizer.step()`, so
        the optimizer's step hooks do not run; nothing else public tells it without a device sync
        (`scaler.get_scale()` reads the scale back; comparing it before and after `update()` also
        depends on the backoff factor). A train step's optimizer step falls between its first
        forward pass and the next step's, whether `step()` is called before or after
        `scaler.step()`, with gradient accumulation too: the hook decides at the next train
        step's first forward pass (else at the next `step()`, `release()`, `publish()` or
        `close()`). The record waits for it (a forward pass later, not a step).
        """
        awaited, self._awaiting_optimizer = self._awaiting_optimizer, None
        if awaited is None:
            return
        step, seen = awaited
        try:
            if self._optimizer_steps == seen:
                self._record_for(step, "train").skipped = True
            if (step, "train") in self._pending and not self._unfinished(step, "train"):
                Hook.publish(self, step, "train")
        except Exception as exc:  # noqa: BLE001 - never into training
            self._note("marking a skipped step", exc)

    def _held_back(self, step: int, mode: str) -> bool:
        """Whether the record of (step, mode) must not be published yet, though its statistics
        are ready: kept open by `step(..., hold=True)`, or awaiting whether the optimizer applied it."""
        awaited = self._awaiting_optimizer
        return self._held == (step, mode) or (awaited is not None and mode == "train" and awaited[0] == step)

    def _unfinished(self, step: int, mode: str) -> bool:
        """As Hook._unfinished: held back, or its statistics still being reduced in the background."""
        if self._held_back(step, mode):
            return True
        staged = self._staged
        if staged is not None and (staged.job.step, staged.job.mode) == (step, mode):
            return True
        return any(job.step == step and job.mode == mode for job in self._jobs)

    # ------------------------------------------------------------------ forward hooks
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
        if self._armed:
            for h in self._handles:
                h.remove()
            self._handles = [register() for register in self._arm_with]

    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        """Decide whether the pass starting now is captured (module docstring); run eagerly."""
        if _is_compiling():  # plain, reached by torch.compile before `_ready_for_compile` marked it
            return
        try:
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
            self._guard_gradients()
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
        anyway. Its version counter tells whether it changed in place meanwhile.
        """
        x = t.detach()
        kernel = x.dtype == torch.float32 and torch.is_grad_enabled()  # numba is asked (and loads) only then
        if now or not x.is_cpu or not (self._offloading or (kernel and stats_numba.enabled())):
            return reduce_on_device(x, exact_nonfinite=True, **kwargs)
        return _Deferred(x, _version(x), kwargs)

    # ------------------------------------------------------------------ per step
    def step(self, step: int, *, loss: Any = None, mode: str | None = None, hold: bool = False) -> None:
        """Reduce everything of `step` (one device->host copy), add scalar "loss", publish.

        `mode` defaults to "train" if the model is in training mode, else "eval". Gradients are
        captured in train mode only. `loss` may be a tensor (copied with the statistics, no
        .item()) or a number. `hold`: keep the record open for scalars that become known only
        after the gradients are gone (a framework's logged metrics, e.g. the Hugging Face
        Trainer's): add them with `record_scalars(step, ...)`, then `release(step, mode)`
        publishes it (otherwise the next step of the mode, or close(), does).
        """
        if not self._marked_for_compile:
            self._ready_for_compile()
        self._capturing = None  # the capture hooks stay registered for the next captured pass
        if mode is None:
            mode = "train" if self._model is None or self._model.training else "eval"
        acts = self._acts.pop(mode, None) or []
        if not (self.enabled and self._valid(step, mode)):
            return
        if self._pending and mode == "train":
            self._publish_evaluations()  # an evaluation since the last train step is over
        self._held = (step, mode) if hold else None
        self._last_step[mode] = step
        saved = self.save_config.should_save(step, mode)
        if not saved and (self._armed or self._jobs):
            self._settle()
        if not self._armed and self._arm_with and self.save_config.should_save(step + 1, mode):
            self._arm()  # before the next forward pass, which is saved
        if not saved:
            return
        if self._awaiting_optimizer is not None:
            self._decide_skipped()  # no forward pass of this step was seen
        pending = self._pending.get((step, mode))
        self._drain(wait=False)
        try:
            offload = self._offloading
            quant = self._quantiles_now(mode)
            wnames, wcolls, wtensors = self._wnames, self._wcolls, self._wtensors
            if self._sharded is not None:
                wtensors = local_tensors(wtensors)
            delta_keys = self._delta_keys(mode) if wtensors else None
            weights = self._take_weights(step, mode) if offload else None
            if offload and weights is None and wtensors:
                # No background reduction of these weights (no optimizer hooks, or the first
                # step): the optimizer may change them once step() returns, so reduce them now.
                weights = Outcome()
                weights.set_result(self._reduce_weights(step, wtensors, delta_keys))
            if weights is None:  # reduced with the rest
                names, colls, tensors = list(wnames), list(wcolls), list(wtensors)
            else:
                names, colls, tensors, delta_keys = [], [], [], None
            nparams = len(tensors)
            if mode == "train" and self._gparams:
                grads = [p.grad for p in self._gparams]
                if self._sharded is not None:
                    grads = local_tensors(grads)
                missing = False
                for g in grads:  # a loop, not any(genexpr): one frame fewer per gradient
                    if g is None:
                        missing = True
                        break
                if missing:  # parameters that took no part in this backward
                    kept = [i for i, g in enumerate(grads) if g is not None]
                    names += [self._gnames[i] for i in kept]
                    grads = [grads[i] for i in kept]
                else:
                    names += self._gnames
                colls += ["gradients"] * len(grads)
                tensors += grads
            quants = [False] * nparams + [quant] * (len(tensors) - nparams)
            for name, coll, _ in acts:
                names.append(name)
                colls.append(coll)
            extras: list[Any] = []
            extra_names: list[str] = []
            if loss is not None:
                extras.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))
                extra_names.append("loss")
            for name, lr in self._learning_rates():
                extras.append(lr)
                extra_names.append(name)
            caps = []
            if pending is not None:  # labels, inputs and tensor scalars recorded for this step
                caps, pending.captures = pending.captures, []
                for name, value in pending.scalar_tensors.items():
                    extras.append(value)
                    extra_names.append(name)
                pending.scalar_tensors = {}
            act_stats = [a for _, _, a in acts]
            after = self._weights_after_update(mode)
            if mode == "train":
                seen, self._steps_at_forward = self._steps_at_forward, None
                if self._scaler is not None:  # published once the optimizer has run
                    self._awaiting_optimizer = (step, self._optimizer_steps if seen is None else seen)
            if offload:
                versions = _versions(tensors)
                self._flush_staged()
                job = _Job(step, mode, names, colls, extra_names, caps, None, weights, wnames, wcolls, after)
                self._staged = _Staged((step, tensors, quants, None, act_stats, extras, caps, versions), job)
                self._unreported_train += job.is_train_save
                if not (self._weights_offloadable and self._armed and mode == "train"):
                    self._flush_staged()  # no optimizer step will carry it
                return
            host, values = self._reduce(step, tensors, quants, delta_keys, act_stats, extras, caps)
            self._assemble(step, mode, names, colls, extra_names, caps, host, values, after)
        except Exception as exc:  # noqa: BLE001
            self._fail("computing statistics", exc)
            return
        if not self._held_back(step, mode):
            Hook.publish(self, step, mode)

    def release(self, step: int, mode: str = "train") -> None:
        """Publish the record that `step(step, mode=mode, hold=True)` kept open; else a no-op.

        If its reduction still runs in the background (offloading), the record goes out when it
        is done, as any offloaded step's does; only when scalars were added meanwhile does this
        wait for it, so that they join the record instead of going out on their own."""
        if self._held != (step, mode):
            return
        self._held = None
        if self._held_back(step, mode):
            return  # awaiting the optimizer (`_decide_skipped` publishes it)
        self._drain(wait=False)
        staged = self._staged.job if self._staged is not None else None
        busy = [(j.step, j.mode) for j in self._jobs] + ([(staged.step, staged.mode)] if staged else [])
        if (step, mode) in busy:
            if (step, mode) not in self._pending:
                return
            self._drain(wait=True)
        Hook.publish(self, step, mode)

    def _reduce(self, step, tensors, quants, delta_keys, act_stats, extras, caps, versions=None):
        """Statistics of one step, to host values: on the training thread, or offloaded."""
        got = self._reduce_lean(tensors, quants, delta_keys, act_stats, extras, caps)
        if got is None:
            stats = reduce_many(tensors, quantiles=quants)
            if delta_keys is not None:
                idx = self._delta_idx
                self._delta_tracker().track(step, delta_keys, [tensors[i] for i in idx], [stats[i] for i in idx])
            acts = [
                reduce_on_device(a.tensor, exact_nonfinite=True, **a.kwargs) if isinstance(a, _Deferred) else a
                for a in act_stats
            ]
            got = transfer([*stats, *acts], extras, vectors=[c.values for c in caps])
        for a in act_stats:
            if isinstance(a, _Deferred):
                self._check_unchanged(a.tensor, a.version)
        if versions is not None and _versions(tensors) != versions:
            for t, v in zip(tensors, versions, strict=True):
                self._check_unchanged(t, v)
        return got

    def _reduce_lean(self, tensors, quants, delta_keys, act_stats, extras, caps):
        """`_reduce`'s (host, values) by one numba call (`reduce_host_fused`) in the common case:
        CPU float32 tensors, activations kept for the step, no quantiles, weight deltas or
        label/input captures this step. None: take the general path."""
        if delta_keys is not None or caps or any(quants):
            return None
        acts: list[torch.Tensor] = []
        ranges: list[tuple[float, float] | None] = [None] * len(tensors)
        for a in act_stats:
            if not isinstance(a, _Deferred) or a.kwargs.get("quantiles") or not a.kwargs.get("activity"):
                return None
            acts.append(a.tensor)
            ranges.append(a.kwargs.get("active_range", _POSITIVE))
        host = reduce_host_fused([*tensors, *acts], ranges)
        return None if host is None else (host, [_first_value(e) for e in extras])

    def _check_unchanged(self, t: torch.Tensor, version: int | None) -> None:
        """Warn (once) that a tensor read off the training thread was changed in place meanwhile."""
        if version is not None and _version(t) != version:
            self._log_once(
                "changed",
                logging.WARNING,
                "tensorpulse: a gradient or activation of job %s was changed in place between its "
                "capture and its reduction (e.g. gradient clipping or unscaling after step(), or an "
                "in-place op on a module's output); its statistics may mix old and new values. Call "
                "hook.step() after such changes, or pass offload=False (and set TENSORPULSE_NUMBA=0 "
                "for activations).",
                self.job,
            )

    def _default_mode(self) -> str:
        return "train" if self._model is None or self._model.training else "eval"

    def _implicit_step(self, mode: str) -> int:
        """The step being run: the last step passed to `step()` for `mode`, plus one."""
        return self._last_step.get(mode, -1) + 1

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
            lr = g.get("lr") if type(g) is dict or isinstance(g, Mapping) else None
            if isinstance(lr, torch.Tensor):
                out.append(("lr" if len(groups) == 1 else f"lr/{i}", lr.detach()))
            elif isinstance(lr, (int, float)):
                out.append(("lr" if len(groups) == 1 else f"lr/{i}", float(lr)))
        return out
