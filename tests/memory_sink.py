"""The in-memory transport of the hook tests: a `produce_fn` that keeps what a hook publishes.

Tests of hooks and framework callbacks need no broker to see what would have gone to Kafka: this
sink keeps every message in order and decodes them on demand with the wire codec, the same way
a worker would (one schema cache over the whole sequence, so announced schemas resolve).
"""

from __future__ import annotations

from tensorpulse import wire


class MemorySink:
    """A hook's `produce_fn`: keeps (topic, payload, key) of every message, in publishing order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bytes]] = []

    def __call__(self, topic: str, value: bytes, key: bytes) -> None:
        self.messages.append((topic, value, key))

    @property
    def payloads(self) -> list[bytes]:
        """The payloads alone (what a worker's decoder reads)."""
        return [value for _, value, _ in self.messages]

    def decoded(self) -> list[wire.StepRecord]:
        """Every message decoded, end records included."""
        cache = wire.SchemaCache()
        return [wire.decode(value, cache) for value in self.payloads]

    def records(self, mode: str | None = None) -> list[wire.StepRecord]:
        """The step records (no end records), only those of `mode` when it is given."""
        return [r for r in self.decoded() if r.kind == "step" and (mode is None or r.mode == mode)]
