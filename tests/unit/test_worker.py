"""The hook's polling background worker: order, errors, parking and shutdown.

Some tests read the worker's private `_parked` and wrap its `_wake.set`: whether the thread parked
and whether a submit had to wake it are the behaviour under test, and no caller of the worker
needs to know either, so they are not part of its API.
"""

from __future__ import annotations

import threading
import time

import pytest
from waits import stack_of, wait_for

from tensorpulse.producers.worker import Outcome, PollingWorker


def test_jobs_run_in_order_on_one_thread_and_return_through_futures() -> None:
    w = PollingWorker("tp-test")
    seen: list[tuple[int, str]] = []
    futures = [w.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i * i) for i in range(50)]
    assert [f.result(timeout=5) for f in futures] == [i * i for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"tp-test"}
    w.shutdown()


def test_an_exception_reaches_the_caller_and_later_jobs_still_run() -> None:
    w = PollingWorker()

    def boom() -> None:
        raise ValueError("boom in a job")

    bad = w.submit(boom)
    good = w.submit(lambda: "ok")
    with pytest.raises(ValueError, match="boom in a job"):
        bad.result(timeout=5)
    assert good.result(timeout=5) == "ok"
    w.shutdown()


def test_an_idle_worker_parks_and_the_next_submit_wakes_it() -> None:
    w = PollingWorker(poll_s=0.001, idle_s=0.005)
    assert w.submit(lambda: 1).result(timeout=5) == 1
    wait_for(lambda: w._parked, 5, "the worker to park with nothing to do")
    # A parked thread waits on its Event with no timeout: only the submit can wake it.
    assert w.submit(lambda: 2).result(timeout=5) == 2
    w.shutdown()


def test_a_polling_worker_needs_no_wake_up_while_jobs_keep_coming() -> None:
    w = PollingWorker(poll_s=0.0005, idle_s=0.5)
    sets: list[int] = []
    original = w._wake.set
    w._wake.set = lambda: (sets.append(1), original())[1]  # type: ignore[method-assign]
    for i in range(20):
        assert w.submit(lambda i=i: i).result(timeout=5) == i
        time.sleep(0.002)  # sleep-ok: the pace of jobs under test (they keep coming, 2 ms apart)
    assert sets == []
    w.shutdown()


def test_shutdown_runs_the_jobs_already_submitted_then_refuses_more() -> None:
    w = PollingWorker(poll_s=0.01)
    done: list[int] = []
    slow = time.sleep  # sleep-ok: jobs that take a while are the case under test, not a wait
    futures = [w.submit(lambda i=i: (slow(0.002), done.append(i))) for i in range(5)]
    w.shutdown(wait=True)  # joins the thread: returning means it ended
    assert done == list(range(5)) and all(f.done() for f in futures)
    with pytest.raises(RuntimeError, match="shut down"):
        w.submit(lambda: None)


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
