"""The stand-in hooks that bench/hook_profile.py's `contention` and `floor` parts time beside plain
training: a job handed to a thread at every step (`PerStepJob`), threads that never take the GIL
(`GilFreeKernelJob`, `GilFreeFloor`), the least a hook reading every weight and gradient can do
(`KernelOnly`), and no-op hooks where TorchHook registers its own (`NoopHooks`).

Apart from hook_profile.py, which runs the parts and prints their ratios: each of these has the
`step(step, loss=...)` and `close()` of a hook, and measures nothing itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


class PerStepJob:
    """Hands `body` to one background thread at every step and waits for it at the next, as the
    offloaded hook hands over its jobs: a ThreadPoolExecutor, or the hook's PollingWorker."""

    def __init__(self, body: Callable[[], Any], polling: bool = False, inline: bool = False) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tensorpulse.producers.worker import PollingWorker

        self.pool: Any = None if inline else PollingWorker() if polling else ThreadPoolExecutor(1)
        self.body = body
        self.future: Any = None

    def step(self, step: int, loss: Any = None) -> None:
        if self.pool is None:
            self.body()
            return
        if self.future is not None:
            self.future.result()
        self.future = self.pool.submit(self.body)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def gil_free_primitives() -> tuple[Any, Any, Any]:
    """(load_acquire(addr) -> int64, store_release(addr, value), usleep(us)) for numba nopython
    code that waits on counters in memory shared with Python (the GIL-free threads below)."""
    import ctypes
    import ctypes.util

    import llvmlite.ir as lir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def load_acquire(typingctx, addr):
        """An int64 load with acquire ordering: the compiler may not hoist it out of a loop."""
        sig = types.int64(types.intp)

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], lir.IntType(64).as_pointer())
            return builder.load_atomic(ptr, "acquire", 8)

        return sig, codegen

    @intrinsic
    def store_release(typingctx, addr, value):
        """An int64 store with release ordering: what was written before it is seen first."""
        sig = types.void(types.intp, types.int64)

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], lir.IntType(64).as_pointer())
            builder.store_atomic(args[1], ptr, "release", 8)
            return context.get_dummy_value()

        return sig, codegen

    usleep = ctypes.CDLL(ctypes.util.find_library("c")).usleep
    usleep.argtypes = [ctypes.c_uint]
    usleep.restype = ctypes.c_int
    return load_acquire, store_release, usleep


class GilFreeKernelJob:
    """The kernel job of `contention`, handed to a thread that stays inside one numba loop and
    never takes the GIL: `step` bumps a counter, the loop runs the kernel and bumps another. What
    a hand-over costs training when no Python runs beside it (not how the hook works today)."""

    def __init__(self, args: tuple) -> None:
        """`args`: the kernel's arguments (`stats_numba.args` / `args_at`), read at every job."""
        from numba import njit

        from tensorpulse.producers import stats_numba

        load_acquire, store_release, usleep = gil_free_primitives()
        kernel = stats_numba._get()

        @njit(nogil=True)
        def serve(ctrl, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9):  # pragma: no cover - numba
            base = ctrl.ctypes.data  # [jobs submitted, jobs done, stop]
            done = 0
            while load_acquire(base + 16) == 0:
                if load_acquire(base) == done:
                    usleep(100)
                    continue
                kernel(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9)
                done += 1
                store_release(base + 8, done)
            return done

        self.args = args
        self.ctrl = np.zeros(3, np.int64)
        self.submitted = 0
        self.thread = threading.Thread(target=serve, args=(self.ctrl, *self.args), daemon=True)
        self.thread.start()

    def step(self, step: int, loss: Any = None) -> None:
        while self.ctrl[1] < self.submitted:  # the previous job, as PerStepJob waits for it
            time.sleep(0)
        self.submitted += 1
        self.ctrl[0] = self.submitted

    def close(self) -> None:
        self.ctrl[2] = 1
        self.thread.join()


class GilFreeFloor(GilFreeKernelJob):
    """The floor's kernel over every weight and gradient, run by a thread that never takes the
    GIL: the training thread writes the gradients' addresses into the kernel's arguments and
    bumps a counter (what a hook with no Python on its background thread could cost at least)."""

    def __init__(self, model: nn.Module, interval: int = 1) -> None:
        from tensorpulse.producers import stats_numba

        self.params = list(model.parameters())
        self.interval = interval
        self.keep: list[torch.Tensor] = []  # the gradients being read: alive until the job is done
        sizes = [p.numel() for p in self.params] * 2
        super().__init__(stats_numba.args_at([p.data_ptr() for p in self.params] * 2, sizes))

    def step(self, step: int, loss: Any = None) -> None:
        if step % self.interval:
            return
        while self.ctrl[1] < self.submitted:
            time.sleep(0)
        self.keep = [p.grad for p in self.params]
        self.args[0][len(self.params) :] = [g.data_ptr() for g in self.keep]
        self.submitted += 1
        self.ctrl[0] = self.submitted


def python_for(seconds: float) -> None:
    """Busy Python for `seconds` (dict stores between clock reads): holds the GIL throughout."""
    t0 = time.perf_counter()
    d: dict[int, int] = {}
    while time.perf_counter() - t0 < seconds:
        d[len(d) % 64] = 1


class KernelOnly:
    """The least any hook that reads every weight and gradient once per step can cost: one numba
    batch call over them (no records, no activations, no Python per tensor beyond an address),
    on the training thread or on a background thread waited for at the next step. The background
    variant is a lower bound only: it reads the weights while the optimizer updates them, which
    the real hook may not do (it reads them between two optimizer steps, a second job)."""

    def __init__(
        self,
        model: nn.Module,
        background: bool,
        own_copy: bool = False,
        interval: int = 1,
        work: str = "kernel",
    ) -> None:
        from tensorpulse.producers import stats_numba
        from tensorpulse.producers.worker import PollingWorker

        # What the job does with the tensors: "kernel", the hook's six statistics; "sum", a plain
        # float32 sum of each (reading them with the least arithmetic); "handover", the kernel on
        # the first 64 floats only (the hand-over of one job per step, without the reading).
        self.batch_at = {"kernel": stats_numba.batch_at, "sum": sums_at(), "handover": handover_at}[work]
        self.params = list(model.parameters())
        self.pool = PollingWorker() if background else None  # the hook's background thread
        self.future: Any = None
        self.interval = interval  # read them at every interval-th step only
        # The same bytes, in memory that training never reads or writes.
        self.copy = [p.detach().clone() for p in self.params] * 2 if own_copy else None

    def _reduce(self, tensors: list[torch.Tensor]) -> None:
        self.batch_at([t.data_ptr() for t in tensors], [t.numel() for t in tensors])

    def step(self, step: int, loss: Any = None) -> None:
        if step % self.interval:
            return
        tensors = self.copy or [*self.params, *(p.grad for p in self.params)]
        if self.pool is None:
            self._reduce(tensors)
            return
        if self.future is not None:
            self.future.result()
        self.future = self.pool.submit(self._reduce, tensors)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class NoopHooks:
    """Hooks that do nothing, registered where TorchHook registers its own on the benchmark MLP
    (a forward pre-hook and a forward hook on the model, a forward hook on each ReLU, the
    optimizer's step pre- and post-hooks): what torch's dispatch of those hooks costs by itself,
    on every step (TorchHook keeps them only around saved steps)."""

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        model.register_forward_pre_hook(lambda *a: None)
        model.register_forward_hook(lambda *a: None)
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                module.register_forward_hook(lambda *a: None, prepend=True)
        optimizer.register_step_pre_hook(lambda *a: None)
        optimizer.register_step_post_hook(lambda *a: None)

    def step(self, step: int, loss: Any = None) -> None:
        pass

    def close(self) -> None:
        pass


def sums_at() -> Callable[[list[int], list[int]], None]:
    """A numba call that only sums each float32 tensor (by address), one vectorised pass each."""
    import numba

    from tensorpulse.producers import stats_numba

    stats_numba.host_kernel()  # resolves stats_numba's pointer intrinsic
    f32_ptr = stats_numba._f32_ptr

    @numba.njit(nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, boundscheck=False)
    def sums(addrs, sizes, out):  # pragma: no cover - run compiled by numba
        for t in range(sizes.size):
            x = numba.carray(f32_ptr(addrs[t]), (sizes[t],))
            s = np.float32(0.0)
            for i in range(x.size):
                s += x[i]
            out[t] = s

    def sums_at(addrs: list[int], sizes: list[int]) -> None:
        sums(np.array(addrs, np.intp), np.array(sizes, np.int64), np.empty(len(sizes)))

    return sums_at


def handover_at(addrs: list[int], sizes: list[int]) -> None:
    from tensorpulse.producers import stats_numba

    stats_numba.batch_at(addrs[:1], [min(64, sizes[0])])
