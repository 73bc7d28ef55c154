"""Redaction: what may be logged or shown of a configuration, one function for every client.

Kafka client settings (SASL passwords, `sasl.oauthbearer.config`, TLS key material and its
passwords), HTTP headers (`Authorization`, API keys, cookies) and URLs with credentials
(`https://user:pass@host`) all pass through here before a log line or `--show-config` prints
them. A setting is secret by its *name*, so a value never has to be recognised to be hidden;
URLs are also cleaned wherever they occur in a value, because a bootstrap list or a receiver URL
is not secret as a whole but can carry a password inside.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

#: What replaces a secret.
MASK = "***"

#: Words that make a setting secret wherever they appear in its name (case-insensitive; `.`, `_`
#: and `-` are equivalent): librdkafka's `sasl.password`, `sasl.oauthbearer.client.secret`,
#: `sasl.oauthbearer.config` (it carries the token or its secret), `sasl.jaas.config`,
#: `ssl.key.password`, `ssl.key.pem`, `ssl.keystore.password`; HTTP's `Authorization`,
#: `Proxy-Authorization`, `X-Api-Key`, `Cookie`; anything named a token or a credential.
SECRET_WORDS = (
    "password",
    "passwd",
    "secret",
    "token",
    "jaas",
    "oauthbearer.config",
    "key",
    "authorization",
    "cookie",
    "credential",
)

#: `scheme://user:password@` inside any text: the password part is masked.
_URL_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*):(?P<password>[^/@\s]*)@")


def is_secret(name: str) -> bool:
    """True if a setting or header called `name` holds a secret (judged by its name alone)."""
    key = re.sub(r"[_\-]", ".", name.lower())
    return any(word in key for word in SECRET_WORDS)


def redact_text(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` in it masked."""
    return _URL_USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)


def redact_url(url: str) -> str:
    """A receiver URL fit for logs: scheme, host and port only.

    A webhook's path or query often *is* its credential (Slack, Teams and many others put the
    token there), and user:password may sit before the host, so nothing else is kept.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number: not worth showing
        port = ""
    return f"{parts.scheme}://{host}{port}"


def redact_value(name: str, value: Any) -> Any:
    """One setting's value as it may be shown: masked if its name is secret, else cleaned of URL
    passwords (strings) or redacted item by item (mappings, lists)."""
    if is_secret(name):
        return MASK if value not in (None, "") else value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(name, v) for v in value)
    return value


def redact(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `conf` (Kafka client settings, HTTP headers, worker settings) safe to log or print.

    Values of secret-named keys become `***`; nested mappings are redacted the same way; a URL
    password anywhere in a string value is masked. Keys are kept, so a reader can still see which
    settings were given. A Kafka client's `logger` is an object, not a setting: it is left out.
    """
    return {str(k): redact_value(str(k), v) for k, v in conf.items() if k != "logger"}


__all__ = ["MASK", "SECRET_WORDS", "is_secret", "redact", "redact_text", "redact_url", "redact_value"]
