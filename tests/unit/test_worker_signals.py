"""SIGTERM ends a worker that is waiting out a broker outage (no broker here: nothing answers)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from waits import wait_for

from tensorpulse.broker import free_port
from tensorpulse.stream.process import worker_command

pytestmark = pytest.mark.slow


def test_sigterm_during_the_start_up_backoff_stops_the_worker(tmp_path: Path) -> None:
    """The worker retries its topics with backoff while the broker is away; SIGTERM then ends it.

    At least once: exactly-once would first try to fence a former self and, with no broker, give
    up only after that call's 15 s timeout; the backoff and its signal handling are the same."""
    log = tmp_path / "worker.log"
    cmd = worker_command(
        f"127.0.0.1:{free_port()}",
        group="g",
        state_dir=tmp_path / "state",
        guarantee="at-least-once",
        log_level="INFO",
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:

        def retrying() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            return "retrying in" in log.read_text(errors="replace")

        wait_for(retrying, 60, "the worker to say it is retrying (in its backoff now)")
        proc.send_signal(signal.SIGTERM)
        # Ignoring SIGTERM in the backoff, it would retry for ever: wait() would time out.
        assert proc.wait(15) == 0
        assert "worker stopped" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
