"""SIGTERM ends a worker that is waiting out a broker outage (no broker here: nothing answers)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tensorpulse.broker import free_port
from tensorpulse.stream.process import worker_command

pytestmark = pytest.mark.slow


def test_sigterm_during_the_start_up_backoff_stops_the_worker(tmp_path: Path) -> None:
    """The worker retries its topics with backoff while the broker is away; SIGTERM then ends it."""
    log = tmp_path / "worker.log"
    cmd = worker_command(f"127.0.0.1:{free_port()}", group="g", state_dir=tmp_path / "state", log_level="INFO")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "retrying in" not in log.read_text(errors="replace"):  # it is in its backoff now
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the worker never said it was retrying"
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - sent < 10
        assert "worker stopped" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
