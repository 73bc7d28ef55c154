"""Waiting for the next job without holding the GIL (numba), for the hook's polling worker.

Why: a thread that polls with `time.sleep` takes the GIL at every look, so it looks only for a
few milliseconds after a job and then parks; jobs further apart (a save every few steps) each
need a wake-up by system call and a hand-over of the GIL. `wait_for_change` looks at a counter
in a loop of `usleep` calls inside one nogil numba call, and returns (taking the GIL once) only
when the counter moved or the idle time is up: looks a short time apart, then looks a longer
time apart, at almost no CPU, so the thread can keep looking between two saves.
`bench/hook_profile.py` compares the two ways of polling (`contention` and `hook` rows).

Optional: without numba (or when it fails to compile) `waiter()` is None and the worker polls
with `time.sleep`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: (counter address, value seen, looks, microseconds between them, then slow looks, microseconds
#: between those) -> the counter's value.
Waiter = Callable[[int, int, int, int, int, int], int]

_waiter: Waiter | None = None
_primitives: tuple[Any, Any, Any] | None = None
_tried = False
_lock = threading.Lock()


def primitives() -> tuple[Any, Any, Any]:
    """(load_acquire(addr) -> int64, store_release(addr, value), usleep(us)) for numba nopython
    code that waits on counters in memory shared with Python. Needs numba (ImportError)."""
    global _primitives
    if _primitives is None:
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
        _primitives = (load_acquire, store_release, usleep)
    return _primitives


def _build() -> Waiter:
    from numba import njit

    load_acquire, _, usleep = primitives()

    @njit(nogil=True)
    def wait_for_change(addr, seen, looks, us, slow_looks, slow_us):  # pragma: no cover - numba
        for i in range(looks + slow_looks):
            now = load_acquire(addr)
            if now != seen:
                return now
            usleep(us if i < looks else slow_us)
        return load_acquire(addr)

    return wait_for_change


def waiter() -> Waiter | None:
    """The compiled wait (compiled at the first call, ~0.3 s), or None without numba."""
    global _waiter, _tried
    if _tried:
        return _waiter
    with _lock:
        if not _tried:
            try:
                import numpy as np

                fn = _build()
                counter = np.zeros(1, np.int64)
                fn(counter.ctypes.data, 0, 1, 1, 1, 1)  # compile now
                _waiter = fn
            except ImportError:
                pass
            except Exception as exc:  # noqa: BLE001 - any numba failure: poll with time.sleep
                log.warning("tensorpulse: GIL-free polling unavailable, polling with time.sleep: %s", exc)
            _tried = True
    return _waiter


__all__ = ["Waiter", "primitives", "waiter"]
