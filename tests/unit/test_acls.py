"""The ACL set of `tensorpulse acls`: confined to a job, complete for the worker, and the docs' table."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from tensorpulse import acls
from tensorpulse.cli import main
from tensorpulse.errors import ConfigError
from tensorpulse.producers.control import group_prefix
from tensorpulse.stream.crossrun import crossrun_topic
from tensorpulse.stream.intake import IntakeConfig
from tensorpulse.stream.settings import WorkerSettings
from tensorpulse.topics import ALERTS_TOPIC, DEADLETTER_TOPIC, control_topic, reductions_topic

ROOT = Path(__file__).resolve().parents[2]


def _covers(acl: acls.Acl, resource: str, name: str) -> bool:
    if acl.resource != resource:
        return False
    return name == acl.name if acl.pattern == "literal" else name.startswith(acl.name)


def _allowed(rules: list[acls.Acl], resource: str, name: str) -> set[str]:
    """The operations `rules` allow on one named resource."""
    return {op for a in rules if _covers(a, resource, name) for op in a.operations}


def test_security_doc_table_is_current() -> None:
    """docs/security.md holds the table that tensorpulse.acls generates for its example."""
    text = (ROOT / "docs" / "security.md").read_text()
    assert acls.example_table() in text


def test_job_acls_reach_only_the_jobs_own_topics() -> None:
    """A job may write its records and read its actions; nothing of another job, nothing shared."""
    rules = acls.job_acls("a", "job-a")
    assert {a.principal for a in rules} == {"User:job-a"}
    assert _allowed(rules, "topic", reductions_topic("a")) == {"Write", "Describe", "Create"}
    assert _allowed(rules, "topic", control_topic("a")) == {"Read", "Describe", "Create"}
    for name in (
        reductions_topic("a-b"),
        reductions_topic("b"),
        control_topic("a-b"),
        ALERTS_TOPIC,
        DEADLETTER_TOPIC,
    ):
        assert _allowed(rules, "topic", name) == set(), name
    assert all(a.pattern == "literal" for a in rules if a.resource == "topic")


def test_job_acls_cover_the_control_listeners_group() -> None:
    """The hook's listener groups fall under the job's group ACL (only Describe: they commit nothing)."""
    rules = acls.job_acls("a", "job-a")
    assert _allowed(rules, "group", group_prefix("a") + "0123abcd") == {"Describe"}
    assert _allowed(rules, "group", group_prefix("b") + "0123abcd") == set()


def test_worker_acls_cover_every_name_the_worker_uses(tmp_path: Path) -> None:
    """Each topic, group and transactional id of a worker of group g falls under one of its ACLs."""
    settings = WorkerSettings(group="g", state_dir=tmp_path, worker_id="w0")
    rules = acls.worker_acls("worker", "g")
    intake = IntakeConfig(
        group="g", topic_prefix=settings.topic_prefix, jobs_regex=None, shards=1, discovery_interval=1.0,
        max_record_bytes=1, topic_config={}, replication_factor=1, tick_interval=1.0, tick_horizon=1.0,
    )  # fmt: skip
    quix_topic = {"Read", "Write", "Describe", "Create", "DescribeConfigs"}
    for name in (
        intake.steps_topic,
        crossrun_topic("g"),
        ALERTS_TOPIC,
        "changelog__g--tensorpulse.steps.g--default",
    ):
        assert _allowed(rules, "topic", name) == quix_topic, name
    assert {"Read", "Create"} <= _allowed(rules, "topic", intake.coordination_topic)
    assert _allowed(rules, "topic", reductions_topic("any-job")) == {"Read", "Describe"}
    assert {"Write", "Create", "DescribeConfigs"} <= _allowed(rules, "topic", control_topic("any-job"))
    assert {"Write", "Create"} <= _allowed(rules, "topic", DEADLETTER_TOPIC)
    for group in ("g", "g.intake", "g.intake-shards"):
        assert _allowed(rules, "group", group) == {"Read"}, group
    assert _allowed(rules, "transactional-id", settings.transactional_id()) == {"Write", "Describe"}
    # Not another group's internal topics.
    assert _allowed(rules, "topic", crossrun_topic("other")) == set()


def test_kafka_acls_lines_are_one_command_per_acl() -> None:
    """Each printed line is a kafka-acls --add command with the ACL's principal, operations and resource."""
    rules = acls.job_acls("a", "User:CN=job a,O=x")
    lines = acls.kafka_acls_lines(rules, "kafka:9093")
    assert len(lines) == len(rules)
    words = shlex.split(lines[0])
    assert words[:7] == ["kafka-acls.sh", "--bootstrap-server", "kafka:9093", "--command-config",
                         "admin.properties", "--add", "--allow-principal"]  # fmt: skip
    assert words[7] == "User:CN=job a,O=x"
    assert words[words.index("--topic") + 1] == reductions_topic("a")
    assert [words[i + 1] for i, w in enumerate(words) if w == "--operation"] == [
        "Write",
        "Describe",
        "Create",
    ]


def test_acl_bindings_one_per_operation() -> None:
    """The Admin API gets one binding per operation, with the ACL's pattern type and resource type."""
    rules = acls.worker_acls("worker")
    bindings = acls.acl_bindings(rules)
    assert len(bindings) == sum(len(a.operations) for a in rules)
    txn = [b for b in bindings if b.restype.name == "TRANSACTIONAL_ID"]
    assert {b.operation.name for b in txn} == {"WRITE", "DESCRIBE"}
    assert all(b.resource_pattern_type.name == "PREFIXED" and b.permission_type.name == "ALLOW" for b in txn)


def test_invalid_input_is_refused_with_a_clear_message() -> None:
    """A bad job id, an empty principal or an unknown operation raise ConfigError."""
    with pytest.raises(ConfigError, match="invalid job id"):
        acls.job_acls("a\n", "job")
    with pytest.raises(ConfigError, match="principal"):
        acls.principal("User:")
    with pytest.raises(ConfigError, match="operations"):
        acls.Acl("User:x", "topic", "t", "literal", ("Alter",), "why")


def test_cli_prints_lines_and_the_table() -> None:
    """`tensorpulse acls` prints one line per ACL; --markdown the docs' table; nothing to do is an error."""
    runner = CliRunner()
    out = runner.invoke(main, ["acls", "--job", "a", "--producer-principal", "User:p", "--bootstrap", "k:1"])
    assert out.exit_code == 0, out.output
    expected = acls.deployment_acls([("a", "User:p")])
    assert out.output.splitlines() == acls.kafka_acls_lines(expected, "k:1")
    md = runner.invoke(
        main, ["acls", "--job", "resnet-42", "--producer-principal", "User:job-resnet-42", "--markdown"]
    )
    assert md.exit_code == 0 and md.output == acls.example_table()
    none = runner.invoke(main, ["acls", "--no-worker"])
    assert none.exit_code != 0 and "nothing to do" in none.output
