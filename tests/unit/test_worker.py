"""The hook's polling background worker: order, errors, parking and shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from tensorpulse.producers.worker import PollingWorker


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
    deadline = time.monotonic() + 5
    while not w._parked and time.monotonic() < deadline:
        time.sleep(0.005)
    assert w._parked, "the worker kept polling with nothing to do"
    t0 = time.monotonic()
    assert w.submit(lambda: 2).result(timeout=5) == 2
    assert time.monotonic() - t0 < 1.0  # woken by the submit, not by a timeout
    w.shutdown()


def test_a_polling_worker_needs_no_wake_up_while_jobs_keep_coming() -> None:
    w = PollingWorker(poll_s=0.0005, idle_s=0.5)
    sets: list[int] = []
    original = w._wake.set
    w._wake.set = lambda: (sets.append(1), original())[1]  # type: ignore[method-assign]
    for i in range(20):
        assert w.submit(lambda i=i: i).result(timeout=5) == i
        time.sleep(0.002)
    assert sets == []
    w.shutdown()


def test_shutdown_runs_the_jobs_already_submitted_then_refuses_more() -> None:
    w = PollingWorker(poll_s=0.01)
    done: list[int] = []
    futures = [w.submit(lambda i=i: (time.sleep(0.002), done.append(i))) for i in range(5)]
    w.shutdown(wait=True)
    assert done == list(range(5)) and all(f.done() for f in futures)
    assert not w._thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        w.submit(lambda: None)
