"""Every command talks, and nothing else does: what it waits for and a summary on stderr; no raw
librdkafka lines, no traceback on a closed pipe, no dependency's deprecation warning."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest
from confluent_kafka import Producer

from tensorpulse.broker import free_port
from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC, reductions_topic

from .helpers import create_topic, train_record

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "tensorpulse"]
RAW_LIBRDKAFKA = re.compile(r"^%\d+\|", re.MULTILINE)  # librdkafka's own stderr format: %3|<ts>|FAIL|...


def _publish_alerts(bootstrap: str, job: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for step in range(n):
        ev = AlertEvent(
            job, "ExplodingTensor", "firing" if step % 2 == 0 else "resolved", step, "train", "critical"
        )
        producer.produce(ALERTS_TOPIC, ev.to_json())
    producer.flush(10)


class Lines:
    """The lines of a process's stream, read on a thread, so a test can wait for one with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._queue.put(line) for line in stream], daemon=True).start()

    def wait_for(self, text: str, timeout: float) -> str:
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line with {text!r} within {timeout:.0f}s; saw {self.seen}"
                ) from None
            self.seen.append(line)
            if text in line:
                return line

    def rest(self, timeout: float = 5.0) -> str:
        """Everything after what was seen, until the stream ends."""
        while True:
            try:
                self.seen.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return "".join(self.seen)


def test_a_closed_pipe_ends_alerts_quietly(kafka_bootstrap: str, unique: str) -> None:
    """`tensorpulse alerts | head -1`: exit 141 (as after SIGPIPE), no traceback, no error message."""
    job = f"pipe-{unique}"
    _publish_alerts(kafka_bootstrap, job, 3000)  # ~300 KB of lines: more than a pipe holds
    proc = subprocess.Popen(
        [*CLI, "alerts", "--bootstrap", kafka_bootstrap, "--job", f"^{job}$"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert job in proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 141, err
    assert "Traceback" not in err and "Error" not in err and "Broken pipe" not in err, err


def test_an_unreachable_broker_is_reported_through_logging_not_raw_librdkafka_lines() -> None:
    """librdkafka's connection failures arrive as formatted warnings of tensorpulse.kafka, then one error."""
    out = subprocess.run(
        [*CLI, "alerts", "--bootstrap", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert not RAW_LIBRDKAFKA.search(out.stderr), out.stderr
    assert "WARNING tensorpulse.kafka: FAIL" in out.stderr
    assert "Error: reading tensorpulse.alerts at 127.0.0.1:" in out.stderr


def test_no_authlib_deprecation_warning_at_start(tmp_path: Path) -> None:
    """Without httpx2, importing the stream layer makes Authlib warn; the command line keeps it quiet."""
    pytest.importorskip("authlib")
    blocker = tmp_path / "nohttpx2" / "httpx2"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('httpx2 hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    plain = subprocess.run(
        [sys.executable, "-c", "import tensorpulse.stream.worker"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if "AuthlibDeprecationWarning" not in plain.stderr:
        pytest.skip("this Authlib does not warn about httpx: nothing to keep quiet")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [{rule: NoSuchRule}]\n")  # the worker imports its stream layer, then stops here
    out = subprocess.run(
        [*CLI, "stream", "--rules", str(rules), "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1 and "NoSuchRule" in out.stderr
    assert "Deprecation" not in out.stderr, out.stderr


def _default_sigint() -> None:
    """In the child, before exec: SIGINT at its default disposition and not blocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_alerts_follow_says_what_it_waits_for_and_sums_up(kafka_bootstrap: str, unique: str) -> None:
    """`alerts --follow` says when the past is read and it waits; Ctrl-C ends it with a one-line summary."""
    job = f"follow-{unique}"
    _publish_alerts(kafka_bootstrap, job, 3)
    inherited = signal.getsignal(signal.SIGINT)
    proc = subprocess.Popen(
        [*CLI, "alerts", "--bootstrap", kafka_bootstrap, "--job", f"^{job}$", "--follow"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: Ctrl-C at its default. A child inherits an ignored SIGINT, and a
        # library earlier in the suite may have left this process ignoring it (seen twice in
        # full runs, never alone).
        preexec_fn=_default_sigint,
    )
    err = Lines(proc.stderr)
    assert f"jobs matching '^{job}$'" in err.wait_for("reading tensorpulse.alerts at", 30)
    assert "3 past event(s) read; waiting for new alert events" in err.wait_for("waiting for new", 30)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"SIGINT did not end alerts --follow (this process's SIGINT handler: {inherited!r})")
    assert code == 0
    assert "3 alert event(s): 2 firing, 1 resolved, 1 job(s)" in err.rest()


def test_notify_says_what_it_waits_for_and_sums_up(kafka_bootstrap: str, unique: str) -> None:
    """`notify` says what it rebuilds and where it forwards while it waits; SIGTERM ends it with its summary."""
    proc = subprocess.Popen(
        [
            *CLI,
            "notify",
            "--bootstrap",
            kafka_bootstrap,
            "--webhook",
            "http://127.0.0.1:9/hook",
            "--group",
            unique,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = Lines(proc.stderr)
    assert "of tensorpulse.alerts at" in err.wait_for("to rebuild what is firing", 30)
    assert "webhook http://127.0.0.1:9" in err.wait_for("waiting for alert events to forward", 30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "stopped: 0 event(s) forwarded" in err.rest()
    assert not RAW_LIBRDKAFKA.search("".join(err.seen))


def test_report_says_what_it_reads_and_draws(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """`report` names the topic it reads and the file it draws, and ends with one summary line."""
    job = f"rep-{unique}"
    create_topic(kafka_bootstrap, reductions_topic(job))
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for step in range(5):
        producer.produce(reductions_topic(job), train_record(job, step, scalars={"loss": 1.0 / (step + 1)}))
    producer.flush(10)
    out = subprocess.run(
        [*CLI, "report", "--bootstrap", kafka_bootstrap, "--job", job, "--out", str(tmp_path / "r.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"report: reading {reductions_topic(job)} at {kafka_bootstrap}" in out.stderr
    assert f"report: drawing 1 job(s) into {tmp_path / 'r.png'}" in out.stderr
    assert re.search(r"wrote .*r\.png \(\d+ KiB\): 1 job\(s\), 5 records, 0 alert event\(s\)", out.stdout), (
        out.stdout
    )
