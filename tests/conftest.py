"""Shared fixtures. The broker is real Apache Kafka: KAFKA_BOOTSTRAP, else one started from its jars.

Users run Apache Kafka, so the integration suite does too: a single KRaft node started by
deploy/kafka/kafka_local.py (Java 17+ and Maven; the jars are fetched once into a cache). The
embedded Tansu broker of `tensorpulse broker`/`demo` is still available: TENSORPULSE_TEST_BROKER=tansu
runs the suite on it (fast to start, but not Kafka), and `tansu_bootstrap` serves the tests that are
about the embedded broker itself.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

KAFKA_LOCAL = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "kafka_local.py"


def load_kafka_local() -> ModuleType:
    """deploy/kafka/kafka_local.py as a module: it is a standalone script, not part of the package."""
    name = "tensorpulse_kafka_local"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, KAFKA_LOCAL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # one copy per session, whoever loads it (tests import it too)
    spec.loader.exec_module(module)
    return module


def _embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tensorpulse.broker import EmbeddedBroker

    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real Kafka broker for the whole session.

    KAFKA_BOOTSTRAP wins (any cluster you already run); TENSORPULSE_TEST_BROKER=tansu picks the
    embedded Tansu broker; otherwise a one-node Apache Kafka starts here (about 4 s, plus a one-off
    jar download that `python deploy/kafka/kafka_local.py fetch` can do ahead of time).
    """
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    choice = os.environ.get("TENSORPULSE_TEST_BROKER", "kafka").lower()
    if choice == "tansu":
        yield from _embedded_broker(tmp_path_factory)
        return
    if choice != "kafka":
        pytest.fail(f"TENSORPULSE_TEST_BROKER={choice!r}: use 'kafka' (the default) or 'tansu'")
    cluster = start_kafka(1, tmp_path_factory.mktemp("kafka"))
    try:
        yield cluster.bootstrap
    finally:
        cluster.stop()


def start_kafka(nodes: int, workdir: Path, **options: Any) -> Any:
    """A started `KafkaCluster` (`options`: its keyword arguments, e.g. secure=True), or a test
    failure that says how to get Java and Maven."""
    kafka_local = load_kafka_local()
    try:
        return kafka_local.KafkaCluster(nodes=nodes, workdir=workdir, **options).start()
    except kafka_local.KafkaUnavailable as exc:
        _no_kafka(exc)


def _no_kafka(exc: Exception) -> NoReturn:
    """Fail the test with what went wrong and how to get Java and Maven."""
    pytest.fail(
        "the integration tests start Apache Kafka from its Maven jars and could not:\n"
        f"{exc}\n"
        "Install Java 17+ and Maven (Debian: apt-get install openjdk-17-jdk-headless maven) and run "
        "`python deploy/kafka/kafka_local.py fetch`, or point KAFKA_BOOTSTRAP=host:port at a running "
        "broker (TENSORPULSE_TEST_BROKER=tansu runs the suite on the embedded Tansu broker instead).",
        pytrace=False,
    )


@pytest.fixture
def kafka_cluster(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Starts a private Apache Kafka cluster of N nodes for one test (`kafka_cluster(3)`).

    For tests that kill brokers, which must not take the session's broker with them, or that need
    a secured one (`kafka_cluster(1, secure=True, users={...})`: KafkaCluster's options). Whatever
    it started is SIGKILLed at the end: its data is the test's alone; the logs stay in tmp_path.
    """
    started: list[Any] = []

    def start(nodes: int, **options: Any) -> Any:
        cluster = start_kafka(nodes, tmp_path / f"kafka-{len(started)}", **options)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.stop(graceful=False)


@dataclass
class RelayedKafka:
    """A one-node Apache Kafka that clients reach only through `relay` (tensorpulse.netproxy's
    TcpRelay): `relay.cut()` is a broker gone, `relay.slow(s)` a slow link, with the data kept."""

    bootstrap: str
    relay: Any


@pytest.fixture(scope="module")
def _relayed_kafka_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayedKafka]:
    """The Apache Kafka node behind a relay that the tests of one module share (`relayed_kafka`).

    The node advertises the relay's port, so every connection a client makes (bootstrap,
    partition leaders, the group and transaction coordinators) goes through the relay; the node
    itself listens on another port. One node per module, not per test: a start costs 4 s or more,
    and the tests that share it name their topics, groups and jobs uniquely."""
    from tensorpulse.broker import free_port
    from tensorpulse.netproxy import TcpRelay

    kafka_local = load_kafka_local()
    workdir = tmp_path_factory.mktemp("kafka-relayed")
    for attempt in range(3):
        front, back = free_port(), free_port()
        relay = TcpRelay(("127.0.0.1", front), ("127.0.0.1", back)).start()
        try:
            cluster = kafka_local.KafkaCluster(
                nodes=1,
                workdir=workdir / f"attempt-{attempt}",
                port=back,
                extra_config={"advertised.listeners": f"PLAINTEXT://127.0.0.1:{front}"},
            ).start()
            break
        except kafka_local.KafkaUnavailable as exc:
            relay.stop()
            # A free port is free when asked, not when Kafka binds it seconds later: another
            # process of the suite (a worker's metrics, another broker) may take it in between.
            if "Address already in use" not in str(exc) or attempt == 2:
                _no_kafka(exc)
    try:
        yield RelayedKafka(f"127.0.0.1:{front}", relay)
    finally:
        relay.stop()
        cluster.stop(graceful=False)


@pytest.fixture
def relayed_kafka(_relayed_kafka_node: RelayedKafka) -> RelayedKafka:
    """A private Apache Kafka (not the session's broker) behind a relay, for a test of outages and
    slow links; the relay relays at once and accepts connections when the test starts, whatever
    the module's previous test left it doing."""
    _relayed_kafka_node.relay.slow(0)
    _relayed_kafka_node.relay.restore()
    return _relayed_kafka_node


@pytest.fixture(scope="session")
def tansu_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded Tansu broker (`tensorpulse broker`), whatever broker the rest of the suite uses."""
    yield from _embedded_broker(tmp_path_factory)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, job and consumer-group names of one test."""
    return uuid.uuid4().hex[:8]
