"""The Kafka ACLs a deployment needs, defined once: `tensorpulse acls` prints them as `kafka-acls`
lines or applies them through the Admin API, and docs/security.md's table is rendered from them
(a unit test keeps the two equal).

Why a definition in code: the worker's needs follow from what it runs (its intake's consumer
groups, Quix Streams' changelog topics, its transactional ids), and a hand-written list drifts
from that; a missing ACL shows up only on a secured cluster, as a worker that cannot start.
tests/integration/test_security_kafka.py runs a worker and a job with exactly these ACLs on a
cluster with TLS, SASL/SCRAM and the standard authorizer.

With ACLs off (no authorizer, or `allow.everyone.if.no.acl.found=true`) nothing here applies:
whoever can reach the cluster can write a job's control topic, and so stop the job.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError, TensorpulseError
from .kafka import client_config
from .producers.control import group_prefix as listener_group_prefix
from .stream.published import SCAN_GROUP_PREFIX
from .stream.settings import WorkerSettings, transactional_id_prefix
from .topics import (
    ALERTS_TOPIC,
    DEADLETTER_TOPIC,
    DEFAULT_PREFIX,
    GROUP_TOPIC_KINDS,
    control_prefix,
    control_topic,
    group_topic,
    reductions_prefix,
    reductions_topic,
)

Resource = Literal["topic", "group", "transactional-id"]
Pattern = Literal["literal", "prefixed"]

#: Operations in kafka-acls' spelling, and their name in confluent-kafka's `AclOperation`.
OPERATIONS = {
    "Read": "READ",
    "Write": "WRITE",
    "Create": "CREATE",
    "Describe": "DESCRIBE",
    "DescribeConfigs": "DESCRIBE_CONFIGS",
}
#: A resource type, its kafka-acls option and its name in confluent-kafka's `ResourceType`.
RESOURCES: dict[str, tuple[str, str]] = {
    "topic": ("--topic", "TOPIC"),
    "group": ("--group", "GROUP"),
    "transactional-id": ("--transactional-id", "TRANSACTIONAL_ID"),
}
#: Quix Streams names a changelog topic `changelog__<consumer group>--<topic>--<store>`.
QUIX_CHANGELOG_PREFIX = "changelog__{group}--"
DEFAULT_WORKER_PRINCIPAL = "User:tensorpulse-worker"
DEFAULT_GROUP: str = WorkerSettings.model_fields["group"].default
#: The example of docs/security.md's table.
EXAMPLE = {"job": "resnet-42", "producer": "User:job-resnet-42", "worker": DEFAULT_WORKER_PRINCIPAL}

# Operation sets that recur: the Quix application checks the configs of every topic it uses.
_QUIX_TOPIC = ("Read", "Write", "Describe", "Create", "DescribeConfigs")
_QUIX_OUTPUT = ("Write", "Describe", "Create", "DescribeConfigs")


class AclError(TensorpulseError):
    """The broker refused to create an ACL (no authorizer, not allowed); the message names it."""


@dataclass(frozen=True)
class Acl:
    """One allow rule: `principal` may do `operations` on the resource(s) `name` names."""

    principal: str
    resource: Resource
    name: str
    pattern: Pattern
    operations: tuple[str, ...]
    why: str

    def __post_init__(self) -> None:
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ConfigError(f"Expected operations among {sorted(OPERATIONS)} but got {self.operations!r}")
        if self.resource not in RESOURCES:
            raise ConfigError(f"Expected a resource among {sorted(RESOURCES)} but got {self.resource!r}")


def principal(name: str) -> str:
    """`User:<name>` for a bare name; a name that already has a type (`User:x`) is kept."""
    name = name.strip()
    if not name or name.startswith(":") or name.endswith(":"):
        raise ConfigError(f"Expected a principal such as 'User:job-42' but got {name!r}")
    return name if ":" in name else f"User:{name}"


def job_acls(job: str, producer: str, prefix: str = DEFAULT_PREFIX) -> list[Acl]:
    """What a training job's hook needs, and nothing of any other job's.

    It writes its own reductions topic and reads its own control topic by direct assignment.
    Its listener's consumer group commits nothing but must find its coordinator (Describe; the
    listener works without, logging the refusal). Write implies idempotent writes (Kafka 2.8+),
    so no cluster ACL. `Create` lets the hook create its two topics when no worker has yet;
    drop it where an operator creates topics.
    """
    p = principal(producer)
    return [
        Acl(p, "topic", reductions_topic(job, prefix), "literal", ("Write", "Describe", "Create"),
            "the hook publishes the job's records"),
        Acl(p, "topic", control_topic(job, prefix), "literal", ("Read", "Describe", "Create"),
            "the hook reads the job's stop and checkpoint actions"),
        Acl(p, "group", listener_group_prefix(job), "prefixed", ("Describe",),
            "the hook's control listener finds its group coordinator (no commits)"),
    ]  # fmt: skip


def worker_acls(worker: str, group: str = DEFAULT_GROUP, prefix: str = DEFAULT_PREFIX) -> list[Acl]:
    """What the stream workers of consumer group `group` need (one principal for all of them)."""
    w = principal(worker)
    internal = {kind: group_topic(kind, group) for kind in GROUP_TOPIC_KINDS}
    acls = [
        Acl(w, "topic", reductions_prefix(prefix), "prefixed", ("Read", "Describe"),
            "the intake finds and reads every job's records"),
        Acl(w, "topic", control_prefix(prefix), "prefixed", _QUIX_OUTPUT,
            "actions (stop) go to the job's control topic, created if missing"),
        Acl(w, "topic", ALERTS_TOPIC, "literal", _QUIX_TOPIC,
            "alerts; read back at start so that none is published twice"),
        Acl(w, "topic", DEADLETTER_TOPIC, "literal", _QUIX_OUTPUT, "records that cannot be evaluated"),
    ]  # fmt: skip
    steps, intake, crossrun = internal["steps"], internal["intake"], internal["crossrun"]
    acls += [
        Acl(w, "topic", steps, "literal", _QUIX_TOPIC, "every job's records, copied by the intake, keyed by job"),
        Acl(w, "topic", intake, "literal", ("Read", "Describe", "Create"),
            "the intake's shards: its partitions are spread over the workers"),
        Acl(w, "topic", crossrun, "literal", _QUIX_TOPIC, "records forwarded to the cross-run rules of other jobs"),
    ]  # fmt: skip
    acls += [
        Acl(w, "topic", QUIX_CHANGELOG_PREFIX.format(group=group), "prefixed", _QUIX_TOPIC,
            "the changelogs of the rules' state (Quix Streams)"),
        Acl(w, "group", group, "prefixed", ("Read",),
            f"the group itself and its intake's groups ({group}.intake, {group}.intake-shards)"),
        Acl(w, "group", SCAN_GROUP_PREFIX, "prefixed", ("Describe",),
            "the start-up scan of the alerts topic finds its coordinator (no commits)"),
        Acl(w, "transactional-id", transactional_id_prefix(group), "prefixed", ("Write", "Describe"),
            "exactly-once: one transactional id per worker"),
    ]  # fmt: skip
    return acls


def deployment_acls(
    jobs: Iterable[tuple[str, str]],
    worker: str | None = DEFAULT_WORKER_PRINCIPAL,
    group: str = DEFAULT_GROUP,
    prefix: str = DEFAULT_PREFIX,
) -> list[Acl]:
    """The ACLs of the workers (unless `worker` is None) and of each (job, producer principal)."""
    acls = [] if worker is None else worker_acls(worker, group, prefix)
    for job, producer in jobs:
        acls += job_acls(job, producer, prefix)
    return acls


def kafka_acls_lines(
    acls: Sequence[Acl], bootstrap: str, command_config: str | None = "admin.properties"
) -> list[str]:
    """One `kafka-acls.sh --add` command per ACL, quoted for a POSIX shell."""
    head = ["kafka-acls.sh", "--bootstrap-server", bootstrap]
    if command_config:
        head += ["--command-config", command_config]
    lines = []
    for acl in acls:
        words = [*head, "--add", "--allow-principal", acl.principal]
        for op in acl.operations:
            words += ["--operation", op]
        words += ["--resource-pattern-type", acl.pattern, RESOURCES[acl.resource][0], acl.name]
        lines.append(shlex.join(words))
    return lines


def acl_bindings(acls: Sequence[Acl]) -> list[Any]:
    """confluent-kafka `AclBinding`s (one per operation: the Admin API takes one at a time)."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    return [
        AclBinding(
            ResourceType[RESOURCES[acl.resource][1]],
            acl.name,
            ResourcePatternType[acl.pattern.upper()],
            acl.principal,
            "*",
            AclOperation[OPERATIONS[op]],
            AclPermissionType.ALLOW,
        )
        for acl in acls
        for op in acl.operations
    ]


def apply_acls(
    acls: Sequence[Acl],
    bootstrap: str | None = None,
    kafka_config: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> int:
    """Create the ACLs through the Admin API (existing ones are kept); returns how many bindings.

    The client's settings come from `client_config` (TENSORPULSE_KAFKA_* for an admin's SASL
    credentials), so the principal that applies them must be allowed to alter the cluster's ACLs.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    bindings = acl_bindings(acls)
    # The same order as acl_bindings: each binding's ACL and operation, to name it in an error.
    names = [
        f"{a.principal} {op} on {a.resource} {a.name!r} ({a.pattern})" for a in acls for op in a.operations
    ]
    conf = client_config(bootstrap, kafka_config)
    admin = AdminClient(conf)  # held until every answer is in: a dropped client cancels its requests
    futures = admin.create_acls(bindings, request_timeout=timeout)
    failed = []
    for name, binding in zip(names, bindings, strict=True):
        try:
            futures[binding].result(timeout)
        except KafkaException as exc:
            failed.append(f"{name}: {exc.args[0].str() if exc.args else exc}")
    if failed:
        raise AclError(
            f"the broker at {conf['bootstrap.servers']} refused {len(failed)} of {len(bindings)} ACLs "
            "(is an authorizer configured, and may this principal alter ACLs?):\n  " + "\n  ".join(failed)
        )
    return len(bindings)


def markdown_table(acls: Sequence[Acl]) -> str:
    """The ACLs as a Markdown table (docs/security.md holds the one of `EXAMPLE`)."""
    rows = ["| principal | resource | name | pattern | operations | why |", "|---|---|---|---|---|---|"]
    for a in acls:
        ops = ", ".join(a.operations)
        rows.append(f"| `{a.principal}` | {a.resource} | `{a.name}` | {a.pattern} | {ops} | {a.why} |")
    return "\n".join(rows) + "\n"


def example_table() -> str:
    """docs/security.md's table: the workers of the default group and one job."""
    return markdown_table(deployment_acls([(EXAMPLE["job"], EXAMPLE["producer"])], EXAMPLE["worker"]))
