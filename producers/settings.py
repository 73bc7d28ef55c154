"""The hook's settings: what a training script can leave to its environment.

`Hook(...)` / `TorchHook(...)` resolve them once, in their constructor: an argument given in
code wins; a setting not given comes from `TENSORPULSE_<NAME>` (TENSORPULSE_JOB,
TENSORPULSE_BOOTSTRAP, TENSORPULSE_SAVE_INTERVAL, TENSORPULSE_ENABLED=0, ...), then from the
settings file named by `TENSORPULSE_CONFIG` (YAML, or TOML for `.toml`; keys as below), then
the default. So the same script can be pointed at another broker, job name or schedule, or
switched off, without editing it. `tensorpulse hook-config` prints what a hook would use here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import AliasChoices, Field, field_validator

from tensorpulse.kafka import BOOTSTRAP_ENV, DEFAULT_BOOTSTRAP, client_config
from tensorpulse.redact import redact
from tensorpulse.settings import EdgeSettings
from tensorpulse.topics import DEFAULT_PREFIX, validate_prefix

#: The hook's ways of measuring how a tensor changed (Hook's docstring describes them).
DeltaMethod = Literal["sketch", "exact"]
DELTA_METHODS: tuple[str, ...] = get_args(DeltaMethod)


class HookSettings(EdgeSettings):
    """Everything a hook takes from outside the training script; immutable once built."""

    component: ClassVar[str] = "hook"
    config_env: ClassVar[str | None] = "TENSORPULSE_CONFIG"
    #: Kafka client properties come from TENSORPULSE_KAFKA_<PROPERTY>, the file or the argument.
    not_from_env: ClassVar[frozenset[str]] = frozenset({"kafka_config"})
    shown_notes: ClassVar[dict[str, str]] = {
        "kafka": "the Kafka client config: bootstrap and TENSORPULSE_KAFKA_* variables"
    }

    #: The job id (every rank of a job gives the same). None: not given anywhere (an error).
    job: str | None = None
    bootstrap: str = Field(
        DEFAULT_BOOTSTRAP, validation_alias=AliasChoices(BOOTSTRAP_ENV, "KAFKA_BOOTSTRAP")
    )
    topic_prefix: str = DEFAULT_PREFIX
    #: This process's rank and the job's world size; torchrun and torch.distributed's env://
    #: rendezvous set RANK and WORLD_SIZE. None: 0 and 1.
    rank: int | None = Field(None, validation_alias=AliasChoices("TENSORPULSE_RANK", "RANK"))
    world_size: int | None = Field(None, validation_alias=AliasChoices("TENSORPULSE_WORLD_SIZE", "WORLD_SIZE"))
    #: Save every n-th step (a `save_config` argument wins over it).
    save_interval: int = Field(1, ge=1)
    #: False: the hook records and publishes nothing (TENSORPULSE_ENABLED=0).
    enabled: bool = True
    #: Follow the job's control topic for stop/checkpoint actions.
    listen_for_actions: bool = True
    #: Saved train steps that add p5/p95 of the gradients.
    quantile_steps: int = Field(10, ge=0)
    #: Every n-th saved train step reports how tracked tensors changed.
    delta_every: int = Field(10, ge=1)
    delta_method: DeltaMethod = "sketch"
    #: librdkafka properties of the hook's clients: the settings file's `kafka_config`, then
    #: TENSORPULSE_KAFKA_<PROPERTY>, then the hook's `kafka_config` argument, property by property.
    kafka_config: dict[str, Any] = Field(default_factory=dict)

    def shown(self) -> dict[str, Any]:
        """Every setting and the Kafka client config the hook's clients start from, redacted."""
        fields = self.model_dump(mode="json", exclude={"kafka_config"})
        return redact({**fields, "kafka": client_config(self.bootstrap, kafka=self.kafka_config)})

    @field_validator("save_interval", "quantile_steps", "delta_every", "rank", "world_size", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        """True is not a step count (pydantic would take it as 1)."""
        if isinstance(v, bool):
            raise ValueError("expected an integer, not a boolean")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return validate_prefix(v)


__all__ = ["DELTA_METHODS", "DeltaMethod", "HookSettings"]
