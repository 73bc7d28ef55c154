"""Waiting for events in tests, never for a length of time.

A test that sleeps "long enough" is slow on a quiet machine and flaky on a busy one. These
helpers wait for the thing itself (a value, a record, a thread blocked where it should be) and
fail with what was awaited once a generous timeout passes; the timeout is a bound on a hang, not
a claim about speed (speed is measured in bench/).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def wait_for(
    cond: Callable[[], Any], timeout: float = 10.0, what: str = "the condition", interval: float = 0.1
) -> Any:
    """`cond()`'s first truthy value, polled every `interval` s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)  # sleep-ok: the poll interval of this wait, which ends on the condition
    value = cond()  # one last look: a condition that came true during the last interval counts
    if value:
        return value
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def stack_of(thread: threading.Thread) -> list[str]:
    """The names of the functions `thread` is running, innermost first ([] once it ended).

    sys._current_frames is CPython's documented way to see where another thread is; a test uses
    it to know that a thread is blocked where it should be before it acts, instead of sleeping.
    """
    frame = sys._current_frames().get(thread.ident) if thread.ident is not None else None
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def blocked_in(thread: threading.Thread, caller: str) -> bool:
    """True when `thread` waits on a threading primitive (Event, Condition) called from `caller`."""
    names = stack_of(thread)
    return bool(names) and names[0] == "wait" and caller in names


def thread_named(name: str) -> threading.Thread:
    """The live thread called `name` (the tests name the threads they start, or pass the name on)."""
    found = [t for t in threading.enumerate() if t.name == name]
    assert len(found) == 1, f"expected one thread named {name!r}, found {len(found)}"
    return found[0]
