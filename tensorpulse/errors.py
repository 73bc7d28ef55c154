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


#: Every `DecodeError.reason` with which a stream worker rejects a record: `wire.decode`'s own,
#: then those the worker and its intake add (the record's key, job, size, a tick's stamp, a
#: failure while evaluating). The worker's Prometheus counters of decode errors and dead
#: letters start at 0 for each (docs/metrics.md); docs/wire-format.md describes them.
DECODE_REASONS: tuple[str, ...] = (
    # tensorpulse.wire.decode
    "not_msgpack",
    "not_a_record",
    "too_large",
    "too_many_tensors",
    "unknown_version",
    "missing_field",
    "wrong_type",
    "bad_value",
    "bad_job",
    "bad_tensors",
    "unknown_schema",
    "malformed",
    # the stream worker and its intake
    "wrong_key",
    "job_mismatch",
    "too_many_ranks",
    "bad_tick",
    "processing_error",
)


#: Every limit a stream worker enforces on what jobs send, as the label `limit` of
#: `tensorpulse_limit_exceeded_total` (docs/architecture.md#limits has each one's value, where it
#: is defined and what the excess gets): bytes per record, tensors per record, ranks per job,
#: distinct scalar names per job, jobs per worker.
LIMITS: tuple[str, ...] = (
    "record_bytes",
    "tensors_per_record",
    "ranks_per_job",
    "scalars_per_job",
    "jobs_per_worker",
)
