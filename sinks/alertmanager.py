"""The Alertmanager sink: tensorpulse alert events as Alertmanager API v2 alerts.

Alertmanager holds *state* (what is firing now) while the alerts topic carries *transitions*, so
this sink keeps the set of firing alerts in memory and re-posts it every `resend_interval`. Each
firing alert is posted with `endsAt = now + 4 x resend_interval` (as Prometheus does), so it stays
firing while the forwarder lives, whatever Alertmanager's `resolve_timeout`, and resolves by itself
a few minutes after the forwarder dies. A resolved event posts the same labels with `endsAt = now`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tensorpulse.events import AlertEvent

from .http import JsonPoster

log = logging.getLogger("tensorpulse.sinks.alertmanager")

API_PATH = "/api/v2/alerts"
ENDS_AT_FACTOR = 4

AlertKey = tuple[str, str, int]


def api_url(base: str) -> str:
    """The alerts endpoint of an Alertmanager given by its base URL (or by the endpoint itself)."""
    base = base.rstrip("/")
    return base if base.endswith(API_PATH) else base + API_PATH


def rfc3339(ts: float) -> str:
    """Unix time as the RFC 3339 UTC timestamp Alertmanager expects."""
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def alert_key(ev: AlertEvent) -> AlertKey:
    """What identifies one alert across its firing and resolved events (the worker's rule slot)."""
    return (ev.job, ev.rule, ev.rank)


def to_alertmanager(
    ev: AlertEvent,
    *,
    ends_at: float | None = None,
    extra_labels: Mapping[str, str] | None = None,
    generator_url: str | None = None,
) -> dict[str, Any]:
    """Map one alert event to one Alertmanager v2 alert (postableAlert).

    Labels identify the alert and drive routing, so they hold only what is stable for its whole
    life; per-step details go into annotations.
    """
    labels = {
        **(extra_labels or {}),
        "alertname": ev.rule,
        "training_job": ev.job,  # as on the workers' metrics; `job` is Prometheus's scrape job
        "rank": str(ev.rank),
        "severity": ev.severity,
        "tensorpulse_mode": ev.mode,
    }
    where = f"{ev.job} rank {ev.rank} ({ev.mode} step {ev.step})"
    summary = f"{ev.rule} {'resolved' if ev.status == 'resolved' else 'firing'} on {where}"
    annotations = {
        "summary": summary,
        "description": ev.message or summary,
        "step": str(ev.step),
        "tensors": ", ".join(ev.tensors),
        "value": _num(ev.value),
        "threshold": _num(ev.threshold),
        "alert_id": ev.id,
    }
    if ev.action != "none":
        annotations["action"] = ev.action
    out: dict[str, Any] = {
        "labels": labels,
        "annotations": {k: v for k, v in annotations.items() if v},
        "startsAt": rfc3339(ev.ts),
    }
    if ends_at is not None:
        out["endsAt"] = rfc3339(max(ends_at, ev.ts))
    if generator_url:
        out["generatorURL"] = generator_url.format(job=ev.job, rule=ev.rule, rank=ev.rank, mode=ev.mode)
    return out


@dataclass
class _Firing:
    event: AlertEvent
    alert: dict[str, Any]


@dataclass
class AlertmanagerSink:
    """Keeps what is firing and posts it to one or more Alertmanagers (post to every HA replica)."""

    posters: list[JsonPoster]
    resend_interval: float = 60.0
    firing_ttl: float | None = 24 * 3600.0
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    generator_url: str | None = None
    firing: dict[AlertKey, _Firing] = field(default_factory=dict)
    _last_send: float = float("-inf")

    def remember(self, ev: AlertEvent) -> None:
        """Apply an event to the firing set without posting (used when rebuilding at start)."""
        if ev.status == "firing":
            alert = to_alertmanager(ev, extra_labels=self.extra_labels, generator_url=self.generator_url)
            self.firing[alert_key(ev)] = _Firing(ev, alert)
        else:
            self.firing.pop(alert_key(ev), None)

    def add(self, events: Iterable[AlertEvent], now: float | None = None) -> None:
        """Post new transitions now: firing alerts with a fresh endsAt, resolved ones with endsAt = now."""
        now = time.time() if now is None else now
        batch = []
        for ev in events:
            if ev.status == "firing":
                self.remember(ev)
                batch.append(self._refreshed(self.firing[alert_key(ev)], now))
            else:
                known = self.firing.pop(alert_key(ev), None)
                batch.append(self._resolved(ev, known, now))
        if batch:
            self._post(batch)

    def tick(self, now: float | None = None) -> int:
        """Re-post every firing alert when `resend_interval` has passed; returns how many were sent."""
        now = time.time() if now is None else now
        if now - self._last_send < self.resend_interval:
            return 0
        self._last_send = now
        if self.firing_ttl:
            for key, f in list(self.firing.items()):
                if now - f.event.ts > self.firing_ttl:
                    log.warning(
                        "%s on %s rank %d fired %.0fh ago without a resolved event; no longer refreshed "
                        "(Alertmanager resolves it at its endsAt)",
                        f.event.rule,
                        f.event.job,
                        f.event.rank,
                        (now - f.event.ts) / 3600,
                    )
                    del self.firing[key]
        batch = [self._refreshed(f, now) for f in self.firing.values()]
        if batch:
            self._post(batch)
        return len(batch)

    def _refreshed(self, f: _Firing, now: float) -> dict[str, Any]:
        return {**f.alert, "endsAt": rfc3339(now + ENDS_AT_FACTOR * self.resend_interval)}

    def _resolved(self, ev: AlertEvent, known: _Firing | None, now: float) -> dict[str, Any]:
        # Resolve with the labels it fired with: Alertmanager matches alerts by their label set.
        alert = to_alertmanager(
            ev, ends_at=now, extra_labels=self.extra_labels, generator_url=self.generator_url
        )
        if known is not None:
            alert["labels"] = known.alert["labels"]
            alert["startsAt"] = known.alert["startsAt"]
        return alert

    def _post(self, batch: list[dict[str, Any]]) -> None:
        for poster in self.posters:
            poster.post(batch)
