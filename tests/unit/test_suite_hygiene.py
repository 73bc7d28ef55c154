"""The suite itself: tests wait on events, not on the clock, and every assertion can fail.

A sleep used to wait for something is slow on a quiet machine and flaky on a busy one; a bound on
elapsed time is a benchmark that fails on a loaded CI runner (bench/ measures speed); an assertion
that is always true hides a test that checks nothing. These checks read the tests' source and name
each offending line, so that a new one is caught in review rather than by a flake months later.
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
#: A sleep that is itself the case under test (a stalled job, a slow job, a training pace) says so
#: on its line; anything else that sleeps is waiting for something and should wait for that instead.
MARK = "sleep-ok:"
SLEEP = re.compile(r"\bsleep\(|\bEvent\(\)\.wait\(")
CLOCKS = {"perf_counter", "monotonic", "time", "perf_counter_ns", "monotonic_ns", "time_ns"}


def _sources() -> list[Path]:
    """Every test source but the fuzz corpus (inputs, not code) and this file (its probes are bad on purpose)."""
    here = Path(__file__).resolve()
    return sorted(p for p in TESTS.rglob("*.py") if "corpus" not in p.relative_to(TESTS).parts and p != here)


def _where(path: Path, line: int) -> str:
    shown = path.relative_to(TESTS.parent) if path.is_relative_to(TESTS.parent) else path.name
    return f"{shown}:{line}"


def unmarked_sleeps(path: Path) -> list[str]:
    """Lines of `path` that sleep without saying why the sleep is not synchronisation."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        if SLEEP.search(code) and MARK not in line:
            out.append(f"{_where(path, n)}: {line.strip()}")
    return out


def _reads_clock(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr in CLOCKS
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "time"
        for n in ast.walk(node)
    )


def _elapsed(node: ast.AST) -> bool:
    """`time.x() - t` (or a name bound to one is not followed: the direct form is what people write)."""
    return any(
        isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub) and _reads_clock(n) for n in ast.walk(node)
    )


def _zero(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == 0 and not isinstance(node.value, bool)


def _always_true(test: ast.expr) -> bool:
    if isinstance(test, ast.Constant):
        return bool(test.value)
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if isinstance(op, ast.LtE) and _zero(left) and not isinstance(right, ast.Constant):
            return True  # `0 <= count`
        if isinstance(op, ast.GtE) and _zero(right) and not isinstance(left, ast.Constant):
            return True  # `count >= 0`
    return False


def _created_then_checked(body: list[ast.stmt]) -> list[ast.Assert]:
    """`x = Thing(...)` followed at once by `assert x is not None`: a constructor never gives None."""
    out = []
    for first, second in zip(body, body[1:], strict=False):
        if (
            isinstance(first, ast.Assign)
            and len(first.targets) == 1
            and isinstance(first.targets[0], ast.Name)
            and isinstance(first.value, ast.Call)
            and isinstance(first.value.func, (ast.Name, ast.Attribute))
            and (first.value.func.id if isinstance(first.value.func, ast.Name) else first.value.func.attr)[
                :1
            ].isupper()
            and isinstance(second, ast.Assert)
            and isinstance(second.test, ast.Compare)
            and isinstance(second.test.left, ast.Name)
            and second.test.left.id == first.targets[0].id
            and isinstance(second.test.ops[0], ast.IsNot)
            and isinstance(second.test.comparators[0], ast.Constant)
            and second.test.comparators[0].value is None
        ):
            out.append(second)
    return out


def bad_asserts(path: Path) -> list[str]:
    """Assertions in `path` that bound elapsed wall-clock time or cannot fail."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            if _elapsed(node.test):
                out.append(f"{_where(path, node.lineno)}: wall-clock assertion: {ast.unparse(node.test)}")
            elif _always_true(node.test):
                out.append(f"{_where(path, node.lineno)}: always true: {ast.unparse(node.test)}")
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for a in _created_then_checked(body):
                out.append(
                    f"{_where(path, a.lineno)}: always true after a constructor: {ast.unparse(a.test)}"
                )
    return sorted(out, key=lambda hit: int(hit.split(": ", 1)[0].rsplit(":", 1)[1]))


def test_no_test_sleeps_to_wait_for_something() -> None:
    """Every sleep in tests/ is marked as the case under test; the rest wait on the event (tests/waits.py)."""
    found = [hit for path in _sources() for hit in unmarked_sleeps(path)]
    assert not found, "sleeps used as synchronisation (wait for the event, or mark why not):\n" + "\n".join(
        found
    )


def test_no_wall_clock_or_always_true_assertions() -> None:
    """No assertion in tests/ bounds elapsed time (bench/ measures speed) or cannot fail."""
    found = [hit for path in _sources() for hit in bad_asserts(path)]
    assert not found, "\n".join(found)


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """Each pattern is caught and its legitimate neighbour is not (else the two checks above prove nothing)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import threading, time\n"
        "def test_x(n):\n"
        "    time.sleep(1)\n"
        "    threading.Event().wait(0.5)\n"
        "    t = time.perf_counter()\n"
        "    assert time.perf_counter() - t < 0.5\n"
        "    assert 0 <= n\n"
        "    assert n >= 0\n"
        "    assert True\n"
        "    h = Hook()\n"
        "    assert h is not None\n"
    )
    good = tmp_path / "good.py"
    good.write_text(
        "import time\n"
        "def test_y(n, r, stop):\n"
        "    time.sleep(0.01)  # sleep-ok: the pace under test\n"
        "    assert stop.wait(5)\n"
        "    assert 0 <= n <= 3 and n - 1 >= 0\n"
        "    assert r.ts <= time.time()\n"
        "    h = make()\n"
        "    assert h is not None\n"
    )
    assert [h.split(": ", 1)[0] for h in unmarked_sleeps(bad)] == ["bad.py:3", "bad.py:4"]
    assert [h.split(": ", 1)[0] for h in bad_asserts(bad)] == [f"bad.py:{n}" for n in (6, 7, 8, 9, 11)]
    assert unmarked_sleeps(good) == [] and bad_asserts(good) == []


def test_our_deprecation_warnings_fail_the_suite() -> None:
    """pyproject's filterwarnings makes a DeprecationWarning from a tensorpulse module an error,
    and leaves one from a dependency a warning (shown in the summary)."""
    with pytest.raises(DeprecationWarning, match="ours"):
        warnings.warn_explicit("ours", DeprecationWarning, "wire.py", 1, module="tensorpulse.wire")
    with warnings.catch_warnings(record=True) as seen:  # keeps the filters in force: records, not raises
        warnings.warn_explicit("theirs", DeprecationWarning, "x.py", 1, module="somelib.x")
    assert [str(w.message) for w in seen] == ["theirs"]
