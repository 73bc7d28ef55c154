"""`tensorpulse notify` against a real Alertmanager, a real broker and a local webhook receiver."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from tensorpulse.broker import free_port
from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC

from .helpers import create_topic, wait_for

pytestmark = pytest.mark.integration

AM_BIN = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AMTOOL = shutil.which("amtool")
KCAT = shutil.which("kcat")
CLI = [sys.executable, "-m", "tensorpulse"]

AM_CONFIG = """\
route:
  receiver: blackhole
  group_wait: 1s
receivers:
  - name: blackhole
"""


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager on a free port, clustering off; yields its base URL."""
    with run_alertmanager(tmp_path, AM_CONFIG) as url:
        yield url


@contextlib.contextmanager
def run_alertmanager(tmp_path: Path, config: str) -> Iterator[str]:
    """Alertmanager with `config` on a free port, clustering off; yields its base URL."""
    if AM_BIN is None:
        pytest.skip("prometheus-alertmanager is not installed (apt-get install prometheus-alertmanager)")
    (tmp_path / "am.yml").write_text(config)
    port = free_port()
    log = open(tmp_path / "alertmanager.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            AM_BIN,
            f"--config.file={tmp_path / 'am.yml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, proc), 20, "Alertmanager to become ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _ready(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, f"alertmanager exited with code {proc.returncode}"
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def am_alerts(url: str, job: str) -> list[dict[str, Any]]:
    """Alerts Alertmanager holds for `job` (GET /api/v2/alerts with a label filter)."""
    q = urllib.parse.urlencode({"filter": f'training_job="{job}"'})
    with urllib.request.urlopen(f"{url}/api/v2/alerts?{q}", timeout=5) as r:
        return json.loads(r.read())


class Hook:
    """A webhook receiver that records each body and its Authorization header."""

    def __init__(self) -> None:
        self.got: list[tuple[str | None, dict[str, Any]]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.got.append((self.headers.get("Authorization"), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


def produce(bootstrap: str, *events: AlertEvent) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for ev in events:
        p.produce(ALERTS_TOPIC, key=ev.job.encode(), value=ev.to_json())
    assert p.flush(10) == 0, "alert events were not delivered to the broker"


def notify(bootstrap: str, am: str, hook: Hook, job: str, group: str, log: Path) -> subprocess.Popen:
    cmd = [
        *CLI, "notify", "--bootstrap", bootstrap, "--alertmanager", am, "--webhook", hook.url,
        "--header", "Authorization: Bearer ${TP_TEST_HOOK_TOKEN}", "--job", f"^{job}$",
        "--group", group, "--resend-interval", "1", "--label", "source=tensorpulse",
    ]  # fmt: skip
    env = {**os.environ, "TP_TEST_HOOK_TOKEN": "sekrit-4711"}
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("notify did not stop within 20 s of SIGTERM") from None


def alert(job: str, status: str, rank: int, step: int) -> AlertEvent:
    return AlertEvent(
        job=job,
        rule="ExplodingTensor",
        status=status,
        step=step,
        mode="train",
        severity="critical",
        rank=rank,
        tensors=("loss",) if status == "firing" else (),
        value=float("inf") if status == "firing" else None,
        threshold=0.0,
        message=f"test alert {status}",
    )


def test_notify_drives_alertmanager_and_webhooks(
    kafka_bootstrap: str, alertmanager: str, unique: str, tmp_path: Path
) -> None:
    """Firing alerts appear in Alertmanager (API and amtool), stay refreshed, and leave when resolved.

    The first alert exists before notify starts (rebuilt from the topic); the others arrive
    through the consumer group, which also feeds the webhook; a restart resumes without re-sending.
    """
    job = f"am-{unique}"
    group = f"notify-{unique}"
    log = tmp_path / "notify.log"
    hook = Hook()
    create_topic(kafka_bootstrap, ALERTS_TOPIC)
    produce(kafka_bootstrap, alert(job, "firing", 0, 10))

    proc = notify(kafka_bootstrap, alertmanager, hook, job, group, log)
    try:
        wait_for(lambda: "consuming" in log.read_text(), 30, "notify to join its consumer group")
        found = wait_for(lambda: am_alerts(alertmanager, job), 15, "the rebuilt alert in Alertmanager")
        assert len(found) == 1
        a = found[0]
        assert a["labels"] == {
            "alertname": "ExplodingTensor",
            "training_job": job,
            "rank": "0",
            "severity": "critical",
            "tensorpulse_mode": "train",
            "source": "tensorpulse",
        }
        assert a["status"]["state"] == "active" and a["annotations"]["step"] == "10"
        assert a["annotations"]["value"] == "inf"

        produce(kafka_bootstrap, alert(job, "firing", 1, 12))
        both = wait_for(lambda: len(am_alerts(alertmanager, job)) == 2, 15, "the second alert")
        assert both

        ends = {x["labels"]["rank"]: x["endsAt"] for x in am_alerts(alertmanager, job)}
        wait_for(
            lambda: {x["labels"]["rank"]: x["endsAt"] for x in am_alerts(alertmanager, job)}["1"] > ends["1"],
            10,
            "a re-post to move endsAt forward",
        )

        if AMTOOL is not None:
            out = subprocess.run(
                [
                    AMTOOL,
                    "alert",
                    "query",
                    f"--alertmanager.url={alertmanager}",
                    "-o",
                    "json",
                    f"training_job={job}",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert out.returncode == 0, out.stderr
            ranks = sorted(x["labels"]["rank"] for x in json.loads(out.stdout))
            assert ranks == ["0", "1"]

        produce(kafka_bootstrap, alert(job, "resolved", 0, 20))
        wait_for(
            lambda: [x["labels"]["rank"] for x in am_alerts(alertmanager, job)] == ["1"],
            15,
            "rank 0 to resolve in Alertmanager",
        )
        wait_for(lambda: len(hook.got) >= 2, 10, "the webhook deliveries")
    finally:
        rc = stop(proc)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    # The webhook saw what came through the group (not the rebuilt alert), with the header, as topic JSON.
    assert [(b["rank"], b["status"]) for _, b in hook.got] == [(1, "firing"), (0, "resolved")]
    assert all(auth == "Bearer sekrit-4711" for auth, _ in hook.got)
    assert AlertEvent.from_json(json.dumps(hook.got[0][1])).value == float("inf")
    assert "sekrit" not in text
    assert "stopped: 2 event(s) forwarded" in text

    # A restart rebuilds the firing set (rank 1) and resumes after its committed offsets: an event
    # sent once it consumes is the next one the webhook gets (one partition per job: had it gone
    # back to earlier offsets, their events would come first).
    log2 = tmp_path / "notify2.log"
    proc = notify(kafka_bootstrap, alertmanager, hook, job, group, log2)
    try:
        wait_for(lambda: "consuming" in log2.read_text(), 30, "the restarted notify to join")
        produce(kafka_bootstrap, alert(job, "firing", 2, 30))
        wait_for(lambda: len(hook.got) >= 3, 15, "the event sent after the restart at the webhook")
    finally:
        rc = stop(proc)
    text = log2.read_text()
    assert rc == 0, text[-3000:]
    assert "read 3 recent alert event(s) from tensorpulse.alerts: 1 alert(s) firing" in text
    assert "stopped: 1 event(s) forwarded" in text
    assert [(b["rank"], b["status"], b["step"]) for _, b in hook.got[2:]] == [(2, "firing", 30)]


def _kcat(args: list[str], bootstrap: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [args[0], "-b", bootstrap, *args[3:], "-e"], capture_output=True, text=True, timeout=30
    )


@pytest.mark.skipif(KCAT is None, reason="kcat is not installed")
def test_kcat_line_from_the_docs_reads_alert_events(kafka_bootstrap: str, unique: str) -> None:
    """The kcat command in docs/alerts.md prints the topic's events, one JSON object per line."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "alerts.md").read_text()
    line = next(x for x in doc.splitlines() if x.strip().startswith("kcat -b ") and " -C " in x)
    args = shlex.split(line.strip())
    assert args[:2] == ["kcat", "-b"] and args[2].endswith(":9092"), args  # _kcat points -b here
    ev = alert(f"kcat-{unique}", "firing", 0, 5)
    create_topic(kafka_bootstrap, ALERTS_TOPIC)
    produce(kafka_bootstrap, ev)
    out = _kcat(args, kafka_bootstrap)
    mock = None
    if out.returncode != 0 and "ApiVersionRequest failed: Local: Read underflow" in out.stderr:
        # Measured: Debian's kcat 1.7.1 (librdkafka 2.0.2) misparses the tagged fields of Tansu 0.6's
        # ApiVersions v3 response. Check the command line against librdkafka's mock cluster instead,
        # a real TCP listener that lives as long as this producer.
        mock = Producer({"test.mock.num.brokers": 1})
        mock.produce(ALERTS_TOPIC, key=ev.job.encode(), value=ev.to_json())
        assert mock.flush(10) == 0
        broker = next(iter(mock.list_topics(timeout=10).brokers.values()))
        out = _kcat(args, f"{broker.host}:{broker.port}")
    assert out.returncode == 0, out.stderr
    mine = [AlertEvent.from_json(x) for x in out.stdout.splitlines() if f"kcat-{unique}" in x]
    assert mine == [ev]


def test_shutdown_during_retries_leaves_the_batch_for_the_next_run(kafka_bootstrap: str, unique: str) -> None:
    """A stop while a webhook is failing commits nothing; the next run in the group re-delivers the event."""
    from tensorpulse.sinks.forwarder import Forwarder, ForwarderSettings
    from tensorpulse.sinks.http import JsonPoster, RetryPolicy
    from tensorpulse.sinks.webhook import WebhookSink

    topic = f"test.alerts.{unique}"
    create_topic(kafka_bootstrap, topic)
    ev = alert(f"retry-{unique}", "firing", 0, 3)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    p.produce(topic, value=ev.to_json())
    assert p.flush(10) == 0
    hook = Hook()
    statuses = [503]

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hook.got.append((None, json.loads(body)))
            self.send_response(statuses[0])
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook.server.RequestHandlerClass = Flaky
    settings = ForwarderSettings(kafka_bootstrap, f"g-{unique}", topic=topic, start="earliest")

    def run_until(n_requests: int) -> Forwarder:
        poster = JsonPoster(hook.url, RetryPolicy(max_attempts=50, base_delay=0.2, max_delay=0.4))
        fwd = Forwarder(settings, webhooks=[WebhookSink(poster)])
        t = threading.Thread(target=fwd.run, daemon=True)
        t.start()
        wait_for(lambda: len(hook.got) >= n_requests, 30, f"{n_requests} webhook request(s)")
        fwd.stop.set()
        t.join(20)
        assert not t.is_alive(), "the forwarder did not stop"
        return fwd

    first = run_until(2)  # failing: at least one retry, then stopped mid-retry
    assert first.stats.forwarded == 0 and first.webhooks[0].poster.stats.delivered == 0
    statuses[0] = 204
    seen = len(hook.got)
    second = run_until(seen + 1)
    assert second.stats.forwarded == 1 and second.webhooks[0].poster.stats.delivered == 1
    assert hook.got[-1][1]["id"] == ev.id


def _post(url: str, alerts: list[dict[str, Any]]) -> None:
    req = urllib.request.Request(
        f"{url}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200, r.status


def test_shipped_config_notifies_the_root_cause_only(tmp_path: Path, unique: str) -> None:
    """With deploy/'s Alertmanager config, a root cause firing for a job inhibits that job's
    follow-on alerts (any rank): only the root is notified; another job's follow-ons, without
    their root, are notified together in one notification for that job."""
    from tensorpulse.sinks.alertmanager import to_alertmanager

    shipped = Path(__file__).resolve().parents[2] / "deploy" / "alertmanager" / "alertmanager.yml"
    conf = yaml.safe_load(shipped.read_text())
    hook = Hook()
    for receiver in conf["receivers"]:
        receiver["webhook_configs"] = [{"url": hook.url, "send_resolved": True}]
    conf["route"]["group_wait"] = "1s"  # the shipped 10 s, shortened; grouping and inhibition as shipped

    def firing(job: str, rule: str, rank: int = 0, severity: str = "warning") -> dict[str, Any]:
        ev = AlertEvent(job, rule, "firing", 100, "train", severity, rank=rank, message=f"{rule} test")
        return to_alertmanager(ev, ends_at=ev.ts + 600)

    root_job, other_job = f"root-{unique}", f"other-{unique}"
    with run_alertmanager(tmp_path, yaml.safe_dump(conf)) as url:
        _post(url, [firing(root_job, "ExplodingTensor", severity="critical")])
        wait_for(lambda: am_alerts(url, root_job), 15, "the root cause in Alertmanager")
        _post(url, [firing(root_job, "DeadRelu"), firing(root_job, "WeightUpdateRatio", rank=1)])

        def suppressed() -> dict[str, list[str]] | None:
            held = am_alerts(url, root_job)
            states = {a["labels"]["alertname"]: a["status"]["inhibitedBy"] for a in held}
            return states if len(held) == 3 and states["DeadRelu"] and states["WeightUpdateRatio"] else None

        states = wait_for(suppressed, 15, "the follow-ons to be inhibited by the root")
        assert states["ExplodingTensor"] == []
        # Posted after the inhibited follow-ons: by the time this job's group is notified, theirs was due.
        _post(url, [firing(other_job, "WeightUpdateRatio"), firing(other_job, "LossNotDecreasing")])
        wait_for(
            lambda: any(b["groupLabels"].get("training_job") == other_job for _, b in hook.got),
            20,
            "the other job's notification",
        )
    notified = {
        (a["labels"]["training_job"], a["labels"]["alertname"]) for _, b in hook.got for a in b["alerts"]
    }
    assert notified == {
        (root_job, "ExplodingTensor"),
        (other_job, "WeightUpdateRatio"),
        (other_job, "LossNotDecreasing"),
    }
    (other,) = [b for _, b in hook.got if b["groupLabels"].get("training_job") == other_job]
    assert other["groupLabels"] == {"training_job": other_job} and len(other["alerts"]) == 2
