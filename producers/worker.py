"""The hook's background thread: it looks for jobs on its own clock instead of being woken for each.

Why not a ThreadPoolExecutor: its `submit` wakes the sleeping worker with a system call, made
by the training thread, and the woken thread then wants the GIL at once, while the training
thread is still running Python, so the training thread waits for it at its next torch op.
`bench/hook_profile.py`, one run on the MLP (bench/README.md): a thread woken once per step for
a job that calls the numba kernel costs training 1.049, this thread handed the same job 1.023;
TorchHook offloaded to a ThreadPoolExecutor 1.195, to this thread 1.156.

Here `submit` only appends to a deque (no system call). The thread looks for the next job on
its own clock, with `time.sleep(POLL_S)` for IDLE_S after its last job, each look taking the GIL
for a microsecond or two. After that it parks on an Event and the next `submit` wakes it the
ordinary way: jobs that far apart are handed over as a pool would, with no cost between them.

A GIL-free wait inside a numba call (ctypes `usleep` on a counter in shared memory) used to
replace the sleeping looks; it never earned 0.02 of a step beside them in one run (bench/README.md,
"Speed paths"), so it went (issue 21).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

#: Seconds between looks at the queue, while jobs keep coming.
POLL_S = 0.0005
#: Seconds without a job after which the thread parks until the next `submit`.
IDLE_S = 0.007


class Outcome:
    """The result of one job: the part of `concurrent.futures.Future` that the hook uses
    (`done`, `result`, `exception`, `set_result`, `set_exception`; no callbacks, no cancel).

    Why not Future itself: each of its calls runs several Python calls under a Condition (an
    RLock written in Python), and a job's Future is made, set, polled and read on every saved
    step, on the GIL that training shares (`bench/README.md`: Python costs training wherever it
    runs). Here `done` reads an attribute and waiting takes a plain lock, held from creation
    until the result is set.
    """

    __slots__ = ("_done", "_exc", "_lock", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._exc: BaseException | None = None
        self._lock = threading.Lock()
        self._lock.acquire()  # released once, by set_result / set_exception

    def set_result(self, value: Any) -> None:
        self._value = value
        self._done = True
        self._lock.release()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._done = True
        self._lock.release()

    def done(self) -> bool:
        return self._done

    def _wait(self, timeout: float | None) -> None:
        if self._done:
            return
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise TimeoutError(f"the job did not finish within {timeout} s")
        self._lock.release()  # for the next waiter

    def result(self, timeout: float | None = None) -> Any:
        """The job's return value (waiting up to `timeout` s); its exception is raised here."""
        self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exc


class PollingWorker:
    """One daemon thread that runs submitted callables in order; `submit` returns an Outcome.

    `submit` and `shutdown` are for one thread (the training thread) at a time. The thread looks
    for jobs every `poll_s` and parks after `idle_s` without one.
    """

    def __init__(
        self,
        name: str = "tensorpulse-stats",
        poll_s: float = POLL_S,
        idle_s: float = IDLE_S,
    ) -> None:
        self._jobs: collections.deque[tuple[Outcome, Callable[..., Any], tuple]] = collections.deque()
        self._looks = max(1, round(idle_s / poll_s))  # empty looks before parking
        self._poll_s = poll_s
        self._wake = threading.Event()
        self._parked = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Outcome:
        if self._stop:
            raise RuntimeError("cannot submit to a worker that was shut down")
        future = Outcome()
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
                empty = 0
                continue
            empty = 0
            future, fn, args = jobs.popleft()
            try:
                value = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - the Outcome carries it to the caller
                future.set_exception(exc)
            else:
                future.set_result(value)
            del future, fn, args  # drop the job's tensors now, not at the next job
