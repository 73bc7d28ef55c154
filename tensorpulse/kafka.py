"""Kafka client settings for every tensorpulse client (hook, worker, CLI), built in one place.

Precedence: explicit arguments, then environment, then defaults. Any librdkafka property can be
passed through the environment as TENSORPULSE_KAFKA_<PROPERTY> with dots written as underscores,
e.g. TENSORPULSE_KAFKA_SECURITY_PROTOCOL=SSL, TENSORPULSE_KAFKA_SASL_MECHANISM=SCRAM-SHA-512.
Those variables are read at the edge, by `tensorpulse.settings.KafkaSettings`: the hook's and the
worker's settings hold them (`kafka_config`) and pass them here as `kafka`; only a client built
without settings (`kafka=None`: a CLI reader, a library call) has them resolved here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from tensorpulse.redact import redact
from tensorpulse.settings import KAFKA_ENV_PREFIX, KafkaSettings

BOOTSTRAP_ENV = "TENSORPULSE_BOOTSTRAP"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"

#: The Python logger that librdkafka's own log lines go to (see `client_config`).
CLIENT_LOGGER = "tensorpulse.kafka"


class ClientLog(logging.LoggerAdapter):
    """librdkafka's log lines as Python log records, instead of `%3|...|FAIL|...` lines on stderr.

    confluent-kafka calls `log(level, "%s [%s] %s", facility, client name, text)` with the syslog
    level mapped to Python's. A broker connection failure (facility FAIL) is one the client
    retries by itself: a warning, not an error (the operation that gives up reports its own error).
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if args and args[0] == "FAIL":
            level = min(level, logging.WARNING)
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


#: One adapter for every client; librdkafka calls it from the thread that polls the client.
_CLIENT_LOG = ClientLog(logging.getLogger(CLIENT_LOGGER))


def resolve_bootstrap(bootstrap: str | None) -> str:
    """The bootstrap servers: the argument, else $TENSORPULSE_BOOTSTRAP, else $KAFKA_BOOTSTRAP, else loopback:9092."""
    return (
        bootstrap or os.environ.get(BOOTSTRAP_ENV) or os.environ.get("KAFKA_BOOTSTRAP") or DEFAULT_BOOTSTRAP
    )


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """librdkafka properties given as TENSORPULSE_KAFKA_* environment variables (KafkaSettings)."""
    return KafkaSettings.from_environ(environ).properties


def client_config(
    bootstrap: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    kafka: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Base configuration shared by producers, consumers and admin clients: the bootstrap servers,
    the Kafka properties resolved at the edge (`kafka`: a hook's or worker's `kafka_config`; None:
    TENSORPULSE_KAFKA_* resolved now, for a client built without settings), then `overrides`.

    Its `logger` sends librdkafka's log lines to the `tensorpulse.kafka` Python logger (served
    when the client is polled), so they reach the terminal formatted, at their level, or not at all.
    """
    conf: dict[str, Any] = {"bootstrap.servers": resolve_bootstrap(bootstrap), "logger": _CLIENT_LOG}
    conf.update(KafkaSettings.from_environ().properties if kafka is None else kafka)
    if overrides:
        conf.update(overrides)
    return conf


#: `redact` (tensorpulse.redact) is re-exported here: every client's settings are shown through it.
__all__ = [
    "BOOTSTRAP_ENV",
    "CLIENT_LOGGER",
    "ClientLog",
    "DEFAULT_BOOTSTRAP",
    "KAFKA_ENV_PREFIX",
    "client_config",
    "env_overrides",
    "redact",
    "resolve_bootstrap",
]
