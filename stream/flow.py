"""Fair sharing of the processor between jobs: no job's copies run far ahead of its evaluation.

Why: the processor evaluates each steps partition in order, and its consumer hands out records in
the order they were fetched. A job of 4,096 ranks that publishes a step at once put 12,288 copies
on the steps topic within a second, and a one-rank bystander's record then waited behind
thousands of them (3.3 s of the bystander's 3.5 s wait came after its copy; bench/ranks.py).
Nothing after the copy can reorder them: a job's records share one steps partition (cross-rank
rules need them together), other jobs may share it too, and Quix Streams hands out what its
consumer fetched.

So the intake copies at most `max_ahead` records of a job that the processor has not evaluated
yet; beyond that it pauses the job's source partitions (confluent-kafka's `pause`, then `seek`
back to the first record it did not copy) and resumes them once the job's copies in flight fall
to half of it. A big job's backlog waits on its own topic, where it is cheap, and any other
job's record has at most `max_ahead` records of each busy job before it in the processor.

How far the processor is, per steps partition: the offset after the last record this worker's
processor handed to the rules (`Progress`, written on the processor's thread), or, when another
worker of the group processes that partition, the group's committed offset (asked of the broker
at most every `poll_interval` seconds, and only while a job is held). The larger of the two wins.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("tensorpulse.stream")


class Progress:
    """Per steps partition, the offset after the last record this worker's processor took up.

    Written by the processor's thread and read by the intake's: plain dict stores, no lock.
    """

    def __init__(self) -> None:
        self.positions: dict[int, int] = {}

    def took(self, partition: int, offset: int) -> None:
        self.positions[partition] = offset + 1


class JobFlow:
    """Copies in flight per job, and which jobs the intake holds back (their partitions paused).

    `committed()` returns the processing group's committed offset per steps partition (it may
    raise: the broker is away); it is called only while a job is held.
    """

    def __init__(
        self,
        max_ahead: int,
        progress: Progress,
        committed: Callable[[], dict[int, int]] | None = None,
        *,
        poll_interval: float = 0.2,
    ) -> None:
        self.max_ahead = max_ahead  # 0: no bound (every record is copied as soon as it is read)
        self.progress = progress
        self._committed_of = committed
        self._poll_interval = poll_interval
        self._committed: dict[int, int] = {}
        self._next_poll = 0.0
        self._offsets: dict[str, deque[int]] = {}  # job -> steps offsets of its acknowledged copies in flight
        self._partition: dict[str, int] = {}  # job -> its steps partition
        self.sending: dict[str, int] = {}  # job -> copies produced, not yet acknowledged
        self.held: dict[str, list[tuple[str, int]]] = {}  # job -> its paused (topic, partition)s
        self.holds = 0  # times a job was held back (for the logs and the tests)

    @property
    def enabled(self) -> bool:
        return self.max_ahead > 0

    def _position(self, partition: int) -> int:
        return max(self.progress.positions.get(partition, 0), self._committed.get(partition, 0))

    def in_flight(self, job: str) -> int:
        """Copies of `job` produced but not yet evaluated (as far as this worker knows)."""
        offsets = self._offsets.get(job)
        if offsets:
            done = self._position(self._partition[job])
            while offsets and offsets[0] < done:
                offsets.popleft()
        return len(offsets or ()) + self.sending.get(job, 0)

    def room(self, job: str) -> int:
        """How many more records of `job` the intake may copy now (a large number when unbounded)."""
        if not self.enabled:
            return 1 << 62
        return self.max_ahead - self.in_flight(job)

    def sent(self, job: str) -> None:
        self.sending[job] = self.sending.get(job, 0) + 1

    def acked(self, job: str, partition: int | None, offset: int | None) -> None:
        """A copy of `job` was acknowledged at (partition, offset) of the steps topic (None: it failed)."""
        n = self.sending.get(job, 0)
        if n > 1:
            self.sending[job] = n - 1
        else:
            self.sending.pop(job, None)
        if partition is None or offset is None or offset < 0 or not self.enabled:
            return
        self._partition[job] = partition
        self._offsets.setdefault(job, deque()).append(offset)

    def hold(self, job: str, partitions: list[tuple[str, int]]) -> None:
        """The intake paused `job`'s source partitions: it has `max_ahead` copies in flight."""
        if job not in self.held:
            self.holds += 1
        self.held[job] = partitions

    def released(self, now: float | None = None) -> list[tuple[str, list[tuple[str, int]]]]:
        """Held jobs whose copies in flight fell to half of `max_ahead`: their partitions to resume."""
        if not self.held:
            return []
        now = time.monotonic() if now is None else now
        if self._committed_of is not None and now >= self._next_poll:
            self._next_poll = now + self._poll_interval
            try:
                self._committed = self._committed_of()
            except Exception as exc:  # the broker is away: this worker's own progress still counts
                log.debug("committed offsets of the steps topic: %s", exc)
        out = [(job, parts) for job, parts in self.held.items() if self.in_flight(job) <= self.max_ahead // 2]
        for job, _ in out:
            del self.held[job]
        return out

    def forget(self, job: str) -> None:
        """The intake no longer reads `job`."""
        for table in (self._offsets, self._partition, self.sending, self.held):
            table.pop(job, None)

    def reset(self) -> None:
        """A new source consumer: nothing is paused on it."""
        self.held.clear()
        self.sending.clear()
