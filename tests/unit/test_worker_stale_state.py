"""A rule state stored by another version of the rule (other fields) starts fresh in the worker.

The worker runs here without a broker (as in test_crossrun_lifecycle.py): `process_one` is a job's
own record path, `cross_one` the crossrun stream's, and a `MemoryStore` stands in for each key
context's state. Both paths check a stored state against its rule's declared `State` before the
rule sees it, count a mismatch in `tensorpulse_rule_errors_total{reason="stored_state"}` and give
the rule a fresh state; the rule then raises nothing and goes on as on a new job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from offline_worker import offline_worker
from prometheus_client import CollectorRegistry

from tensorpulse import wire
from tensorpulse.events import AlertEvent
from tensorpulse.rules.base import state_mismatch
from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.stream.evaluator import is_cross_run
from tensorpulse.stream.state import JobStore, MemoryStore
from tensorpulse.stream.worker import Source, Worker

A, B = "stale-a", "stale-b"
SRC = Source("tensorpulse.job.stale-a", 0, 0)


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    """A worker (never started) with LossNotDecreasing for every job and SimilarAcrossRuns for A."""
    return offline_worker(
        tmp_path,
        "defaults: false\n"
        "rules:\n"
        "  - rule: LossNotDecreasing\n"
        "  - rule: SimilarAcrossRuns\n"
        f"    jobs: '^{A}$'\n"
        f"    params: {{other_trials: [{B}], collection_names: [gradients]}}\n",
    )


def _record(job: str, step: int, *, shift: float = 0.0) -> bytes:
    """A train step with one gradient (the same for every job unless shifted) and a loss."""
    floats = np.array([[0.01 * step + shift, 0.1, -1.0, 1.0, 0.05]], dtype=np.float32)
    block = wire.TensorBlock(["gradient/fc.weight"], ["gradients"], np.array([100]), floats, np.zeros(1, np.int64))
    return wire.encode(
        job=job, rank=0, world=1, step=step, mode="train", ts=float(step), seq=step, kind="step",
        scalars={"loss": 1.0}, tensors=block, announce=True,
    )  # fmt: skip


def _errors(w: Worker, rule: str) -> dict[str, float | None]:
    get = w.metrics.registry.get_sample_value
    return {r: get("tensorpulse_rule_errors_total", {"rule": rule, "reason": r}) for r in ("raised", "stored_state")}


def test_a_jobs_own_stored_state_of_another_layout_starts_fresh(worker: Worker) -> None:
    """Rank 0's stored LossNotDecreasing state has other fields: counted once as stored_state,
    never as raised, and what the worker stores next matches the declaration."""
    own = [s for s in worker.specs if not is_cross_run(s)]
    store = MemoryStore()
    old = {"losses": [1.0], "count": 3}  # an older layout: no last_step, since, bad
    JobStore(store, own).save({"r": {"LossNotDecreasing|0": {"s": old, "f": False}}}, [0])
    for step in range(3):
        alerts, dead, _, _ = worker.process_one(A, _record(A, step), A.encode(), store, SRC)
        assert alerts == [] and dead == []
    assert _errors(worker, "LossNotDecreasing") == {"raised": 0.0, "stored_state": 1.0}
    slot = JobStore(store, own).load([0])["r"]["LossNotDecreasing|0"]
    assert slot["s"]["last_step"] == 2 and state_mismatch(own[0].rule, slot["s"], strict=True) is None


def test_a_stored_cross_run_state_of_another_layout_starts_fresh(worker: Worker) -> None:
    """A's stored SimilarAcrossRuns state has a list where the rule keeps a dict: it starts fresh
    (counted once), and B's difference at step 2 fires as on a new job."""
    state = MemoryStore()
    worker.cross_one(_record(A, 0), A.encode(), [], state, SRC)  # creates A's cross-run state entry
    key = next(k for k in state if isinstance(state.get(k), dict) and "r" in state.get(k))
    state.set(key, {"r": {"SimilarAcrossRuns|0": {"s": {"a": [], "seen": 1}, "f": False}}})

    other = Worker(worker.settings, metrics=WorkerMetrics(CollectorRegistry()))  # a restarted worker
    alerts: list[bytes] = []
    for step in range(3):
        alerts += other.cross_one(_record(A, step), A.encode(), [], state, SRC)[0]
        alerts += other.cross_one(_record(B, step, shift=0.5 * (step == 2)), A.encode(), [], state, SRC)[0]
    events = [(e.rule, e.status, e.step) for e in map(AlertEvent.from_json, alerts)]
    assert events == [("SimilarAcrossRuns", "firing", 2)]
    assert _errors(other, "SimilarAcrossRuns") == {"raised": 0.0, "stored_state": 1.0}


def test_an_ended_job_leaves_no_evaluator_behind(worker: Worker) -> None:
    """A worker that sees thousands of short jobs keeps evaluators for the live ones only: the end
    record of a one-rank job drops its evaluators; a record after it gets new ones."""
    store = MemoryStore()
    for step in range(3):
        worker.process_one(B, _record(B, step), B.encode(), store, SRC)
    assert B in worker.evaluating
    end = wire.encode(job=B, rank=0, world=1, step=3, mode="global", ts=3.0, seq=3, kind="end")
    worker.process_one(B, end, B.encode(), store, SRC)
    assert B not in worker.evaluating
    worker.process_one(B, _record(B, 4), B.encode(), store, SRC)
    assert B in worker.evaluating
