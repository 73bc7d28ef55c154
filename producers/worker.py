"""The hook's background thread: it looks for jobs on its own clock instead of being woken for each.

Why not a ThreadPoolExecutor: its `submit` wakes the sleeping worker with a system call, made
by the training thread, and the woken thread then wants the GIL at once, while the training thread is still running Python, so
the training thread waits for it at its next torch op. `bench/hook_profile.py`, one run on the
MLP: a thread woken once per step for a job that calls the numba kernel costs training 1.051,
this thread handed the same job 1.018; TorchHook offloaded to a ThreadPoolExecutor 1.20, to
this thread 1.17 (bench/README.md).

Here `submit` only appends to a deque (no system call), and the thread looks at the deque every
POLL_S for up to IDLE_S after its last job: a job starts within about POLL_S plus the OS timer
slack (~50 us on Linux), and each look holds the GIL for a microsecond or two, at moments
unrelated to the training thread's Python. After IDLE_S without a job the thread parks on an
Event and the next `submit` wakes it the ordinary way. IDLE_S is a couple of steps of a small
model: the looks over that time cost less than one wake-up, and jobs further apart (slow steps,
or a save every few steps) are handed over as a pool would, with no cost between them.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

#: Seconds between looks at the queue, while jobs keep coming.
POLL_S = 0.0005
#: Seconds without a job after which the thread parks until the next `submit`.
IDLE_S = 0.007


class PollingWorker:
    """One daemon thread that runs submitted callables in order; `submit` returns a Future.

    `submit` and `shutdown` are for one thread (the training thread) at a time.
    """

    def __init__(self, name: str = "tensorpulse-stats", poll_s: float = POLL_S, idle_s: float = IDLE_S) -> None:
        self._jobs: collections.deque[tuple[Future, Callable[..., Any], tuple]] = collections.deque()
        self._looks = max(1, round(idle_s / poll_s))  # empty looks before parking
        self._poll_s = poll_s
        self._wake = threading.Event()
        self._parked = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._stop:
            raise RuntimeError("cannot submit to a worker that was shut down")
        future: Future = Future()
        self._jobs.append((future, fn, args))
        if self._parked:  # read after the append: a thread parking meanwhile sees the job
            self._wake.set()
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Run the jobs already submitted, then stop the thread (joined when `wait`)."""
        self._stop = True
        self._wake.set()
        if wait:
            self._thread.join()

    def _run(self) -> None:
        jobs, sleep, poll = self._jobs, time.sleep, self._poll_s
        empty = 0
        while True:
            if not jobs:
                if self._stop:
                    return
                empty += 1
                if empty <= self._looks:
                    sleep(poll)  # the hot loop: as little Python as possible per look
                    continue
                self._parked = True
                if not jobs and not self._stop:  # checked after parking: no job is missed
                    self._wake.wait()
                self._wake.clear()
                self._parked = False
                continue
            empty = 0
            future, fn, args = jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - the Future carries it to the caller
                    future.set_exception(exc)
            del future, fn, args  # drop the job's tensors now, not at the next job
