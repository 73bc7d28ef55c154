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
after the save instead of at the next one), `step()` removes the optimizer's step hooks while
no upcoming step is saved and the forward pre-hooks return at once; they capture again from the
`step()` before a saved one, or from the first forward pass after model.train() / model.eval()
switched to a mode whose next step is saved (the pre-hook sees `module.training` change: the
model's methods are not wrapped). A step that is not saved then costs one `step()` call and
two early returns per forward pass.

Offloading (CPU models, when torch leaves a core free, or `offload=True`): the training thread only
collects references and a background thread reduces them; see producers/offload.py.

Non-finite values: a record that holds one also says in which order its non-finite tensors'
values appeared within the step (wire `t.nfo`, `records.nonfinite_order`), so that an alert names
the tensor where a NaN appeared, not one it spread to. Weights count as read after the update
when the optimizer ran a step since the step's first forward pass (`_weights_after_update`;
the optimizer's step post-hook counts steps while the hook is armed). Healthy records cost
nothing more: the order is computed on the publisher thread from the nan/inf counts.

torch.compile: attach before or after compiling; see producers/torch_attach.py.

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

This module holds TorchHook itself: its arguments, `attach` / `detach`, what a saved `step()`
reads and how its record is assembled, mixed precision. Its other jobs, one module each:
`torch_attach` (hooks on the model and optimizer, tensor names, torch.compile), `offload` (handing
a step to the background thread: its state machine), `stats_torch` / `stats_host` / `stats_fused`
(reducing on the device, then to the host), `hook` / `recording` / `records` / `publisher`
(pending records, encoding and publishing), `schedule` (which steps are saved).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tensorpulse.errors import ConfigError

from .hook import Hook
from .offload import Offloading, _Job, _Staged, _WeightsJob
from .records import Part
from .shards import ShardedParams, local_tensors
from .stats_torch import DeviceStats
from .torch_attach import (
    ACTIVATION_TYPES,
    COMPILE_WRAPPER_CHILD,
    SIGMOID_RANGE,
    TANH_RANGE,
    ModelHooks,
    _ActModule,
    _collection,
    _original_module,
    _original_name,
    _scaler_enabled,
)
from .worker import Outcome, PollingWorker


class TorchHook(ModelHooks, Offloading, Hook):
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
        self._handles: list[Any] = []  # the optimizer's step hooks registered now (see _arm)
        self._forward_handles: list[Any] = []  # the forward pre-hooks, while attached (_watch_forward)
        self._was_training = True  # the model's mode at its last forward pass
        self._arm_with: list[Callable[[], Any]] = []  # what registers each of them, made at attach
        self._armed = False
        self._grad_guards: list[tuple[nn.Parameter, Any]] = []  # (parameter, its guard), made at attach
        self._guard_handles: list[Any] = []  # the guards registered now (see _guard_gradients)
        self._held_hook: Any = None  # the one-shot forward hook that makes the backward wait (idem)
        self._held_wait = False  # the next backward waits for the job holding old gradients
        self._held_waits, self._held_wait_s = 0, 0.0  # how often and how long it did (stats)
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
        self._grad_refs: list[Any] | None = None  # the last saved step's gradients, weakly (_grads_reused)
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

    def __deepcopy__(self, memo: dict[int, Any]) -> TorchHook:
        """The hook itself, not a copy: a deepcopy of the hooked model (an EMA copy, say) copies the
        model's hook registrations, which hold the hook's methods. The copy's passes are then
        ignored (`_on_forward_start`), and its model.train() / eval() switch only its own mode."""
        return self

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
        if self._offloading:
            self._guard_offloaded_reads(model, optimizer, outer)
        if forward_hooks:
            # The forward pre-hooks stay while attached (they notice model.train() / eval()); the
            # optimizer's hooks are registered while a saved step may come (`_arm` / `_disarm`);
            # the activation hooks when a capture starts, removed when it ends.
            self._was_training = model.training
            self._watch_forward(model)
        self._ready_for_compile()
        self._arm()
        return self

    def detach(self) -> None:
        """Remove every hook from the model; the Kafka side stays open until close()."""
        self._decide_skipped()
        self._drain(wait=True)
        self._disarm()  # also ends a capture and removes the gradient guards
        self._unwatch_forward()
        self._arm_with = []
        self._grad_guards = []
        self._act_modules = []
        self._acts = {}
        self._capturing = None
        self._model = None

    def _wanted(self, name: str) -> bool:
        if self._include is not None and not self._include.search(name):
            return False
        return not (self._exclude is not None and self._exclude.search(name))

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
        if not self._armed and self._forward_handles and self.save_config.should_save(step + 1, mode):
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
                if offload and self._grads_reused(grads):
                    offload = False  # zeroed in place later, perhaps: read them now (_grads_reused)
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
                self._flush_staged()
                job = _Job(step, mode, names, colls, extra_names, caps, None, weights, wnames, wcolls, after)
                self._staged = _Staged((step, tensors, quants, None, act_stats, extras, caps), job)
                self._unreported_train += job.is_train_save
                if not (self._weights_offloadable and self._armed and mode == "train"):
                    self._flush_staged()  # no optimizer step will carry it
                return
            if weights is not None:  # read in the background; the rest of this step is read now
                self._drain(wait=True)  # earlier steps' records first
                self._record_for(step, mode).parts.append(Part(wnames, wcolls, weights.result()))
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

    # ------------------------------------------------------------------ defaults
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
