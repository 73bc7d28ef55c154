"""The configuration of deploy/kafka/kafka_local.py's nodes: server properties, the log4j2 file, and
for a secured cluster the SCRAM passwords and the TLS certificate.

Split from kafka_local.py so that what a node is configured with is apart from starting and
stopping nodes; pure functions of their arguments, apart from the two that write the secrets.
Standard library only, like the rest of this folder.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Mapping
from pathlib import Path

from kafka_fetch import KafkaUnavailable, java

# Each JVM is small on purpose: the tests run on 2-core machines next to the workers they test.
# SerialGC has no GC threads to compete with; the heap holds a few small test topics easily.
JVM_OPTS = ("-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-Djava.awt.headless=true")
LOG4J2 = """\
status = error
name = tensorpulse-kafka-local
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${{sys:tensorpulse.kafka.log}}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
# The start line that KafkaCluster waits for, whatever the level of the rest.
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""

# -- the secured listener (KafkaCluster(secure=True)) ----------------------------------------------
#: Clients authenticate with this SASL mechanism over TLS on the secured listener.
SASL_MECHANISM = "SCRAM-SHA-512"
#: Users every secured cluster has, both super users: the nodes' own (inter-broker traffic, which
#: also carries the transaction markers a node sends to itself) and an administrator's.
BROKER_USER = "broker"
ADMIN_USER = "admin"
#: Subject of the generated certificate. Nodes also present it to the controllers (mutual TLS), whose
#: listener cannot take SCRAM: that makes this subject the nodes' principal there, a super user too.
NODE_SUBJECT = "CN=tensorpulse-kafka-local"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
SECURE_LISTENER = "SASL_SSL"
SECRETS_FILE = "secure.json"


def server_properties(
    i: int, ports: list[int], controller_ports: list[int], data_dir: Path
) -> dict[str, str]:
    """Node `i`'s plain-text server properties, for a cluster of `len(ports)` nodes."""
    n = len(ports)
    rf = str(min(3, n))
    isr = str(min(2, n))
    voters = ",".join(f"{j + 1}@127.0.0.1:{cp}" for j, cp in enumerate(controller_ports))
    return {
        "process.roles": "broker,controller",
        "node.id": str(i + 1),
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://127.0.0.1:{ports[i]},CONTROLLER://127.0.0.1:{controller_ports[i]}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{ports[i]}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # Internal topics replicated as far as the cluster allows, and few partitions of them:
        # 50 partitions of __consumer_offsets cost seconds per start and nothing is gained.
        "offsets.topic.replication.factor": rf,
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": isr,
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": isr,
        "share.coordinator.state.topic.num.partitions": "4",
        "default.replication.factor": rf,
        # 1 (Kafka's default) so that a replication-factor-1 topic still takes acks=all writes;
        # a topic that wants more says so in its own config, as production topics do.
        "min.insync.replicas": "1",
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        # Tests form groups all the time; Kafka's 3 s wait for more members is pure delay here.
        "group.initial.rebalance.delay.ms": "0",
        # A killed node is fenced, and its partitions get new leaders, after this session timeout;
        # a restarted node cannot register again before it either. Kafka's 9 s would make every
        # failover test wait; 4 s still rides out a busy 2-core machine.
        "broker.session.timeout.ms": "4000",
        "broker.heartbeat.interval.ms": "1000",
        # Fewer threads and a smaller cleaner buffer (128 MB by default) for small machines.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.cleaner.threads": "1",
    }


def secure_properties(
    i: int,
    ports: list[int],
    controller_ports: list[int],
    broker_password: str,
    keystore: Path,
    keystore_password: str,
    ca: Path,
) -> dict[str, str]:
    """Clients on SASL_SSL (SCRAM only), the controllers on mutual TLS, every request authorized."""
    listener = SECURE_LISTENER.lower()
    login = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{BROKER_USER}" password="{broker_password}";'
    )
    return {
        "listeners": f"{SECURE_LISTENER}://127.0.0.1:{ports[i]},CONTROLLER://127.0.0.1:{controller_ports[i]}",
        "advertised.listeners": f"{SECURE_LISTENER}://127.0.0.1:{ports[i]}",
        "listener.security.protocol.map": f"{SECURE_LISTENER}:SASL_SSL,CONTROLLER:SSL",
        "inter.broker.listener.name": SECURE_LISTENER,
        "sasl.enabled.mechanisms": SASL_MECHANISM,
        "sasl.mechanism.inter.broker.protocol": SASL_MECHANISM,
        f"listener.name.{listener}.{SASL_MECHANISM.lower()}.sasl.jaas.config": login,
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(keystore),
        "ssl.keystore.password": keystore_password,
        "ssl.key.password": keystore_password,
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(ca),
        "listener.name.controller.ssl.client.auth": "required",
        "authorizer.class.name": AUTHORIZER,
        "super.users": ";".join(f"User:{u}" for u in (BROKER_USER, ADMIN_USER, NODE_SUBJECT)),
        "allow.everyone.if.no.acl.found": "false",
    }


def load_or_make_secrets(workdir: Path, users: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The SCRAM passwords by user and the keystore password: made on first use of `workdir`
    (secure.json, readable by its owner only), then reused; a reused directory needs the same `users`."""
    saved_path = workdir / SECRETS_FILE
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        differ = sorted(u for u, pw in users.items() if saved["users"].get(u) != pw)
        if differ:
            raise KafkaUnavailable(
                f"{workdir} was formatted with other SCRAM users or passwords ({', '.join(differ)}): "
                "use another directory"
            )
    else:
        made = {BROKER_USER: secrets.token_hex(16), ADMIN_USER: secrets.token_hex(16), **users}
        saved = {"keystore": secrets.token_hex(16), "users": made}
        fd = os.open(saved_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(saved, f, indent=1)
    return dict(saved["users"]), saved["keystore"]


def make_certificate(keystore: Path, ca: Path, password: str, timeout: float) -> None:
    """A self-signed key pair for 127.0.0.1 (keytool ships with every JDK and JRE), and its PEM."""
    tls = keystore.parent
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    keystore.unlink(missing_ok=True)
    keytool = str(Path(java()).resolve().parent / "keytool")
    store = ["-keystore", str(keystore), "-storetype", "PKCS12", "-storepass", password]
    steps = [
        [keytool, "-genkeypair", "-alias", "node", "-keyalg", "EC", "-groupname", "secp256r1",
         "-validity", "30", "-dname", NODE_SUBJECT, "-ext", "SAN=ip:127.0.0.1,dns:localhost",
         "-keypass", password, *store],
        [keytool, "-exportcert", "-rfc", "-alias", "node", "-file", str(ca), *store],
    ]  # fmt: skip
    for cmd in steps:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            raise KafkaUnavailable(
                f"keytool could not make the test certificate (exit {run.returncode}): "
                f"{(run.stdout + run.stderr)[-2000:]}"
            )
