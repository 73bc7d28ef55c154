"""Handing a saved step to the background thread: the offloaded reduction's state machine.

Why a module of its own: when the model is on the CPU and torch leaves a core free, reducing on
the training thread would cost training that time; instead the training thread only collects
references and `worker.PollingWorker` reduces them (`stats_torch`, `stats_host`, `stats_fused`).
What may be read when, and who waits for whom, is this module's job. `Offloading` is mixed into
`TorchHook` (producers/torch.py), whose `__init__` declares the state it uses; without
offloading, a step is reduced on the training thread by the same `_reduce`.

Offloading (CPU models, when torch leaves a core free, or `offload=True`): the training thread
only collects references and a background thread reduces them. Weights are read between two
optimizer steps: their reduction starts right after the optimizer's step (or at the first saved
forward pass) and the optimizer's next step waits for it, so it overlaps the forward and
backward passes. A step's gradients and activations are reduced after `step()` returns, while
the optimizer steps and the next forward pass runs: when `step()` comes before the optimizer's
step, in the same background job as the next step's weights (one hand-over per step; the
optimizer still waits for the weights alone). The next backward waits if it would
accumulate into a gradient still being read (checked at the forward pass before it, which then
registers the gradient guards), and, before it produces its first gradient, for the job still
holding the previous step's gradients, or reduces them itself when the job has not reached them
(`_wait_for_held_gradients`): with set_to_none a new step's gradients are new tensors, and
without the wait a background thread slowed by other work kept the old set alive while the
backward allocated the new one (the 201M-parameter MLP's peak under load: +146 (78..214) MiB
without it, +84 with it; bench/README.md "The hook's memory"). The job drops the step's tensors
before its result is set, so that the wait ends once they are freed. Gradients
zeroed in place (zero_grad(set_to_none=False)) are told by being the same tensors as at the
previous save, and such a step is read on the training thread (`_grads_reused`; so is the
first saved step, with nothing to compare). Records are published one step later. In-place changes after `step()`: an activation that autograd
recorded and that an in-place op changed meanwhile (its `grad_fn` is then another node, a
public attribute) is reported once in the log. A gradient changed in place after `step()`
(clipping or unscaling after it) is not detected: torch has no public version counter
(`Tensor._version` is private). With an optimizer attached, a step staged before the optimizer's
step is read at the optimizer's step post-hook, so it reads the gradients the optimizer used;
without one, call `step()` after such changes, or pass offload=False. Without an optimizer passed to `attach`, weights are
reduced on the training thread. A write to the weights outside the optimizer (loading a
checkpoint, a hand-made fault), above all after a step the GradScaler skipped, should come after
`hook.publish()`, which waits for the reading. The background thread is not woken for each job: it looks for
jobs on its own clock (`worker.PollingWorker`).

With numba installed (`pip install tensorpulse[fast]`), the float32 CPU tensors of a job (the
weights; or the gradients and activations) are reduced by one kernel call, one fused pass each,
that releases the GIL and also checks the results and computes their wire columns
(`stats_fused.reduce_host_fused`); weight deltas likewise. Set
TENSORPULSE_NUMBA=0 to use torch ops.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from .hook import Hook
from .records import Part
from .shards import local_tensors
from .stats_fused import reduce_host_fused
from .stats_host import HostStats, transfer
from .stats_torch import reduce_many, reduce_on_device
from .worker import Outcome, PollingWorker

#: A ReLU-like unit is active where its output is > 0.
_POSITIVE = (0.0, math.inf)

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
    box: list[tuple] = []  # its `_reduce` arguments until a thread takes them (`_reduce_boxed`)

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

    tensor: torch.Tensor  # detached
    source: torch.Tensor  # as the module returned it: autograd's node tells in-place changes
    grad_fn: Any  # source.grad_fn when captured; None: autograd did not record it (not checked)
    kwargs: dict[str, Any]

def _requiring_grad(output: Any) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, or a tuple, list or mapping of them, one level
    deep) that autograd will compute a gradient for."""
    if isinstance(output, torch.Tensor):
        items: Any = (output,)
    elif isinstance(output, (tuple, list)):
        items = output
    elif isinstance(output, dict):  # also transformers' ModelOutput (an OrderedDict)
        items = output.values()
    else:
        return []
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def _first_value(v: Any) -> float:
    """A scalar extra (loss, learning rate, recorded scalar) as a float, as `transfer` reads it."""
    if not isinstance(v, torch.Tensor):
        return float(v)
    n = v.numel()
    if n == 1:
        return float(v.item())  # one call: this runs beside training, on the GIL
    return float(v.detach().reshape(-1)[0]) if n else math.nan


class Offloading:
    """The offloaded reduction of TorchHook (module docstring)."""

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
        or gradients are zeroed in place (zero_grad(set_to_none=False): `_grads_reused`). With
        set_to_none (the default) a new step's gradients are new tensors, so the previous ones
        stay readable."""
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            self._arm_with.append(lambda: optimizer.register_step_pre_hook(self._on_optimizer_pre_step))
            self._arm_with.append(lambda: optimizer.register_step_post_hook(self._on_optimizer_step))
            self._weights_offloadable = True
        self._grad_guards = [(p, self._make_grad_guard(p)) for p in self._gparams if p.requires_grad]

    def _grads_reused(self, grads: list[Any]) -> bool:
        """Whether a saved step's gradients may be the tensors of the previous saved step, zeroed
        (or accumulated) in place since: then the step is reduced on the training thread.

        Why: zero_grad(set_to_none=False) zeroes the gradients in place, and nothing public runs
        before it (torch has no zero_grad hook; wrapping the user's zero_grad would monkeypatch
        it): a background read could meet the zeroing, or, when `step()` follows the optimizer's
        step, come after it. With set_to_none (torch's default) every step's gradients are new
        tensors: object identity, seen through weak references (no gradient is kept alive),
        tells the two apart. The first saved step has nothing to compare with and counts as
        reused, so it is reduced on the training thread.
        """
        refs = self._grad_refs
        self._grad_refs = [None if g is None else weakref.ref(g) for g in grads]
        if refs is None or len(refs) != len(grads):
            return True
        return any(r is not None and g is not None and r() is g for r, g in zip(refs, grads, strict=True))

    def _train_index(self) -> int:
        # Offloaded train steps not yet turned into records count too: they are the earlier saves.
        return self._train_saves + self._unreported_train

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Outcome:
        if self._pool is None:
            self._pool = PollingWorker(f"tensorpulse-stats-{self.job}")
        return self._pool.submit(fn, *args)

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
        box = [staged.args] if staged is not None else []
        both = self._submit(self._reduce_both, weights, upcoming, tensors, delta_keys, box)
        self._weights = _WeightsJob(self._generation, upcoming, delta_keys is not None, weights)
        if staged is not None:
            self._jobs.append(staged.job._replace(future=both, box=box))

    def _reduce_both(
        self, weights: Outcome, upcoming: int, tensors: list[torch.Tensor], delta_keys: Any, box: list[tuple]
    ) -> Any:
        """One background job: the weights of the upcoming step (into `weights`, at once: the
        optimizer's next step waits for them alone), then a staged step (the job's result)."""
        try:
            weights.set_result(self._reduce_weights(upcoming, tensors, delta_keys))
        except Exception as exc:  # noqa: BLE001 - reported when the weights are read
            weights.set_exception(exc)
        return self._reduce_boxed(box)

    def _reduce_boxed(self, box: list[tuple]) -> Any:
        """`_reduce` of the staged step whose arguments `box` holds, taken out of it.

        Why a box: the background thread keeps a job's arguments until after its result is set;
        taken out here, the step's gradients and activations are freed when this returns, before
        the result is set, so a backward waiting for that result (`_wait_for_held_gradients`)
        allocates its own gradients only once the old ones are gone.
        """
        try:
            args = box.pop()  # one call under the GIL: the training thread may take them first
        except IndexError:
            return None  # taken by the training thread (`_wait_for_held_gradients`)
        return self._reduce(*args)

    def _flush_staged(self) -> None:
        """Submit the step staged by `step()` on its own (no optimizer step came to carry it)."""
        staged, self._staged = self._staged, None
        if staged is not None:
            box = [staged.args]
            self._jobs.append(staged.job._replace(future=self._submit(self._reduce_boxed, box), box=box))

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

    def _guard_gradients(self, module: nn.Module, compiled: bool = False) -> None:
        """Before a forward pass: register the gradient guards if a job may still be reading
        gradients that this pass's backward would accumulate into in place, else remove them;
        and, while a job holds the previous step's gradients, have the backward wait for it
        before it produces its first gradient (`_wait_for_held_gradients`).

        Why not keep the guards registered: each is a Python call from autograd, per parameter,
        at every backward; gradients already set at a forward pass are rare (gradient accumulation,
        or zero_grad after the forward pass). A backward that follows no forward
        pass of the model is not covered: the version check in `_reduce` warns if it changed a
        gradient being read.

        Where the backward waits: at the gradient of the pass's output (one tensor hook, put on
        by a one-shot forward hook), the start of the backward, before any parameter's gradient
        is allocated. A parameter's own hook would run only after its new gradient exists (one
        layer's gradient too many at peak); it is the fallback when the output holds no tensor
        that requires grad, and under torch.compile (a forward hook inside a compiled model
        would be traced, and adding it would recompile).
        """
        jobs = self._jobs
        busy = bool(jobs) and not jobs[-1].future.done()
        need = False
        if busy:
            for p in self._gparams:  # a loop, not any(genexpr): one frame fewer per parameter
                if p.grad is not None:
                    need = True
                    break
        self._held_wait = busy and module.training and torch.is_grad_enabled()
        if self._held_wait and not need:
            if compiled:
                need = True  # the guards wait instead (see above)
            elif self._held_hook is None:
                self._held_hook = module.register_forward_hook(self._await_held_at_backward)
        if need and not self._guard_handles:
            self._guard_handles = [p.register_hook(guard) for p, guard in self._grad_guards]
        elif not need and self._guard_handles:
            self._remove_guards()

    def _await_held_at_backward(self, module: nn.Module, args: Any, output: Any) -> None:
        """The one-shot forward hook: have the backward wait at its start (`_guard_gradients`)."""
        self._remove_held_hook()
        try:
            outs = _requiring_grad(output)
            for t in outs:
                t.register_hook(self._wait_at_output)
            if not outs and self._held_wait and not self._guard_handles:
                self._guard_handles = [p.register_hook(guard) for p, guard in self._grad_guards]
        except Exception as exc:  # noqa: BLE001 - never into training
            self._note("waiting for held gradients", exc)

    def _wait_at_output(self, grad: torch.Tensor) -> None:
        self._wait_for_held_gradients()

    def _wait_for_held_gradients(self) -> None:
        """Wait for the background job that still holds the previous step's gradients (and
        activations), once per backward: it frees them before its result is set (`_reduce_boxed`).

        Why: otherwise a backward that starts while the job runs allocates its own gradients
        beside the old ones, up to a second set of the model's gradients at peak. The wait costs
        the training thread only what the job has left when the backward starts: nothing when
        the background thread kept up (the job ran beside the forward pass). When the job has
        not reached the step yet (it reads the next step's weights first), the training thread
        takes the step out of its box and reduces it itself, beside the job: it waits neither
        for the weights (the optimizer's step waits for those, as always) nor for a thread that
        other work slows down.
        """
        if not self._held_wait:
            return
        self._held_wait = False
        jobs = self._jobs
        if not jobs or jobs[-1].future.done():
            return
        t0 = time.perf_counter()
        job = jobs[-1]
        try:
            args = job.box.pop()
        except IndexError:
            job.future.exception()  # being reduced: only waits; jobs run in order on one thread
        else:
            out = Outcome()
            try:
                out.set_result(self._reduce(*args))
            except Exception as exc:  # noqa: BLE001 - reported when the step drains
                out.set_exception(exc)
            del args
            jobs[-1] = job._replace(future=out, box=[])
        self._held_waits += 1
        self._held_wait_s += time.perf_counter() - t0

    def stats(self) -> dict[str, Any]:
        """As Hook.stats, plus what bounding the held gradients cost training: how many backward
        passes waited for the background job (`gradient_waits`) and for how long in all
        (`gradient_wait_s`; `_wait_for_held_gradients`)."""
        return {**super().stats(), "gradient_waits": self._held_waits, "gradient_wait_s": self._held_wait_s}

    def _remove_held_hook(self) -> None:
        if self._held_hook is not None:
            self._held_hook.remove()
            self._held_hook = None

    def _remove_guards(self) -> None:
        for h in self._guard_handles:
            h.remove()
        self._guard_handles = []
        self._remove_held_hook()

    def _make_grad_guard(self, p: nn.Parameter):
        def guard(grad: torch.Tensor) -> None:
            if self._held_wait:
                self._wait_for_held_gradients()
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

    def _reduce(self, step, tensors, quants, delta_keys, act_stats, extras, caps):
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
                self._check_unchanged(a)
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

    def _check_unchanged(self, act: _Deferred) -> None:
        """Warn (once) that an activation kept for the step was changed in place meanwhile.

        Seen through autograd's public graph: an in-place op on a tensor that autograd records
        replaces its `grad_fn`. Not seen: changes autograd does not record (under no_grad).
        """
        if act.grad_fn is not None and act.source.grad_fn is not act.grad_fn:
            self._log_once(
                "changed",
                logging.WARNING,
                "tensorpulse: an activation of job %s was changed in place between its capture and "
                "its reduction (an in-place op on a module's output); its statistics may mix old and "
                "new values. Pass offload=False and set TENSORPULSE_NUMBA=0 to reduce activations "
                "inside their forward hooks.",
                self.job,
            )
