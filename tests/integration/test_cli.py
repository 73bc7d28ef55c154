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
    assert "root causes       ExplodingTensor" in text  # follow-ons grouped under it (rules/causes.py)


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


def test_alerts_prints_follow_ons_under_their_root(kafka_bootstrap: str, unique: str) -> None:
    """`tensorpulse alerts` indents a follow-on under the root firing for its job and names what a
    late root explains; `--flat` prints the events as they are, one line each."""
    from confluent_kafka import Producer

    from tensorpulse.events import AlertEvent
    from tensorpulse.topics import ALERTS_TOPIC

    job = f"grouped-{unique}"
    events = [
        AlertEvent(job, rule, status, step, "train", "warning", ts=1.0e9 + step)
        for rule, status, step in [
            ("WeightUpdateRatio", "firing", 100),
            ("ExplodingTensor", "firing", 104),
            ("DeadRelu", "firing", 105),
            ("WeightUpdateRatio", "resolved", 110),
            ("ExplodingTensor", "resolved", 120),
            ("DeadRelu", "resolved", 121),
        ]
    ]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for ev in events:
        producer.produce(ALERTS_TOPIC, ev.to_json(), key=job.encode())
    assert producer.flush(10) == 0

    def run(*flags: str) -> list[str]:
        cmd = [*CLI, "alerts", "--bootstrap", kafka_bootstrap, "--job", f"^{job}$", *flags]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "6 alert event(s): 3 firing, 3 resolved, 1 job(s)" in out.stderr
        return out.stdout.splitlines()

    wur, root, dead, wur_ok, root_ok, dead_ok = (e.format() for e in events)
    assert run() == [
        wur,
        root,
        "    (explains WeightUpdateRatio, firing before it)",
        f"    {dead} (follows ExplodingTensor)",
        f"    {wur_ok} (follows ExplodingTensor)",
        root_ok,
        dead_ok,
    ]
    assert run("--flat") == [e.format() for e in events]


def test_help_teaches_every_command() -> None:
    """`--help` of the group lists every command, and each command has an example or explanation."""
    top = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60).stdout
    commands = (
        "broker",
        "stream",
        "alerts",
        "notify",
        "demo",
        "rules",
        "replay",
        "report",
        "acls",
        "top",
        "hook-config",
    )
    from tensorpulse.cli import main

    assert set(main.commands) == set(commands), "a command without a --help check"
    for cmd in commands:
        assert cmd in top
        sub = subprocess.run([*CLI, cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0 and len(sub.stdout) > 200, cmd
