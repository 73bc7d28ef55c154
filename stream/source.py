"""The intake's source consumer, its fetches sized to the number of job partitions it reads.

Why: a fetch names every partition the consumer reads (librdkafka has no incremental fetch
sessions), so each fetch costs librdkafka's thread time in proportion to the jobs read. With 1,000
jobs and fetches that returned after 20 ms or 16 KiB, an idle consumer alone took 8 % of a core
(3 % with 100 ms), more CPU per record than the copy itself. So a fetch waits longer, and for more
bytes, the more partitions it names: `FETCH_SCALE_PARTITIONS` partitions or fewer wait 20 ms or
16 KiB (a new job's first record waits no longer than before), and beyond that both grow with the
partitions, up to 5 times (100 ms, 80 KiB at 1,000 partitions and more): the partitions named per
second, and so the fetches' CPU, stay those of 200 partitions up to 1,000.

librdkafka reads these settings once, so the intake makes a new source consumer when the
partitions it reads move the scale by half or more (`rescale`): it commits what it copied, closes
the old one and assigns the same partitions from their committed offsets to the new one.
"""

from __future__ import annotations

from typing import Any

#: Up to this many partitions, a fetch waits FETCH_WAIT_MS or FETCH_MIN_BYTES, whichever comes first.
FETCH_SCALE_PARTITIONS = 200
FETCH_WAIT_MS = 20
FETCH_MIN_BYTES = 16 << 10
#: The largest scale: at most 100 ms added to a record's way through the intake.
MAX_FETCH_SCALE = 5.0


def fetch_scale(partitions: int) -> float:
    """How many times FETCH_WAIT_MS and FETCH_MIN_BYTES a fetch naming `partitions` partitions waits."""
    return min(MAX_FETCH_SCALE, max(1.0, partitions / FETCH_SCALE_PARTITIONS))


def rescale(current: float, partitions: int) -> float | None:
    """The new scale when `partitions` moves it by half or more from `current` (a new consumer
    each time: not for every job that starts or ends), else None."""
    wanted = fetch_scale(partitions)
    if wanted >= 1.5 * current or wanted <= current / 1.5:
        return wanted
    return None


def source_config(
    base: dict[str, Any], group: str, client_id: str, max_record_bytes: int, scale: float
) -> dict[str, Any]:
    """The source consumer's settings at `scale` (`fetch_scale`): assigned by hand, offsets of `group`
    committed by the intake after each acknowledged batch."""
    return {
        **base,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        "fetch.wait.max.ms": round(FETCH_WAIT_MS * scale),
        "fetch.min.bytes": round(FETCH_MIN_BYTES * scale),
        "fetch.error.backoff.ms": 10,
        "topic.metadata.refresh.fast.interval.ms": 10,
        "max.partition.fetch.bytes": max(1 << 20, max_record_bytes),
        "client.id": client_id,
    }
