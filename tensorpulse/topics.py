"""Topic names: one place that turns a job id into the topics it owns.

Job ids become part of Kafka topic names, so they are validated strictly: this is also
what keeps one job from writing into another job's topic name space (ACLs are granted
per prefix, see docs/security.md).
"""

from __future__ import annotations

import re

from .errors import ConfigError

DEFAULT_PREFIX = "tensorpulse."
ALERTS_TOPIC = "tensorpulse.alerts"
DEADLETTER_TOPIC = "tensorpulse.deadletter"

# Kafka allows [a-zA-Z0-9._-] up to 249 characters; we keep '.' for our own separators.
# Matched with fullmatch: `$` would also accept a trailing newline ("job\n").
_JOB_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"
_JOB_RE = re.compile(_JOB_PATTERN)
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")
_SANITISE_RE = re.compile(r"[^A-Za-z0-9_-]+")


def validate_job(job: str) -> str:
    """Return `job` unchanged if it is a valid job id, else raise ConfigError."""
    if not isinstance(job, str) or not _JOB_RE.fullmatch(job):
        raise ConfigError(
            f"invalid job id {job!r}: expected 1-128 characters of letters, digits, '_' or '-', "
            "starting with a letter or digit (try tensorpulse.topics.sanitise_job())"
        )
    return job


def sanitise_job(name: str) -> str:
    """Map any run name (e.g. 'resnet50 / lr=0.1') to a valid job id ('resnet50-lr-0-1')."""
    job = _SANITISE_RE.sub("-", name).strip("-_")[:128]
    if not job:
        raise ConfigError(f"cannot derive a job id from {name!r}: no letters or digits")
    return job


def validate_prefix(prefix: str) -> str:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(f"invalid topic prefix {prefix!r}: use at most 64 of [A-Za-z0-9._-]")
    return prefix


def reductions_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    """What every job's reductions topic starts with (a prefixed ACL covers all of them)."""
    return f"{validate_prefix(prefix)}reductions."


def control_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    """What every job's control topic starts with (a prefixed ACL covers all of them)."""
    return f"{validate_prefix(prefix)}control."


def reductions_topic(job: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The topic that carries a job's per-step statistics."""
    return reductions_prefix(prefix) + validate_job(job)


def control_topic(job: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The topic on which actions (stop, checkpoint) for a job are published."""
    return control_prefix(prefix) + validate_job(job)


def reductions_pattern(prefix: str = DEFAULT_PREFIX) -> re.Pattern[str]:
    """Matches (with fullmatch) reductions topics and captures the job id."""
    return re.compile(re.escape(reductions_prefix(prefix)) + f"({_JOB_PATTERN})")


def job_of_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    m = reductions_pattern(prefix).fullmatch(topic)
    return m.group(1) if m else None


def _group_part(group: str) -> str:
    """A consumer group name made safe for a topic name (Kafka allows [A-Za-z0-9._-])."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", group)[:200] or "default"


#: The kinds of a worker group's internal topics (see `group_topic`).
GROUP_TOPIC_KINDS = ("steps", "intake", "crossrun")


def group_topic(kind: str, group: str) -> str:
    """An internal topic of a worker group: `tensorpulse.<kind>.<group>`.

    The group is part of the name so that two groups on one cluster never read each other's
    internal records. Kinds: `steps` (every job's records, keyed by job), `intake` (the
    coordination topic whose partitions are the intake shards), `crossrun` (stream/crossrun.py).
    """
    return f"tensorpulse.{kind}.{_group_part(group)}"
