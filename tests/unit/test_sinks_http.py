"""HTTP sinks without a broker: the Alertmanager mapping, the firing set, and the retry policy."""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.events import AlertEvent
from tensorpulse.sinks.alertmanager import AlertmanagerSink, api_url, rfc3339, to_alertmanager
from tensorpulse.sinks.forwarder import Forwarder, ForwarderSettings, SeenIds, build_forwarder, parse_duration
from tensorpulse.sinks.http import DeliveryInterrupted, JsonPoster, RetryPolicy, parse_retry_after, safe_url
from tensorpulse.sinks.webhook import WebhookSink, parse_header


def event(**kw: Any) -> AlertEvent:
    base = dict(
        job="resnet-42",
        rule="ExplodingTensor",
        status="firing",
        step=161,
        mode="train",
        severity="critical",
        rank=3,
        tensors=("gradient/0.weight", "loss"),
        value=4096.0,
        threshold=0.0,
        message="non-finite values",
        action="stop",
        ts=1_795_464_010.5,
    )
    base.update(kw)
    return AlertEvent(**base)


def when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# -- the Alertmanager mapping ------------------------------------------------------------------


def test_mapping_puts_identity_in_labels_and_details_in_annotations() -> None:
    """Labels hold rule, training job, rank, severity and mode; step, tensors, value and threshold are annotations."""
    a = to_alertmanager(event(), extra_labels={"team": "ml"}, generator_url="https://g/d?job={job}&r={rule}")
    assert a["labels"] == {
        "team": "ml",
        "alertname": "ExplodingTensor",
        "training_job": "resnet-42",
        "rank": "3",
        "severity": "critical",
        "tensorpulse_mode": "train",
    }
    ann = a["annotations"]
    assert ann["step"] == "161" and ann["tensors"] == "gradient/0.weight, loss"
    assert ann["value"] == "4096" and ann["threshold"] == "0" and ann["action"] == "stop"
    assert ann["description"] == "non-finite values" and "resnet-42 rank 3" in ann["summary"]
    assert ann["alert_id"] == event().id
    assert when(a["startsAt"]) == pytest.approx(1_795_464_010.5, abs=1e-3)
    assert "endsAt" not in a
    assert a["generatorURL"] == "https://g/d?job=resnet-42&r=ExplodingTensor"


def test_mapping_omits_empty_annotations_and_extra_labels_cannot_override_identity() -> None:
    """A value-less event has no value/threshold annotation; `--label training_job=x` does not rename the job."""
    a = to_alertmanager(
        event(value=None, threshold=None, tensors=(), action="none"), extra_labels={"training_job": "x"}
    )
    assert a["labels"]["training_job"] == "resnet-42" and "job" not in a["labels"]
    assert not {"value", "threshold", "tensors", "action"} & set(a["annotations"])


def test_rfc3339_and_api_url() -> None:
    """Timestamps are UTC RFC 3339; a base URL gets /api/v2/alerts once."""
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert api_url("http://am:9093/") == "http://am:9093/api/v2/alerts"
    assert api_url("http://am:9093/api/v2/alerts") == "http://am:9093/api/v2/alerts"


class RecordingPoster(JsonPoster):
    """A poster that records batches instead of sending them."""

    def __init__(self) -> None:
        super().__init__("http://am.invalid:9093/api/v2/alerts")
        self.batches: list[Any] = []

    def post(self, body: Any) -> Any:  # type: ignore[override]
        self.batches.append(body)


def test_firing_alert_gets_a_future_ends_at_and_is_resent_each_interval() -> None:
    """Firing: endsAt = now + 4 x resend_interval; re-posted only once the interval has passed."""
    p = RecordingPoster()
    sink = AlertmanagerSink([p], resend_interval=60)
    sink.tick(now=1000.0)  # nothing firing yet: nothing posted
    assert p.batches == []
    sink.add([event(ts=1000.0)], now=1000.0)
    assert len(p.batches) == 1 and when(p.batches[0][0]["endsAt"]) == pytest.approx(1240.0)
    assert sink.tick(now=1030.0) == 0  # the empty tick at 1000 counts as a send
    assert sink.tick(now=1061.0) == 1
    assert when(p.batches[-1][0]["endsAt"]) == pytest.approx(1061.0 + 240)
    assert sink.tick(now=1062.0) == 0


def test_resolved_reuses_the_firing_labels_and_ends_now() -> None:
    """A resolve posts the labels the alert fired with (even if its mode differs) and endsAt = now."""
    p = RecordingPoster()
    sink = AlertmanagerSink([p], resend_interval=60)
    sink.add([event(ts=1000.0)], now=1000.0)
    sink.add(
        [event(status="resolved", mode="eval", step=170, ts=1100.0, value=None, action="none")], now=1105.0
    )
    fired, resolved = p.batches[0][0], p.batches[1][0]
    assert resolved["labels"] == fired["labels"]
    assert resolved["startsAt"] == fired["startsAt"]
    assert when(resolved["endsAt"]) == pytest.approx(1105.0)
    assert sink.firing == {}
    assert sink.tick(now=5000.0) == 0


def test_rebuild_applies_transitions_without_posting_and_ttl_expires_stale_alerts() -> None:
    """remember() folds events into the firing set silently; alerts older than firing_ttl stop being sent."""
    p = RecordingPoster()
    sink = AlertmanagerSink([p], resend_interval=60, firing_ttl=3600)
    sink.remember(event(rank=0, ts=0.0))
    sink.remember(event(rank=1, ts=5000.0))
    sink.remember(event(rank=2, ts=5000.0))
    sink.remember(event(rank=2, status="resolved", ts=5100.0))
    assert p.batches == [] and len(sink.firing) == 2
    assert sink.tick(now=6000.0) == 1  # rank 0 fired 6000 s ago (> ttl): dropped
    assert p.batches[0][0]["labels"]["rank"] == "1"


# -- retries against a real local HTTP server --------------------------------------------------


class Receiver:
    """A local HTTP server answering from a script of (status, headers) and recording requests."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((dict(self.headers), body))
                status, headers = receiver.script.pop(0) if receiver.script else (200, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/s3cr3t-path"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def poster(url: str, sleeps: list[float], **kw: Any) -> JsonPoster:
    policy = RetryPolicy(**{"max_attempts": 4, "base_delay": 0.5, "max_delay": 4.0, "timeout": 2.0, **kw})
    return JsonPoster(url, policy, sleep=lambda s: sleeps.append(s) or False, rng=random.Random(1))


def test_fails_twice_with_5xx_then_succeeds(receiver: Receiver) -> None:
    """Two 503s then a 200: delivered on attempt 3, after two growing backoff waits."""
    receiver.script = [(503, {}), (502, {})]
    sleeps: list[float] = []
    p = poster(receiver.url, sleeps)
    d = p.post({"a": 1})
    assert d.ok and d.attempts == 3 and d.status == 200
    assert len(receiver.requests) == 3 and json.loads(receiver.requests[-1][1]) == {"a": 1}
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0
    assert (p.stats.delivered, p.stats.failed, p.stats.retries) == (1, 0, 2)


def test_retry_after_is_honoured_on_429(receiver: Receiver) -> None:
    """A 429 with Retry-After: 7 waits 7 s (longer than the backoff) before the next attempt."""
    receiver.script = [(429, {"Retry-After": "7"})]
    sleeps: list[float] = []
    assert poster(receiver.url, sleeps).post({}).ok
    assert sleeps == [7.0]


def test_retry_after_is_capped(receiver: Receiver) -> None:
    """A Retry-After beyond max_retry_after waits only max_retry_after."""
    receiver.script = [(503, {"Retry-After": "3600"})]
    sleeps: list[float] = []
    assert poster(receiver.url, sleeps, max_retry_after=9.0).post({}).ok
    assert sleeps == [9.0]


def test_gives_up_after_max_attempts_and_counts_the_failure(receiver: Receiver, caplog: Any) -> None:
    """Always 500: exactly max_attempts requests, a failed Delivery, one error logged; no exception."""
    receiver.script = [(500, {})] * 10
    sleeps: list[float] = []
    p = poster(receiver.url, sleeps)
    with caplog.at_level(logging.WARNING):
        d = p.post({})
    assert not d.ok and d.attempts == 4 and d.status == 500
    assert len(receiver.requests) == 4 and len(sleeps) == 3
    assert all(s <= 4.0 for s in sleeps)
    assert p.stats.failed == 1 and p.stats.delivered == 0
    assert any(r.levelno == logging.ERROR and "after 4 attempt" in r.getMessage() for r in caplog.records)


def test_client_errors_are_not_retried(receiver: Receiver) -> None:
    """A 400 means the payload is wrong: one attempt, no wait."""
    receiver.script = [(400, {})]
    sleeps: list[float] = []
    d = poster(receiver.url, sleeps).post({})
    assert not d.ok and d.attempts == 1 and sleeps == []


def test_connection_errors_are_retried() -> None:
    """Nothing listening: every attempt fails with a connection error, retried up to the bound."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = srv.server_port
    srv.server_close()
    sleeps: list[float] = []
    d = poster(f"http://127.0.0.1:{port}/x", sleeps, max_attempts=3).post({})
    assert not d.ok and d.status is None and d.attempts == 3 and len(sleeps) == 2
    assert "Error" in d.error


def test_no_secret_reaches_the_logs(receiver: Receiver, caplog: Any) -> None:
    """The header value (from an env var) and the URL path are sent, never logged."""
    receiver.script = [(503, {})] * 5
    name, value = parse_header("Authorization: Bearer ${HOOK_TOKEN}", {"HOOK_TOKEN": "tok-XYZZY-123"})
    sleeps: list[float] = []
    p = poster(receiver.url, sleeps, max_attempts=2)
    p.headers = {name: value}
    with caplog.at_level(logging.DEBUG):
        assert not p.post({"x": 1}).ok
    assert receiver.requests[0][0]["Authorization"] == "Bearer tok-XYZZY-123"
    assert caplog.records, "the failure was not logged at all"
    assert "tok-XYZZY" not in caplog.text and "s3cr3t" not in caplog.text
    assert safe_url(receiver.url) in caplog.text


def test_user_and_password_in_the_url_become_basic_auth(receiver: Receiver, caplog: Any) -> None:
    """`http://user:p%40ss@host/...` delivers: the credentials go in an Authorization header (decoded),
    not in the URL, and never in the logs."""
    url = receiver.url.replace("http://", "http://alert-bot:p%40ss-XYZZY@")
    receiver.script = [(503, {})]
    sleeps: list[float] = []
    p = poster(url, sleeps)
    with caplog.at_level(logging.DEBUG):
        assert p.post({"x": 1}).ok
    headers, body = receiver.requests[-1]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"alert-bot:p@ss-XYZZY").decode()
    assert json.loads(body) == {"x": 1} and p.url == receiver.url
    assert "XYZZY" not in caplog.text and "alert-bot" not in caplog.text


def test_credentials_in_the_url_and_an_authorization_header_are_refused() -> None:
    """Two credentials for one receiver is a mistake: a ConfigError, naming neither value."""
    with pytest.raises(ConfigError, match="user:password") as err:
        JsonPoster("https://u:secret-XYZZY@example.com/hook", headers={"authorization": "Bearer t"})
    assert "XYZZY" not in str(err.value)


def test_stop_during_a_retry_wait_interrupts() -> None:
    """When shutdown interrupts the wait, post raises DeliveryInterrupted (the batch is not committed)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = srv.server_port
    srv.server_close()
    p = JsonPoster(f"http://127.0.0.1:{port}/", RetryPolicy(max_attempts=3), sleep=lambda s: True)
    with pytest.raises(DeliveryInterrupted):
        p.post({})


def test_backoff_grows_is_capped_and_jittered() -> None:
    """Waits lie in [cap/2, cap] with cap = base x 2^(n-1) up to max_delay, and are not all equal."""
    pol = RetryPolicy(base_delay=1.0, max_delay=8.0)
    rng = random.Random(0)
    for n, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        waits = [pol.backoff(n, rng) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits)
        assert len(set(waits)) > 1


def test_policy_and_inputs_are_validated() -> None:
    """Bad attempts, URLs, headers, labels and durations are rejected with a message naming them."""
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="receiver URL"):
        JsonPoster("ftp://x/")
    with pytest.raises(ConfigError, match="Name: value"):
        parse_header("no colon here")
    with pytest.raises(ConfigError, match="label"):
        build_forwarder(ForwarderSettings(), webhook_urls=["http://x/"], labels=["bad label=1"])
    with pytest.raises(ConfigError, match="nothing to forward"):
        build_forwarder(ForwarderSettings())
    with pytest.raises(ConfigError, match="duration"):
        parse_duration("soon")
    assert parse_duration("90s") == 90 and parse_duration("24h") == 86400 and parse_duration("all") is None


def test_parse_retry_after_forms() -> None:
    """Delta-seconds and HTTP dates both parse; garbage gives None."""
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now=70.0) == pytest.approx(30.0)
    assert parse_retry_after("whenever") is None and parse_retry_after(None) is None


# -- the webhook sink and the forwarder's pieces -----------------------------------------------


def test_webhook_posts_the_topic_json(receiver: Receiver) -> None:
    """The webhook body is the event's topic JSON: it decodes back to the same event."""
    ev = event(value=float("inf"))
    WebhookSink(JsonPoster(receiver.url)).add([ev])
    body = receiver.requests[0][1]
    assert body == ev.to_json() and AlertEvent.from_json(body) == ev


def test_seen_ids_window_is_bounded() -> None:
    """Ids repeat as duplicates within the window; the oldest is forgotten beyond its size."""
    seen = SeenIds(3)
    assert [seen.check_and_add(i) for i in "abca"] == [False, False, False, True]
    seen.check_and_add("d")  # evicts b (a was refreshed)
    assert seen.check_and_add("b") is False and seen.check_and_add("a") is True
    assert len(seen._ids) == 3


def test_a_failing_sink_does_not_stop_the_others(receiver: Receiver, caplog: Any) -> None:
    """A sink that raises is logged and counted; the next sink still receives the events."""

    class Broken(WebhookSink):
        def add(self, events: Any) -> None:
            raise RuntimeError("bug in a sink")

    ok = WebhookSink(JsonPoster(receiver.url))
    fwd = Forwarder(ForwarderSettings(), webhooks=[Broken(ok.poster), ok])
    with caplog.at_level(logging.ERROR):
        fwd.deliver([event()])
    assert len(receiver.requests) == 1 and fwd.stats.sink_errors == 1
    assert "1 sink error" in fwd.summary()
