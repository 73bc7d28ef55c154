"""Settings enter at the edge, once, typed: arguments, then TENSORPULSE_* environment variables,
then an optional settings file (YAML, or TOML for `.toml`), then defaults.

Each component has one frozen settings model built on `EdgeSettings`: the hook's
(`tensorpulse.producers.settings.HookSettings`) and the worker's
(`tensorpulse.stream.settings.WorkerSettings`). `resolve()` gathers the layers itself instead of
letting pydantic-settings merge them silently, so that every value keeps where it came from
(`origins`, printed by `--show-config` / `tensorpulse hook-config`) and a bad value is reported
with the variable, file or argument that gave it. Built directly (`WorkerSettings(group=...)`),
a model reads nothing from the environment: only `resolve()` does.

The environment variable of a setting is `TENSORPULSE_<FIELD>` unless the field names its own
(`validation_alias`); `env_names()` lists every variable tensorpulse reads, in one place.

Kafka client properties (`TENSORPULSE_KAFKA_<PROPERTY>`, any librdkafka property) are read here
too, by `KafkaSettings`, and nowhere else: a model with a `kafka_config` field (the hook's, the
worker's) gets them merged into it by `resolve()` (its file, then the environment, then the
argument, property by property), and its clients are built from that field alone
(`tensorpulse.kafka.client_config(..., kafka=settings.kafka_config)`). A client built with no
settings of its own (a CLI reader, a library call) resolves `KafkaSettings` where it is built.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import AliasChoices, Field, PrivateAttr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)
from typing_extensions import Self

from tensorpulse.errors import ConfigError
from tensorpulse.redact import redact

#: What every setting's environment variable starts with.
ENV_PREFIX = "TENSORPULSE_"

#: TENSORPULSE_KAFKA_<PROPERTY>: a librdkafka property of every client, dots written as underscores.
KAFKA_ENV_PREFIX = "TENSORPULSE_KAFKA_"
#: Variables under that prefix that are not client properties (the test broker's jar folder,
#: deploy/kafka/kafka_local.py): passed on, librdkafka would refuse "libs" and no client would start.
KAFKA_ENV_RESERVED = frozenset({"TENSORPULSE_KAFKA_LIBS"})
#: A librdkafka property name: lower-case words joined by single dots.
_PROPERTY = re.compile(r"[a-z0-9]+(?:\.[a-z0-9]+)*\Z")

#: Variables that are not one model's field, with what they do.
OTHER_ENV = {
    f"{KAFKA_ENV_PREFIX}<PROPERTY>": "any librdkafka property of every client, dots written as "
    "underscores (TENSORPULSE_KAFKA_SECURITY_PROTOCOL=SASL_SSL); docs/security.md",
    "TENSORPULSE_NUMBA": "0: the hook reduces CPU tensors with torch ops instead of the numba kernel",
    "TENSORPULSE_<COMMAND>_<OPTION>": "any option of a `tensorpulse` command "
    "(TENSORPULSE_NOTIFY_ALERTMANAGER=http://am:9093); options win over it",
}

#: Set to "0" to keep the hook off the numba kernel (read by producers/stats_numba.py).
NUMBA_ENV = "TENSORPULSE_NUMBA"

#: Where a value came from when nothing gave it.
DEFAULT = "default"
#: The field of a model that holds its Kafka client properties (merged per property by `resolve`).
KAFKA_FIELD = "kafka_config"


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, minus the fields a model keeps out of the environment."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in getattr(self.settings_cls, "not_from_env", ()):
            return None, field_name, False
        return super().get_field_value(field, field_name)


class EdgeSettings(BaseSettings):
    """A component's settings: frozen, unknown names refused, built by `resolve()`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", populate_by_name=True, env_ignore_empty=True
    )

    #: The component's name in messages ("hook", "worker").
    component: ClassVar[str] = "component"
    #: The environment variable that names the settings file (None: only an explicit file).
    config_env: ClassVar[str | None] = None
    #: Fields that never come from the environment (set in code or in the file).
    not_from_env: ClassVar[frozenset[str]] = frozenset()
    #: Comments for `show()` keys that are not fields (derived values).
    shown_notes: ClassVar[dict[str, str]] = {}

    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what the constructor is given: `resolve()` reads the environment and the file."""
        return (init_settings,)

    # ------------------------------------------------------------------ names
    @classmethod
    def env_vars(cls) -> dict[str, tuple[str, ...]]:
        """{field: the environment variables that set it, first one preferred}."""
        out: dict[str, tuple[str, ...]] = {}
        for name, info in cls.model_fields.items():
            if name in cls.not_from_env:
                continue
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                out[name] = tuple(str(c) for c in alias.choices)
            elif isinstance(alias, str):
                out[name] = (alias,)
            else:
                out[name] = (f"{ENV_PREFIX}{name.upper()}",)
        return out

    @classmethod
    def _field_of(cls, key: str) -> str:
        """The field a key names: itself, or the field whose alias it is."""
        if key in cls.model_fields:
            return key
        for name, names in cls.env_vars().items():
            if key in names:
                return name
        return key

    # ------------------------------------------------------------------ building
    @classmethod
    def resolve(cls, config_file: str | Path | None = None, **args: Any) -> Self:
        """The settings from `args` (None: not given), then the environment, then the settings file
        (`config_file`, else the one named by `config_env`), then defaults; ConfigError names the
        argument, variable or file of a bad value."""
        path = config_file or (os.environ.get(cls.config_env) if cls.config_env else None)
        layers: list[tuple[str, Mapping[str, Any]]] = []
        file_values: Mapping[str, Any] = cls.read_file(Path(path)) if path else {}
        if path:
            layers.append((f"settings file {path}", file_values))
        env_values = _EnvSource(cls)()
        env_labels = {}
        for key in env_values:
            names = cls.env_vars().get(cls._field_of(key), (key,))
            used = next((n for n in names if os.environ.get(n)), names[0])
            env_labels[key] = f"environment variable {used}"
        layers.append(("environment", env_values))
        layers.append(("argument", {k: v for k, v in args.items() if v is not None}))
        merged: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for label, values in layers:
            for key, value in values.items():
                field = cls._field_of(key)
                merged.pop(field, None)
                merged[key if label == "environment" else field] = value
                origins[field] = env_labels[key] if label == "environment" else label
                if label == "argument":
                    origins[field] = f"argument {field}"
        if KAFKA_FIELD in cls.model_fields:
            merged[KAFKA_FIELD], origin = cls._kafka_layers(file_values, args.get(KAFKA_FIELD), path)
            if origin:
                origins[KAFKA_FIELD] = origin
        try:
            settings = cls(**merged)
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = cls._field_of(str(problem["loc"][0])) if problem["loc"] else ""
            where = origins.get(field, DEFAULT)
            raise ConfigError(
                f"{cls.component} setting {field}: {problem['msg']} (got {problem.get('input')!r}, from {where})"
            ) from exc
        settings._origins = origins
        return settings

    @classmethod
    def _kafka_layers(
        cls, file_values: Mapping[str, Any], argument: Any, path: str | Path | None
    ) -> tuple[dict[str, Any], str]:
        """The model's Kafka properties, merged property by property: the settings file's, then
        TENSORPULSE_KAFKA_* (KafkaSettings), then the argument's; and where they came from."""
        from_file = file_values.get(KAFKA_FIELD) or {}
        if not isinstance(from_file, Mapping):
            raise ConfigError(f"{cls.component} setting {KAFKA_FIELD}: expected a mapping of property: value")
        kafka = KafkaSettings.from_environ()
        merged = {**from_file, **kafka.properties, **(argument or {})}
        where = [
            *(["argument kafka_config"] if argument else []),
            *(f"environment variable {var}" for var in kafka.origins_of.values()),
            *([f"settings file {path}"] if from_file else []),
        ]
        return merged, ", ".join(where)

    @classmethod
    def read_file(cls, path: Path) -> dict[str, Any]:
        """The mapping in a settings file (TOML for `.toml`, else YAML), keys as the fields'
        names; ConfigError naming the file and the problem."""
        if not path.is_file():
            raise ConfigError(f"{path}: no such {cls.component} settings file")
        try:
            if path.suffix.lower() == ".toml":
                data = TomlConfigSettingsSource(cls, toml_file=path).toml_data
            else:
                data = YamlConfigSettingsSource(cls, yaml_file=path).yaml_data
        except Exception as exc:  # the YAML or TOML parser's own error, with its line
            raise ConfigError(f"{path}: cannot read {cls.component} settings: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: {cls.component} settings must be a mapping of setting: value")
        unknown = sorted(str(k) for k in data if cls._field_of(str(k)) not in cls.model_fields)
        if unknown:
            raise ConfigError(
                f"{path}: unknown {cls.component} setting(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(cls.model_fields))})"
            )
        return dict(data)

    # ------------------------------------------------------------------ showing
    @property
    def origins(self) -> dict[str, str]:
        """{field: where its value came from} for every field ("default" where nothing gave one)."""
        return {name: self._origins.get(name, DEFAULT) for name in type(self).model_fields}

    def shown(self) -> dict[str, Any]:
        """Every setting as it may be printed (secrets redacted)."""
        return redact(self.model_dump(mode="json"))

    def show(self) -> str:
        """The effective settings as YAML, each line commented with where its value came from."""
        import yaml

        origins = self.origins
        lines = []
        for key, value in self.shown().items():
            note = origins.get(key) or self.shown_notes.get(key, DEFAULT)
            if key == "kafka" and self._origins.get(KAFKA_FIELD):
                note += f" (from {self._origins[KAFKA_FIELD]})"
            text = yaml.safe_dump({key: value}, sort_keys=False, width=math.inf).rstrip("\n").split("\n")
            text[0] += f"  # {note}"
            lines.extend(text)
        return "\n".join(lines) + "\n"


class KafkaSettings(EdgeSettings):
    """The librdkafka properties every Kafka client starts from, from TENSORPULSE_KAFKA_<PROPERTY>
    (dots written as underscores: TENSORPULSE_KAFKA_SASL_MECHANISM=SCRAM-SHA-512 is
    `sasl.mechanism`); empty variables and `KAFKA_ENV_RESERVED` are not properties."""

    component: ClassVar[str] = "kafka"
    not_from_env: ClassVar[frozenset[str]] = frozenset({"properties"})

    properties: dict[str, str] = Field(default_factory=dict)

    _origins_of: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("properties")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(name for name in v if not _PROPERTY.match(name))
        if bad:
            raise ValueError(f"not a librdkafka property name: {', '.join(map(repr, bad))}")
        return v

    @property
    def origins_of(self) -> dict[str, str]:
        """{property: the environment variable that gave it}."""
        return dict(self._origins_of)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> KafkaSettings:
        """The properties in `environ` (default: this process's environment); ConfigError names a
        variable that does not give a property name."""
        environ = os.environ if environ is None else environ
        props: dict[str, str] = {}
        origins: dict[str, str] = {}
        for var in sorted(environ):
            value = environ[var]
            if (
                not var.startswith(KAFKA_ENV_PREFIX)
                or var in (KAFKA_ENV_PREFIX, *KAFKA_ENV_RESERVED)
                or not value
            ):
                continue
            name = var[len(KAFKA_ENV_PREFIX) :].lower().replace("_", ".")
            if not _PROPERTY.match(name):
                raise ConfigError(
                    f"environment variable {var}: {name!r} is not a librdkafka property name "
                    f"({KAFKA_ENV_PREFIX}<PROPERTY>, the property's dots written as single underscores)"
                )
            props[name] = value
            origins[name] = var
        settings = cls(properties=props)
        settings._origins_of = origins
        return settings


def env_names() -> dict[str, str]:
    """Every environment variable tensorpulse reads, with what it sets: the fields of the hook's
    and the worker's settings (one variable may set both, e.g. TENSORPULSE_BOOTSTRAP), their
    settings files' variables, and `OTHER_ENV`."""
    from tensorpulse.producers.settings import HookSettings
    from tensorpulse.stream.settings import WorkerSettings

    sets: dict[str, list[str]] = {}
    for model in (HookSettings, WorkerSettings):
        if model.config_env:
            sets.setdefault(model.config_env, []).append(f"the {model.component}'s settings file")
        for field, names in model.env_vars().items():
            for i, name in enumerate(names):
                later = f" (when {', '.join(names[:i])} is not set)" if i else ""
                sets.setdefault(name, []).append(f"{model.component} {field}{later}")
    out = {name: ", ".join(what) for name, what in sets.items()}
    out.update(OTHER_ENV)
    return dict(sorted(out.items()))


__all__ = [
    "DEFAULT",
    "ENV_PREFIX",
    "KAFKA_ENV_PREFIX",
    "KAFKA_ENV_RESERVED",
    "KAFKA_FIELD",
    "EdgeSettings",
    "KafkaSettings",
    "NUMBA_ENV",
    "OTHER_ENV",
    "env_names",
]
