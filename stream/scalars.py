"""Which scalar names of a job are evaluated and exported: the first `max_scalars_per_job` the job
sent, kept in the job's own state.

A job that sends a new scalar name every step would otherwise grow the rules' state and
Prometheus's series without bound. The admitted names live in the job's key context of the
stream store (entry `scalars`: 64-bit keys of the names, at most 8 bytes each), so they are
committed with the rest of the job's state and are the same on whichever worker owns the job
after a rebalance or a restart. They used to be a set in the worker's memory, keyed by Python's
`hash()`, which differs between processes: the next owner admitted a different set of names.

A worker keeps, per job, the names it knows to be admitted (a subset of the stored ones: the set
only grows), so a record whose names are all known costs no store access; a name it does not
know sends it to the store once. When a job is over (`forget`), its names go: a job of the same
id that publishes again starts afresh (the stored entry is removed at its next record here, and
with the rest of its state after `state_retention_s`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

from .state import SCALARS_KEY, Store


@functools.lru_cache(maxsize=8192)  # a job sends the same names at every step
def name_key(name: str) -> int:
    """A scalar name's key in the store: the same in every process (Python's hash() is not)."""
    return int.from_bytes(
        hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


class ScalarNames:
    """Admits a job's scalar names up to `limit`, the admitted set kept in the job's store."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: dict[str, set[int]] = {}
        self._ended: set[str] = set()  # jobs over: their stored names go at their next record

    def admit(self, job: str, names: Iterable[str], store: Store) -> list[str]:
        """The names among `names` beyond the job's limit (dropped); the others are admitted, new
        ones written to `store` (the job's key context)."""
        if job in self._ended:
            self._ended.discard(job)
            store.delete(SCALARS_KEY)
        known = self._known.setdefault(job, set())
        new = [n for n in names if name_key(n) not in known]
        if not new:
            return []
        admitted = set(store.get(SCALARS_KEY) or ())
        known |= admitted
        dropped, added = [], False
        for name in new:
            key = name_key(name)
            if key in admitted:
                continue
            if len(admitted) >= self.limit:
                dropped.append(name)
                continue
            admitted.add(key)
            known.add(key)
            added = True
        if added:
            store.set(SCALARS_KEY, sorted(admitted))
        return dropped

    def forget(self, job: str) -> None:
        """The job is over: its admitted names go (from the store at the job's next record)."""
        self._known.pop(job, None)
        self._ended.add(job)
