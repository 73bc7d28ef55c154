"""`tensorpulse demo --bootstrap` beside a running worker group: no alert arrives twice."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tensorpulse.events import AlertEvent
from tensorpulse.stream.running import running_groups
from tensorpulse.topics import ALERTS_TOPIC

from .helpers import read_topic, wait_for, worker_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = [sys.executable, "-m", "tensorpulse"]


def _demo(bootstrap: str, *extra: str) -> tuple[str, list[AlertEvent]]:
    """Run the demo (120 steps); returns its output and the alert events its job got on the topic."""
    pytest.importorskip("torch")
    out = subprocess.run(
        [*CLI, "demo", "--bootstrap", bootstrap, "--steps", "120", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = re.search(r"job\s+(demo-exploding-[0-9a-f]+)", out.stdout)
    assert job, out.stdout
    events = [AlertEvent.from_json(m.value()) for m in read_topic(bootstrap, ALERTS_TOPIC, timeout=2)]
    return out.stdout, [e for e in events if e.job == job.group(1)]


def _joined(bootstrap: str, group: str) -> None:
    """Wait until `group` has a live member: the worker's /metrics answers before its consumer joins,
    and a demo started in between would see no running group."""
    wait_for(
        lambda: any(g.group == group for g in running_groups(bootstrap)), 60, f"worker group {group!r} to join"
    )


def _assert_once(stdout: str, events: list[AlertEvent]) -> None:
    """Every transition of the job is on the topic once, and the demo printed each once."""
    assert events, "the demo's fault raised no alert"
    transitions = Counter((e.rule, e.rank, e.status, e.step) for e in events)
    assert max(transitions.values()) == 1, f"an alert arrived twice: {transitions.most_common(3)}"
    assert len({e.id for e in events}) == len(events)
    assert stdout.count("  ALERT  ") == len(events)


def test_demo_reuses_the_running_worker_group(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """With a worker group running, the demo starts no worker of its own and says which group it uses."""
    with worker_process(kafka_bootstrap, tmp_path, group=f"running-{unique}"):
        _joined(kafka_bootstrap, f"running-{unique}")
        stdout, events = _demo(kafka_bootstrap)
    assert f"reusing the worker group 'running-{unique}' (1 worker(s))" in stdout
    assert "  worker    pid" not in stdout
    assert f"group 'running-{unique}' reads this job" in stdout
    _assert_once(stdout, events)


def test_demo_own_worker_beside_a_running_group_doubles_nothing(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """--own-worker: the demo's worker under its own group and topic prefix, which the running group does not follow."""
    with worker_process(kafka_bootstrap, tmp_path, group=f"running-{unique}"):
        _joined(kafka_bootstrap, f"running-{unique}")
        stdout, events = _demo(kafka_bootstrap, "--own-worker")
    assert f"'running-{unique}' (1 worker(s)) already running here" in stdout
    assert "topic prefix 'tensorpulse-demo-" in stdout and "  worker    pid" in stdout
    _assert_once(stdout, events)
