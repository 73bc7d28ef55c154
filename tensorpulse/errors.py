"""One root exception, so callers can catch everything tensorpulse raises in one place."""

from __future__ import annotations


class TensorpulseError(Exception):
    """Root of every error raised by tensorpulse."""


class ConfigError(TensorpulseError, ValueError):
    """A setting, rules file or argument is invalid; the message says which and why."""


class DecodeError(TensorpulseError, ValueError):
    """A record on the wire could not be decoded.

    `reason` is a short, stable token (used as a Prometheus label and in the dead-letter
    envelope); the message carries the human-readable detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
