"""Worker settings: one frozen object, built once at the edge: `tensorpulse stream`'s options,
then TENSORPULSE_<SETTING> environment variables, then a settings file (`--config FILE` or
$TENSORPULSE_WORKER_CONFIG; YAML, or TOML for `.toml`), then defaults (tensorpulse/settings.py)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any, ClassVar, Literal

import platformdirs
from pydantic import AliasChoices, Field, field_validator

from tensorpulse.kafka import BOOTSTRAP_ENV, DEFAULT_BOOTSTRAP, client_config
from tensorpulse.redact import redact
from tensorpulse.settings import EdgeSettings
from tensorpulse.topics import DEFAULT_PREFIX, validate_prefix


def default_state_dir() -> Path:
    """The per-user folder for a worker's local state: $XDG_STATE_HOME/tensorpulse, else
    ~/.local/state/tensorpulse on Linux (platformdirs' user state dir elsewhere), so that a worker
    started in any folder finds its state again and leaves no `./state` behind."""
    return platformdirs.user_state_path("tensorpulse")


class WorkerSettings(EdgeSettings):
    """Everything a stream worker needs; immutable once built (`resolve()` at the edge)."""

    component: ClassVar[str] = "worker"
    config_env: ClassVar[str | None] = "TENSORPULSE_WORKER_CONFIG"
    #: Kafka client properties come from TENSORPULSE_KAFKA_<PROPERTY> (KafkaSettings), the file or
    #: the argument, merged by `resolve` (tensorpulse/settings.py).
    not_from_env: ClassVar[frozenset[str]] = frozenset({"kafka_config"})
    shown_notes: ClassVar[dict[str, str]] = {
        "kafka": "the Kafka client config: bootstrap, TENSORPULSE_KAFKA_* variables, kafka_config"
    }

    bootstrap: str = Field(
        DEFAULT_BOOTSTRAP, validation_alias=AliasChoices(BOOTSTRAP_ENV, "KAFKA_BOOTSTRAP")
    )
    group: str = "tensorpulse-workers"
    rules_file: Path | None = Field(None, validation_alias="TENSORPULSE_RULES")
    metrics_port: int | None = 9464
    metrics_addr: str = "127.0.0.1"
    #: RocksDB stores (rebuilt from the changelog topics when lost); default_state_dir() unless set.
    state_dir: Path = Field(default_factory=default_state_dir)
    topic_prefix: str = DEFAULT_PREFIX
    guarantee: Literal["exactly-once", "at-least-once"] = "exactly-once"
    commit_interval: float = 0.25
    #: How often the intake lists topics for new jobs: a new job's first record waits at most this.
    discovery_interval: float = Field(0.1, gt=0.0, le=60.0)
    #: Partitions of the group's steps topic: how many workers can share the processing. Fixed once
    #: the topic exists (a job's records must keep their partition); choose it for the largest group.
    partitions: int = Field(12, ge=1, le=1024)
    #: Shards of the intake (jobs are spread over the workers' intakes by shard).
    intake_shards: int = Field(64, ge=1, le=4096)
    #: Seconds after every rank of a job has sent its end record before the job's state is removed.
    state_retention_s: float = Field(3600.0, ge=0.0)
    #: Seconds without a record after which a job that never sent its end record (killed, lost)
    #: counts as ended: its firing alerts resolve, its series go, its state expires like an ended
    #: job's. Longer than every clock rule's threshold, so that a stall is reported first; 0: never.
    job_idle_timeout_s: float = Field(3600.0, ge=0.0)
    # Limits on what jobs send (docs/architecture.md#limits): beyond each, the excess is dropped,
    # logged and counted in tensorpulse_limit_exceeded_total{limit}; the worker goes on.
    #: Jobs this worker's intake reads at once. A job beyond it is not read (its records wait on
    #: its topic) until a job of this worker's shards goes away or another worker takes shards.
    max_jobs: int = Field(2000, ge=1)
    #: Records of one job that the intake copies ahead of their evaluation; beyond it the job's
    #: topic is paused until half of them are evaluated, so that a job with a backlog (thousands
    #: of ranks publishing at once) puts at most this many before another job's records
    #: (stream/flow.py; 200: a bystander alerted in 0.3 s p50 beside a 4,096-rank burst, against
    #: 0.7 s at 500 and 4-9 s unbounded, bench/ranks.py). 0: no bound.
    max_ahead_per_job: int = Field(200, ge=0)
    #: Ranks per job: records of rank >= this are dead-lettered (`too_many_ranks`). At most
    #: 16,384, so that a job's per-rank bookkeeping (its end times) stays far below Kafka's 1 MB
    #: message limit on the state changelog.
    max_ranks_per_job: int = Field(4096, ge=1, le=16_384)
    #: Distinct scalar names per job (and scalar series per job on /metrics): a scalar with a new
    #: name beyond it is dropped from the record before evaluation and export.
    max_scalars_per_job: int = Field(1024, ge=1, le=65_536)
    lag_interval: float = 5.0
    session_timeout_ms: int = 6000
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    jobs_regex: str | None = None
    retention_ms: int = 7 * 24 * 3600 * 1000
    #: Replication of the topics a worker creates (alerts, dead letters, control, its internal
    #: topics); 3 on a real cluster.
    replication_factor: int = Field(1, ge=1)
    kafka_config: dict[str, Any] = Field(default_factory=dict)
    #: Quix Streams' own log level.
    loglevel: str = Field("WARNING", validation_alias="TENSORPULSE_QUIX_LOGLEVEL")
    #: A stable identity of this worker (e.g. a StatefulSet pod name). With exactly-once it names
    #: the worker's transactional producer, so that a restarted worker fences its crashed former
    #: self and aborts the transaction it left open at once. Default: host name + state directory.
    worker_id: str | None = None
    #: How long a crashed worker's open transaction may hold back read_committed consumers
    #: when no worker with the same identity comes back (the broker aborts it after this, checking
    #: every 10 s by default). A transaction lasts one commit interval, so 10 s is ample; it also
    #: bounds how long a broker outage can last before the application restarts from its last commit.
    transaction_timeout_ms: int = 10_000

    def topic_config(self) -> dict[str, str]:
        """Broker config of every topic the worker creates: retention, and with replication 3 or
        more, `min.insync.replicas=2` (an acknowledged write then survives the loss of a broker).
        Quix derives its changelog topics from the steps topic without this key: set
        `min.insync.replicas=2` as the cluster default too (deploy/ does)."""
        config = {"retention.ms": str(self.retention_ms)}
        if self.replication_factor >= 3:
            config["min.insync.replicas"] = "2"
        return config

    def transactional_id(self) -> str:
        """`tensorpulse-<group>-<worker id>`, stable across restarts of the same worker."""
        ident = self.worker_id
        if not ident:
            digest = hashlib.sha1(f"{socket.gethostname()}:{self.state_dir.resolve()}".encode()).hexdigest()
            ident = f"{socket.gethostname()}-{digest[:10]}"
        return transactional_id_prefix(self.group) + ident

    def shown(self) -> dict[str, Any]:
        """These settings as `--show-config` prints them: every field, and the Kafka client config
        the worker's clients start from (`kafka_config`: the file's, TENSORPULSE_KAFKA_* and the
        argument's, merged by `resolve`), all redacted."""
        fields = self.model_dump(mode="json", exclude={"kafka_config"})
        return redact({**fields, "kafka": client_config(self.bootstrap, kafka=self.kafka_config)})

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return validate_prefix(v)

    @classmethod
    def from_env(cls, config_file: str | Path | None = None, **flags: Any) -> WorkerSettings:
        """Flags that are not None win; then TENSORPULSE_* environment variables; then the
        settings file (`config_file`, else $TENSORPULSE_WORKER_CONFIG); then defaults."""
        return cls.resolve(config_file, **flags)


#: {setting: its environment variable} (the preferred one; tensorpulse.settings.env_names lists all).
ENV = {field: names[0] for field, names in WorkerSettings.env_vars().items()}


def transactional_id_prefix(group: str) -> str:
    """What the transactional ids of a group's workers start with (a prefixed ACL covers them)."""
    return f"tensorpulse-{group}-"
