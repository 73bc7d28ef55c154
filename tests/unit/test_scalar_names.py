"""A job's admitted scalar names live in its state (stream/scalars.py), not in one worker's memory:
after a rebalance or a restart the next owner admits and drops exactly the same names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from corpus import _raw
from prometheus_client import CollectorRegistry

from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.stream.scalars import SCALARS_KEY, ScalarNames, name_key
from tensorpulse.stream.settings import WorkerSettings
from tensorpulse.stream.state import MemoryStore
from tensorpulse.stream.worker import Source, Worker

JOB = "scalars-job"
SRC = Source("tensorpulse.reductions.scalars-job", 0, 0)


def worker(tmp_path: Path, limit: int) -> Worker:
    """A worker process's Worker, never started: each call is another process's."""
    settings = WorkerSettings(
        bootstrap="127.0.0.1:1", metrics_port=None, state_dir=tmp_path, max_scalars_per_job=limit
    )
    return Worker(settings, metrics=WorkerMetrics(CollectorRegistry(), max_scalars_per_job=limit))


def exported(w: Worker) -> set[str]:
    """The scalar names of the job on /metrics (the latest record's admitted scalars)."""
    return {
        s.labels["name"]
        for m in w.metrics.registry.collect()
        if m.name == "tensorpulse_scalar"
        for s in m.samples
    }


def test_the_next_owner_of_a_job_admits_the_same_names(tmp_path: Path) -> None:
    """Limit 3: the first worker admits loss, a, b and drops c; the job moves (its committed state
    goes with it): the next worker still drops c and keeps loss, a and b."""
    store = MemoryStore()  # the job's key context: what the changelog hands the next owner
    first = worker(tmp_path, 3)
    first.process_one(JOB, _raw(JOB, step=1, s={"loss": 1.0, "a": 1.0, "b": 1.0}), None, store, SRC)
    first.process_one(JOB, _raw(JOB, step=2, s={"loss": 1.0, "c": 1.0}), None, store, SRC)
    assert exported(first) == {"loss"}
    second = worker(tmp_path / "second", 3)
    second.process_one(JOB, _raw(JOB, step=3, s={"c": 1.0, "a": 2.0}), None, store, SRC)
    assert exported(second) == {"a"}
    assert (
        second.metrics.registry.get_sample_value(
            "tensorpulse_limit_exceeded_total", {"limit": "scalars_per_job"}
        )
        == 1.0
    )


def test_name_keys_are_the_same_in_every_process() -> None:
    """Python's hash() of a str changes with the process (PYTHONHASHSEED); the stored keys must not."""
    code = "from tensorpulse.stream.scalars import name_key; print(name_key('loss'), hash('loss'))"
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.split()
        for seed in ("1", "2")
    ]
    assert runs[0][0] == runs[1][0] == str(name_key("loss"))
    assert runs[0][1] != runs[1][1]  # what the names were kept by before


class CountingStore(MemoryStore):
    """A MemoryStore that counts reads of the scalar names' entry."""

    reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        if key == SCALARS_KEY:
            self.reads += 1
        return super().get(key, default)


def test_known_names_cost_no_store_read_and_a_job_over_starts_afresh() -> None:
    """Names this worker already admitted are not looked up again; after `forget` (the job is over)
    the stored names go at the job's next record."""
    names, store = ScalarNames(2), CountingStore()
    assert names.admit(JOB, ["loss", "acc"], store) == [] and store.reads == 1
    for _ in range(5):
        assert names.admit(JOB, ["loss", "acc"], store) == []
    assert store.reads == 1
    assert names.admit(JOB, ["lr"], store) == ["lr"] and store.reads == 2
    names.forget(JOB)
    assert names.admit(JOB, ["lr"], store) == [] and store.get(SCALARS_KEY) == [name_key("lr")]
