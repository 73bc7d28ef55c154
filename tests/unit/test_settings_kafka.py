"""Kafka client properties enter once, typed, at the edge (tensorpulse/settings.py, KafkaSettings):
TENSORPULSE_KAFKA_<PROPERTY> as before for every user of those variables, merged into the hook's and
the worker's settings, whose clients are then built from the settings alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.kafka import client_config
from tensorpulse.producers.settings import HookSettings
from tensorpulse.settings import KafkaSettings
from tensorpulse.stream.settings import WorkerSettings


def test_variables_become_properties_and_what_is_not_a_property_is_left_out() -> None:
    """Dots as underscores, lower-cased; the empty prefix, empty values and the test broker's
    TENSORPULSE_KAFKA_LIBS (a folder, not a client property) are not properties."""
    environ = {
        "TENSORPULSE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "TENSORPULSE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "TENSORPULSE_KAFKA_": "x",
        "TENSORPULSE_KAFKA_SSL_CA_LOCATION": "",
        "TENSORPULSE_KAFKA_LIBS": "/cache/kafka-4.4/libs",
        "TENSORPULSE_JOB": "not-kafka",
    }
    kafka = KafkaSettings.from_environ(environ)
    assert kafka.properties == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}
    assert kafka.origins_of == {
        "security.protocol": "TENSORPULSE_KAFKA_SECURITY_PROTOCOL",
        "sasl.mechanism": "TENSORPULSE_KAFKA_SASL_MECHANISM",
    }


def test_a_variable_that_names_no_property_is_refused_with_its_name() -> None:
    """A doubled underscore would give `sasl..password`: the error names the variable."""
    with pytest.raises(ConfigError, match="TENSORPULSE_KAFKA_SASL__PASSWORD"):
        KafkaSettings.from_environ({"TENSORPULSE_KAFKA_SASL__PASSWORD": "x"})


def test_the_libs_variable_no_longer_reaches_a_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """With TENSORPULSE_KAFKA_LIBS set (the test broker's jars), a client config had `libs`, which
    librdkafka refuses: no client could start in that shell."""
    monkeypatch.setenv("TENSORPULSE_KAFKA_LIBS", "/cache/kafka/libs")
    monkeypatch.setenv("TENSORPULSE_KAFKA_CLIENT_ID", "from-env")
    conf = client_config("b:9092")
    assert "libs" not in conf and conf["client.id"] == "from-env"


def test_a_client_built_from_settings_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kafka=` is what the edge resolved: the environment is not read again (nor added) below it."""
    monkeypatch.setenv("TENSORPULSE_KAFKA_CLIENT_ID", "from-env")
    conf = client_config("b:9092", {"linger.ms": 5}, kafka={"security.protocol": "SSL"})
    assert "client.id" not in conf
    assert conf["security.protocol"] == "SSL" and conf["linger.ms"] == 5
    assert client_config("b:9092")["client.id"] == "from-env"  # no settings: resolved where built


@pytest.mark.parametrize("model", [HookSettings, WorkerSettings])
def test_hook_and_worker_settings_hold_the_properties_file_then_environment_then_argument(
    model: type[HookSettings] | type[WorkerSettings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Property by property: the settings file's kafka_config, over it TENSORPULSE_KAFKA_*, over
    that the argument; the shown Kafka config says where they came from."""
    config = tmp_path / "settings.yaml"
    config.write_text("kafka_config:\n  client.id: from-file\n  linger.ms: '7'\n  acks: '1'\n")
    monkeypatch.setenv("TENSORPULSE_KAFKA_LINGER_MS", "9")
    monkeypatch.setenv("TENSORPULSE_KAFKA_ACKS", "all")
    settings = model.resolve(config, kafka_config={"acks": "0"})
    assert settings.kafka_config == {"client.id": "from-file", "linger.ms": "9", "acks": "0"}
    shown = settings.show()
    assert "TENSORPULSE_KAFKA_LINGER_MS" in shown and "argument kafka_config" in shown
    monkeypatch.delenv("TENSORPULSE_KAFKA_LINGER_MS")
    monkeypatch.delenv("TENSORPULSE_KAFKA_ACKS")
    assert model.resolve().kafka_config == {}
    built = model()  # built directly: reads nothing from the environment
    monkeypatch.setenv("TENSORPULSE_KAFKA_ACKS", "all")
    assert built.kafka_config == {} and "acks" not in built.shown()["kafka"]
