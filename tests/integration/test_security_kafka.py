"""Real security on Apache Kafka: TLS, SASL/SCRAM-SHA-512 and the standard ACL authorizer, with the
ACLs that `tensorpulse acls` applies and nothing else.

One secured single-node cluster (deploy/kafka/kafka_local.py, `secure=True`): every client
authenticates with its own SCRAM user over TLS, and a principal may do only what an ACL allows.
The job's producer principal publishes with the hook; the worker, under its own principal,
turns a NaN into an ExplodingTensor alert and a stop that the hook honours. The broker refuses
the producer everything outside its job (another job's records, another job's control topic,
the alerts topic), and a principal without ACLs cannot send a stop at all.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from tensorpulse import acls, wire
from tensorpulse.actions import encode_action
from tensorpulse.kafka import KAFKA_ENV_PREFIX
from tensorpulse.producers.hook import Hook
from tensorpulse.topics import ALERTS_TOPIC, DEADLETTER_TOPIC, control_topic, reductions_topic

from .helpers import wait_for, worker_process

pytestmark = pytest.mark.integration

PRODUCER, WORKER, STRANGER = "job-producer", "tp-worker", "stranger"
REFUSED = KafkaError.TOPIC_AUTHORIZATION_FAILED


def _env(settings: dict[str, str]) -> dict[str, str]:
    """librdkafka settings as the TENSORPULSE_KAFKA_* variables every tensorpulse command reads."""
    return {KAFKA_ENV_PREFIX + k.upper().replace(".", "_"): v for k, v in settings.items()}


def _delivery_error(bootstrap: str, conf: dict[str, str], topic: str, value: bytes, key: str) -> Any:
    """Produce one message as `conf`'s principal; the delivery report's error (None: written)."""
    producer = Producer({"bootstrap.servers": bootstrap, **conf, "message.timeout.ms": 15000})
    reports: list[Any] = []
    producer.produce(topic, value, key=key.encode(), on_delivery=lambda err, _msg: reports.append(err))
    producer.flush(20)
    assert reports, f"no delivery report for {topic} within 20 s"
    return reports[0]


def _consumer(bootstrap: str, conf: dict[str, str]) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            **conf,
            "group.id": f"probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )


def _fetch_errors(consumer: Consumer, topic: str, seconds: float) -> list[Any]:
    """Fetch `topic` from its start for up to `seconds` (less once the broker refuses it); its errors.

    A record is a test failure: whoever `consumer` authenticates as must not read this topic.
    """
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    deadline, errors = time.monotonic() + seconds, []
    while time.monotonic() < deadline and not any(e.code() == REFUSED for e in errors):
        msg = consumer.poll(0.2)
        if msg is not None:
            assert msg.error() is not None, f"read a record of {topic}: {msg.value()!r}"
            errors.append(msg.error())
    return errors


def _broker_acls(admin: AdminClient) -> set[tuple[str, str, str, str, str]]:
    """Every ACL the broker holds, as (principal, resource type, name, pattern type, operation)."""
    any_acl = AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY, AclPermissionType.ANY
    )
    return {
        (b.principal, b.restype.name, b.name, b.resource_pattern_type.name, b.operation.name)
        for b in admin.describe_acls(any_acl).result(20)
    }


def test_job_confined_and_worker_runs_on_exactly_the_listed_acls(
    kafka_cluster: Callable[..., Any], unique: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the ACLs of `tensorpulse acls --apply`, a job's records become an alert and a stop it
    honours; the broker refuses the job's principal other jobs' topics and the alerts, and a stop
    from a principal without ACLs."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Java is missing: the secured Apache Kafka cluster runs from its jars (Java 17+)")
    t0 = time.monotonic()
    cluster = kafka_cluster(
        1, secure=True, users={u: secrets.token_hex(12) for u in (PRODUCER, WORKER, STRANGER)}
    )
    bootstrap, admin_conf = cluster.bootstrap, cluster.client_settings()
    producer_conf, stranger_conf = cluster.client_settings(PRODUCER), cluster.client_settings(STRANGER)
    print(f"\nsecured cluster up in {cluster.started_s:.1f}s")
    job, other, group = f"sec-{unique}", f"other-{unique}", f"g-{unique}"

    # Another job, with a record on its topic (written by the admin, a super user).
    admin = AdminClient({"bootstrap.servers": bootstrap, **admin_conf})
    for fut in admin.create_topics(
        [NewTopic(t, 1, 1) for t in (reductions_topic(other), control_topic(other))]
    ).values():
        fut.result(20)
    record = wire.encode(
        job=other, rank=0, world=1, step=0, mode="train", ts=time.time(), scalars={"loss": 1.0}
    )
    assert _delivery_error(bootstrap, admin_conf, reductions_topic(other), record, other) is None

    # Without ACLs the job's principal may do nothing: the authorizer is on.
    assert _delivery_error(bootstrap, producer_conf, reductions_topic(job), record, job).code() == REFUSED

    # The ACLs from the command, applied through the Admin API with the admin's credentials.
    argv = ["acls", "--job", job, "--producer-principal", f"User:{PRODUCER}", "--worker-principal", WORKER,
            "--group", group, "--apply", "--bootstrap", bootstrap]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "tensorpulse", *argv],
        env={**os.environ, **_env(admin_conf)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    wanted = acls.deployment_acls([(job, f"User:{PRODUCER}")], f"User:{WORKER}", group)
    expected = {
        (b.principal, b.restype.name, b.name, b.resource_pattern_type.name, b.operation.name)
        for b in acls.acl_bindings(wanted)
    }
    assert _broker_acls(admin) == expected

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "defaults: false\n"
        "rules:\n"
        "  - rule: ExplodingTensor\n"
        "    action: stop\n"
        # A cross-run rule, so that the worker also runs its cross-run topic on these ACLs.
        "  - rule: SimilarAcrossRuns\n"
        f"    jobs: '^{job}$'\n"
        f"    params: {{other_trials: [{other}]}}\n"
    )
    worker_env = _env(cluster.client_settings(WORKER))
    with worker_process(
        bootstrap, tmp_path, group=group, rules=rules, jobs_regex=f"-{unique}$", env=worker_env
    ) as _:
        stopped = threading.Event()
        actions: list[dict[str, Any]] = []

        def on_action(action: dict[str, Any]) -> None:
            actions.append(action)
            stopped.set()

        # A record the worker cannot decode: it goes to the dead letters (the worker writes there).
        assert _delivery_error(bootstrap, producer_conf, reductions_topic(job), b"\x81\xa1v\x90", job) is None
        hook = Hook(job, bootstrap, kafka_config=producer_conf)
        hook.on_action(on_action)
        try:
            for step in range(6):
                weights = np.ones(64, dtype=np.float32)
                if step == 4:
                    weights[3] = np.nan  # the fault ExplodingTensor is for
                hook.record(step, {"dense/weight": weights}, collection="weights")
                hook.record_scalars(step, {"loss": 1.0 / (step + 1)})
                hook.publish(step, "train")
            assert hook.flush(20) == 0
            assert stopped.wait(60), "the worker's stop never reached the job's hook"
            assert actions[0]["action"] == "stop" and actions[0]["rule"] == "ExplodingTensor", actions
            assert actions[0]["step"] == 4
            assert hook.should_stop
            stats = hook.stats()
            assert stats["sent"] >= 6 and stats["dropped"] == 0 and stats["errors"] == 0, stats
            refused = [r.getMessage() for r in caplog.records if "AUTHORIZATION" in r.getMessage().upper()]
            assert not refused, f"the hook was refused something: an ACL is missing: {refused}"
        finally:
            hook.close(10)
        # The undecodable record went to the dead letters: the worker may write there.
        dead = _consumer(bootstrap, admin_conf)
        try:
            dead.assign([TopicPartition(DEADLETTER_TOPIC, 0, OFFSET_BEGINNING)])
            letters = wait_for(
                lambda: [m for m in dead.consume(100, 0.5) if m.error() is None], 30, "a dead letter"
            )
            assert any(json.loads(m.value())["key"] == job for m in letters), [m.value() for m in letters]
        finally:
            dead.close()

        # The broker refuses the job's principal everything outside its own job. Another job's
        # topic is not even described to it, so the client cannot fetch from it at all ...
        consumer = _consumer(bootstrap, producer_conf)
        try:
            meta = consumer.list_topics(reductions_topic(other), timeout=10).topics[reductions_topic(other)]
            assert meta.error is not None and meta.error.code() == REFUSED, meta.error
            assert not any(e.code() == REFUSED for e in _fetch_errors(consumer, reductions_topic(other), 3.0))
            # ... and even its own records, which it may describe, it may not read (no Read there).
            own_errors = _fetch_errors(consumer, reductions_topic(job), 20.0)
            assert any(e.code() == REFUSED for e in own_errors), own_errors
        finally:
            consumer.close()
        forged = encode_action("stop", other, rule="forged", reason="not yours")
        assert (
            _delivery_error(bootstrap, producer_conf, control_topic(other), forged, other).code() == REFUSED
        )
        assert _delivery_error(bootstrap, producer_conf, ALERTS_TOPIC, b"{}", job).code() == REFUSED
        # A stop needs Write on the control topic: a principal without ACLs has none, and the job's
        # own principal has only Read there.
        own = encode_action("stop", job, rule="forged", reason="no right")
        assert _delivery_error(bootstrap, stranger_conf, control_topic(job), own, job).code() == REFUSED
        assert _delivery_error(bootstrap, producer_conf, control_topic(job), own, job).code() == REFUSED

    log = (tmp_path / f"worker-{group}.log").read_text(errors="replace")
    assert "AUTHORIZATION" not in log.upper(), "the worker was refused something: an ACL is missing"
    print(f"end to end in {time.monotonic() - t0:.1f}s")


def test_apply_on_a_cluster_without_authorizer_fails_with_the_reason(kafka_bootstrap: str) -> None:
    """`apply_acls` on the plaintext test broker (no authorizer) raises AclError with the broker's reason."""
    with pytest.raises(acls.AclError, match="refused 7 of 7 ACLs") as failed:
        acls.apply_acls(acls.job_acls("a", "job-a"), kafka_bootstrap, timeout=20)
    assert "User:job-a Write on topic 'tensorpulse.reductions.a' (literal): " in str(failed.value)
