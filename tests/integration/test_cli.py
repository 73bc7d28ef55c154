"""The command line as a user runs it: the embedded broker, the demo, the alerts reader."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from confluent_kafka.admin import AdminClient

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "tensorpulse"]


def test_broker_prints_its_address_serves_and_stops_cleanly() -> None:
    """`tensorpulse broker --port 0` prints a bootstrap address that answers, and exits 0 on SIGTERM."""
    proc = subprocess.Popen(
        [*CLI, "broker", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("bootstrap: 127.0.0.1:"), line
        bootstrap = line.split(" ", 1)[1]
        meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
        assert meta.brokers, "no broker in the cluster metadata"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0
    assert "broker stopped" in proc.stderr.read()


@pytest.mark.slow
def test_demo_catches_its_fault_and_exits_zero() -> None:
    """`tensorpulse demo` prints progress, an ExplodingTensor alert, the stop and a summary; exit 0."""
    out = subprocess.run([*CLI, "demo", "--steps", "300"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "step    0" in text and "injecting fault" in text
    assert "ALERT" in text and "ExplodingTensor" in text
    assert "asked this job to stop" in text
    assert "the fault was caught" in text and "metrics" in text


def test_alerts_command_on_an_empty_cluster(kafka_bootstrap: str) -> None:
    """`tensorpulse alerts --job J` for a job without alerts prints none and says so."""
    out = subprocess.run(
        [*CLI, "alerts", "--bootstrap", kafka_bootstrap, "--job", "no-such-job"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and "0 alert event(s)" in out.stderr


def test_help_teaches_every_command() -> None:
    """`--help` of the group lists every command, and each command has an example or explanation."""
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60).stdout
    commands = ("broker", "stream", "alerts", "notify", "demo", "rules", "replay", "report", "acls", "top")
    from tensorpulse.cli import main

    assert set(main.commands) == set(commands), "a command without a --help check"
    for cmd in commands:
        assert cmd in top
        sub = subprocess.run([*CLI, cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0 and len(sub.stdout) > 200, cmd
