"""The webhook sink: each alert event POSTed as the same JSON the alerts topic carries.

Receivers get at-least-once delivery and should de-duplicate by the event's `id` (deterministic:
every delivery of one transition carries the same id). Header values may be given as
`${ENV_VAR}` references so that tokens stay out of command lines and logs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from tensorpulse.errors import ConfigError
from tensorpulse.events import AlertEvent

from .http import JsonPoster

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_header(spec: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """'Name: value' -> (name, value), with ${VAR} replaced from the environment.

    Errors name the header and the variable, never the value.
    """
    environ = os.environ if environ is None else environ
    name, sep, value = spec.partition(":")
    name = name.strip()
    if not sep or not name or not re.fullmatch(r"[A-Za-z0-9-]+", name):
        raise ConfigError("invalid header: expected 'Name: value' (e.g. 'Authorization: Bearer ${TOKEN}')")

    def expand(m: re.Match[str]) -> str:
        if m.group(1) not in environ:
            raise ConfigError(f"header {name!r} refers to ${{{m.group(1)}}}, which is not set")
        return environ[m.group(1)]

    return name, _VAR_RE.sub(expand, value.strip())


class WebhookSink:
    """POSTs every event to one URL; the poster owns retries, timeouts and counters."""

    def __init__(self, poster: JsonPoster) -> None:
        self.poster = poster

    def add(self, events: Iterable[AlertEvent]) -> None:
        for ev in events:
            self.poster.post(ev.to_json())
