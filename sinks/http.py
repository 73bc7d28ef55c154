"""Delivering JSON over HTTP with bounded retries: the one transport both HTTP sinks use.

Receivers go away (restarts, deploys, rate limits), so a POST is retried on connection errors,
timeouts, 408, 429 and 5xx, with exponential backoff and jitter, honouring `Retry-After`. Attempts
are bounded, so one dead receiver delays the others by at most a known budget and never crashes
the forwarder. Header values and URL paths can carry secrets (tokens, Slack-style webhook paths):
neither is ever logged; logs name a receiver by scheme and host only.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorpulse.errors import ConfigError, TensorpulseError
from tensorpulse.redact import redact_text, redact_url

log = logging.getLogger("tensorpulse.sinks.http")

RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


class DeliveryInterrupted(TensorpulseError):
    """Shutdown was requested while waiting to retry: the caller must not commit this delivery."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try one delivery: attempts, backoff and per-request timeout (seconds)."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout: float = 10.0
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"Expected `max_attempts` to be at least 1 but got {self.max_attempts}")
        for name in ("base_delay", "max_delay", "timeout", "max_retry_after"):
            if getattr(self, name) < 0 or (name == "timeout" and self.timeout == 0):
                raise ConfigError(f"Expected `{name}` to be a positive number but got {getattr(self, name)}")

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """Delay before the next attempt after `failures` failed ones: half fixed, half random.

        The cap doubles per failure (base, 2*base, 4*base, ... up to max_delay); the random half
        spreads retries of many forwarders so they do not hit a recovering receiver together.
        """
        cap = min(self.max_delay, self.base_delay * (2 ** max(failures - 1, 0)))
        return cap / 2 + (rng or random).uniform(0, cap / 2)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def safe_url(url: str) -> str:
    """A receiver's name fit for logs: scheme and host only (paths and queries may hold secrets)."""
    return redact_url(url)


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one POST after all its attempts."""

    ok: bool
    attempts: int
    status: int | None = None
    error: str = ""


@dataclass
class DeliveryStats:
    """Counters of one receiver, for the forwarder's progress line."""

    delivered: int = 0
    failed: int = 0
    retries: int = 0


@dataclass
class JsonPoster:
    """POSTs JSON to one URL with retries; `sleep(seconds) -> stopped` makes waits interruptible."""

    url: str
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    headers: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    sleep: Callable[[float], bool] | None = None
    rng: random.Random = field(default_factory=random.Random)
    stats: DeliveryStats = field(default_factory=DeliveryStats)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"invalid receiver URL for {self.name or 'a sink'}: expected http(s)://host[:port]/path"
            )
        if not self.name:
            self.name = safe_url(self.url)
        if parts.username is not None or parts.password is not None:
            self._move_credentials(parts)
        if self.sleep is None:
            never = threading.Event()
            self.sleep = never.wait

    def _move_credentials(self, parts: urllib.parse.SplitResult) -> None:
        """`user:password@host` becomes an `Authorization: Basic` header and leaves the URL.

        urllib sends neither: it takes `user:password@host` for the host name and fails with
        "Name or service not known". Percent-escapes in the user info are decoded (RFC 3986).
        """
        if any(k.lower() == "authorization" for k in self.headers):
            raise ConfigError(
                f"{self.name}: the receiver URL carries user:password and an Authorization header "
                "is given too; keep one of them"
            )
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self.headers = {**self.headers, "Authorization": f"Basic {token}"}
        host = parts.netloc.rpartition("@")[2]
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=host))

    def post(self, body: Any) -> Delivery:
        """Deliver `body` (JSON-serialisable, or bytes already encoded); never raises on HTTP failure.

        Raises DeliveryInterrupted only when shutdown interrupts a wait between attempts.
        """
        data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        last = Delivery(False, 0)
        for attempt in range(1, self.policy.max_attempts + 1):
            last, retry_after = self._attempt(data, attempt)
            if last.ok:
                self.stats.delivered += 1
                return last
            retryable = last.status is None or last.status in RETRY_STATUSES
            if not retryable or attempt == self.policy.max_attempts:
                break
            delay = self.policy.backoff(attempt, self.rng)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.policy.max_retry_after))
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1fs",
                self.name,
                attempt,
                self.policy.max_attempts,
                last.error,
                delay,
            )
            self.stats.retries += 1
            assert self.sleep is not None
            if self.sleep(delay):
                raise DeliveryInterrupted(f"{self.name}: shutdown while waiting to retry")
        self.stats.failed += 1
        log.error("%s: delivery failed after %d attempt(s): %s", self.name, last.attempts, last.error)
        return last

    def _attempt(self, data: bytes, attempt: int) -> tuple[Delivery, float | None]:
        headers = {"Content-Type": "application/json", "User-Agent": "tensorpulse-notify", **self.headers}
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.policy.timeout) as resp:
                resp.read()
                return Delivery(True, attempt, resp.status), None
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
            error = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
            return Delivery(False, attempt, exc.code, error), parse_retry_after(
                exc.headers.get("Retry-After")
            )
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)  # may quote the URL, user:password included
            return Delivery(False, attempt, None, redact_text(f"{type(exc).__name__}: {reason}")), None
