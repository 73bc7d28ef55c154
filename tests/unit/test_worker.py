"""The hook's polling background worker: order, errors, parking and shutdown.

Some tests read the worker's private `_parked` and wrap its `_wake.set`: whether the thread parked
and whether a submit had to wake it are the behaviour under test, and no caller of the worker
needs to know either, so they are not part of its API.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from waits import stack_of, wait_for

from tensorpulse.producers import native_wait
from tensorpulse.producers.worker import Outcome, PollingWorker

HAS_NUMBA = native_wait.waiter() is not None


@pytest.fixture(params=[True, False], ids=["native-wait", "sleep-polling"])
def native(request: pytest.FixtureRequest) -> bool:
    if request.param and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    return request.param


def test_jobs_run_in_order_on_one_thread_and_return_through_futures(native: bool) -> None:
    w = PollingWorker("tp-test", native=native)
    seen: list[tuple[int, str]] = []
    futures = [w.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i * i) for i in range(50)]
    assert [f.result(timeout=5) for f in futures] == [i * i for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"tp-test"}
    w.shutdown()


def test_an_exception_reaches_the_caller_and_later_jobs_still_run(native: bool) -> None:
    w = PollingWorker(native=native)

    def boom() -> None:
        raise ValueError("boom in a job")

    bad = w.submit(boom)
    good = w.submit(lambda: "ok")
    with pytest.raises(ValueError, match="boom in a job"):
        bad.result(timeout=5)
    assert good.result(timeout=5) == "ok"
    w.shutdown()


def test_an_idle_worker_parks_and_the_next_submit_wakes_it(native: bool) -> None:
    w = PollingWorker(poll_s=0.001, idle_s=0.005, native=native, park_s=0.02)
    assert w.submit(lambda: 1).result(timeout=5) == 1
    wait_for(lambda: w._parked, 5, "the worker to park with nothing to do")
    # A parked thread waits on its Event with no timeout: only the submit can wake it.
    assert w.submit(lambda: 2).result(timeout=5) == 2
    w.shutdown()


def test_a_native_worker_keeps_looking_without_wake_ups_between_jobs_far_apart() -> None:
    if not HAS_NUMBA:
        pytest.skip("numba is not installed")
    w = PollingWorker(idle_s=0.002, park_s=5.0, native=True)  # slow looks from 2 ms to 5 s
    sets: list[int] = []
    original = w._wake.set
    w._wake.set = lambda: (sets.append(1), original())[1]  # type: ignore[method-assign]
    for i in range(5):
        assert w.submit(lambda i=i: i).result(timeout=5) == i
        time.sleep(0.03)  # sleep-ok: the gap between jobs under test (a save every 10 steps of a 3 ms step)
    assert sets == [] and not w._parked
    w.shutdown()


def test_a_polling_worker_needs_no_wake_up_while_jobs_keep_coming(native: bool) -> None:
    w = PollingWorker(poll_s=0.0005, idle_s=0.5, native=native)
    sets: list[int] = []
    original = w._wake.set
    w._wake.set = lambda: (sets.append(1), original())[1]  # type: ignore[method-assign]
    for i in range(20):
        assert w.submit(lambda i=i: i).result(timeout=5) == i
        time.sleep(0.002)  # sleep-ok: the pace of jobs under test (they keep coming, 2 ms apart)
    assert sets == []
    w.shutdown()


def test_shutdown_runs_the_jobs_already_submitted_then_refuses_more(native: bool) -> None:
    w = PollingWorker(poll_s=0.01, native=native)
    done: list[int] = []
    slow = time.sleep  # sleep-ok: jobs that take a while are the case under test, not a wait
    futures = [w.submit(lambda i=i: (slow(0.002), done.append(i))) for i in range(5)]
    w.shutdown(wait=True)  # joins the thread: returning means it ended
    assert done == list(range(5)) and all(f.done() for f in futures)
    with pytest.raises(RuntimeError, match="shut down"):
        w.submit(lambda: None)


def test_the_worker_says_how_it_polls(native: bool) -> None:
    w = PollingWorker(native=native)
    w.submit(lambda: None).result(timeout=5)
    assert w.polls_natively is native
    w.shutdown()


def test_a_shutdown_ends_a_native_wait_long_before_its_idle_time() -> None:
    if not HAS_NUMBA:
        pytest.skip("numba is not installed")
    w = PollingWorker(idle_s=30.0, park_s=30.0, native=True)  # would wait 30 s without the bump
    w.submit(lambda: None).result(timeout=5)
    stopped = threading.Event()
    threading.Thread(target=lambda: (w.shutdown(wait=True), stopped.set()), daemon=True).start()
    assert stopped.wait(10), "shutdown still waits: the bump did not end the native wait"


def test_the_native_wait_returns_the_moved_counter_or_the_same_one_after_its_looks() -> None:
    wait = native_wait.waiter()
    if wait is None:
        pytest.skip("numba is not installed")
    counter = np.zeros(1, np.int64)
    addr = counter.ctypes.data
    assert wait(addr, 0, 3, 10, 2, 20) == 0  # nothing moved: back after five looks
    counter[0] = 7
    assert wait(addr, 0, 1_000_000, 10, 0, 0) == 7  # moved before the call: back at once
    for looks, slow_looks in ((1_000_000, 0), (1, 100_000)):  # moved during the fast, the slow looks
        seen = int(counter[0])
        # The move 50 ms into the wait is the case under test (during the fast or the slow looks).
        threading.Timer(0.05, lambda v=seen + 1: counter.__setitem__(0, v)).start()
        got: list[int] = []
        args = (addr, seen, looks, 100, slow_looks, 1000)
        waiter = threading.Thread(target=lambda a=args, out=got: out.append(wait(*a)), daemon=True)
        waiter.start()
        waiter.join(50)  # the looks alone would take 100 s: back before that only if it saw the move
        assert not waiter.is_alive() and got == [seen + 1]


def test_an_outcome_waits_with_a_timeout_and_wakes_every_waiter() -> None:
    out = Outcome()
    assert not out.done()
    with pytest.raises(TimeoutError, match="did not finish within 0.05 s"):
        out.result(timeout=0.05)
    got: list[object] = []
    waiters = [threading.Thread(target=lambda: got.append(out.result(timeout=5))) for _ in range(3)]
    for t in waiters:
        t.start()
    wait_for(lambda: all(stack_of(t)[:1] == ["_wait"] for t in waiters), 5, "every waiter to wait")
    out.set_result("r")
    for t in waiters:
        t.join(5)
    assert got == ["r", "r", "r"] and out.done()
    assert out.exception(timeout=0) is None and out.result(timeout=0) == "r"


def test_an_outcome_keeps_its_exception_for_result_and_exception() -> None:
    out = Outcome()
    err = KeyError("in the job")
    out.set_exception(err)
    assert out.done() and out.exception() is err
    with pytest.raises(KeyError, match="in the job"):
        out.result()
