"""One redaction function hides every kind of secret a configuration, a header or a URL can carry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from sentinels import SECRET_ENV, SENTINEL

from tensorpulse.cli import main
from tensorpulse.kafka import redact as kafka_redact
from tensorpulse.redact import MASK, redact, redact_text, redact_url
from tensorpulse.sinks.http import JsonPoster, RetryPolicy


@pytest.mark.parametrize(
    "key",
    [
        "sasl.password",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.client.secret",
        "sasl.jaas.config",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "Authorization",
        "Proxy-Authorization",
        "X-Api-Key",
        "X-Auth-Token",
        "Cookie",
        "aws_secret_access_key",
    ],
)
def test_secret_names_are_masked(key: str) -> None:
    """Each secret-named setting or header shows as *** whatever its value."""
    shown = redact({key: SENTINEL, "bootstrap.servers": "kafka:9093", "sasl.username": "job-1"})
    assert shown == {key: MASK, "bootstrap.servers": "kafka:9093", "sasl.username": "job-1"}


def test_urls_lose_their_password_wherever_they_are() -> None:
    """user:password@ in any value (bootstrap lists, URLs in text, nested settings) is masked."""
    conf = {
        "bootstrap.servers": f"SASL_SSL://tp:{SENTINEL}@kafka-1:9093,kafka-2:9093",
        "nested": {"receiver": f"https://bot:{SENTINEL}@hooks.example/x", "headers": {"Authorization": SENTINEL}},
        "urls": [f"http://a:{SENTINEL}@h/p"],
    }
    shown = redact(conf)
    assert SENTINEL not in repr(shown)
    assert shown["bootstrap.servers"] == f"SASL_SSL://tp:{MASK}@kafka-1:9093,kafka-2:9093"
    assert shown["nested"]["receiver"] == f"https://bot:{MASK}@hooks.example/x"
    assert redact_text(f"failed: <urlopen http://u:{SENTINEL}@h>") == f"failed: <urlopen http://u:{MASK}@h>"
    assert redact_url(f"https://bot:{SENTINEL}@hooks.example/services/{SENTINEL}?t={SENTINEL}") == (
        "https://hooks.example"
    )


def test_kafka_redact_is_the_one_function() -> None:
    """tensorpulse.kafka.redact is tensorpulse.redact.redact (one definition of what is secret)."""
    assert kafka_redact is redact


def test_show_config_prints_no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`tensorpulse stream --show-config` with every secret set (environment and settings file) shows ***."""
    for var, value in SECRET_ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("TENSORPULSE_BOOTSTRAP", f"SASL_SSL://tp:{SENTINEL}@kafka:9093")
    settings = tmp_path / "worker.yaml"
    settings.write_text(yaml.safe_dump({"kafka_config": {"sasl.jaas.config": SENTINEL, "client.id": "w1"}}))
    result = CliRunner().invoke(main, ["stream", "--show-config", "--config", str(settings)])
    assert result.exit_code == 0, result.output
    assert SENTINEL not in result.output
    shown = yaml.safe_load(result.stdout)
    kafka = shown["kafka"]
    assert kafka["client.id"] == "w1" and kafka["sasl.jaas.config"] == MASK
    for var in SECRET_ENV:
        assert kafka[var[len("TENSORPULSE_KAFKA_") :].lower().replace("_", ".")] == MASK
    assert shown["bootstrap"] == f"SASL_SSL://tp:{MASK}@kafka:9093"


@pytest.mark.parametrize("credential", ["url", "header"])
def test_webhook_failures_log_no_credential(caplog: pytest.LogCaptureFixture, credential: str) -> None:
    """A failing receiver with a token in its path and query and either user:password in its URL or
    an Authorization header (both at once are refused): the retry and failure lines name only
    scheme, host and port."""
    caplog.set_level(logging.DEBUG)
    userinfo = f"bot:{SENTINEL}@" if credential == "url" else ""
    poster = JsonPoster(
        f"http://{userinfo}127.0.0.1:9/hook/{SENTINEL}?token={SENTINEL}",
        policy=RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0, timeout=2.0),
        headers={"Authorization": f"Bearer {SENTINEL}"} if credential == "header" else {},
        sleep=lambda seconds: False,
    )
    delivery = poster.post({"id": "x"})
    assert not delivery.ok and delivery.attempts == 2
    assert "delivery failed" in caplog.text and "http://127.0.0.1:9" in caplog.text
    assert SENTINEL not in caplog.text and SENTINEL not in delivery.error
