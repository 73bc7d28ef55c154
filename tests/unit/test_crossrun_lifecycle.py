"""A job's end resolves its cross-run alerts too (issue 19, item 2): the notice a job's end sends to
the crossrun stream, and what that stream does with it.

The worker runs here without a broker: `process_one` is a job's own record path, `cross_one` the
crossrun stream's, and a `MemoryStore` stands in for each key context's state.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from offline_worker import offline_worker

from tensorpulse import wire
from tensorpulse.events import AlertEvent
from tensorpulse.stream.crossrun import JOB_OVER_HEADER, job_over_notice
from tensorpulse.stream.state import MemoryStore
from tensorpulse.stream.worker import Source, Worker

A, B = "cross-a", "cross-b"
SRC = Source("tensorpulse.crossrun.g", 0, 0)


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    """A worker (never started) whose only rule compares job A's gradients with job B's."""
    return offline_worker(
        tmp_path,
        "defaults: false\n"
        "rules:\n"
        "  - rule: SimilarAcrossRuns\n"
        f"    jobs: '^{A}$'\n"
        f"    params: {{other_trials: [{B}], collection_names: [gradients]}}\n",
    )


def _record(job: str, step: int, *, shift: float = 0.0, kind: str = "step") -> bytes:
    """A step with one gradient (the same for every job at a step unless shifted), names announced."""
    floats = np.array([[0.01 * step + shift, 0.1, -1.0, 1.0, 0.05]], dtype=np.float32)
    block = wire.TensorBlock(
        ["gradient/fc.weight"], ["gradients"], np.array([100]), floats, np.zeros(1, np.int64)
    )
    return wire.encode(
        job=job, rank=0, world=1, step=step, mode="train" if kind == "step" else "global", ts=float(step),
        seq=step, kind=kind, scalars={}, tensors=block if kind == "step" else None, announce=True,
    )  # fmt: skip


def _events(alerts: list[bytes]) -> list[tuple[str, str, int]]:
    return [(e.rule, e.status, e.step) for e in map(AlertEvent.from_json, alerts)]


def _firing(w: Worker, state: MemoryStore) -> list[bytes]:
    """Steps 0-2 of both jobs in A's key context, B diverging at step 2: A's SimilarAcrossRuns fires."""
    alerts: list[bytes] = []
    for step in range(3):
        alerts += w.cross_one(_record(A, step), A.encode(), [], state, SRC)[0]
        alerts += w.cross_one(_record(B, step, shift=0.5 * (step == 2)), A.encode(), [], state, SRC)[0]
    assert _events(alerts) == [("SimilarAcrossRuns", "firing", 2)]
    return alerts


def test_the_job_over_notice_resolves_the_firing_cross_run_alerts_and_removes_their_series(
    worker: Worker,
) -> None:
    """A job-over notice in A's key context: one resolved event with its reason, A's series gone."""
    state = MemoryStore()
    _firing(worker, state)
    firing = {"training_job": A, "rule": "SimilarAcrossRuns", "rank": "0"}
    assert worker.metrics.registry.get_sample_value("tensorpulse_rule_firing", firing) == 1
    reason = "no record for 9 s (job_idle_timeout_s=9): the job counts as ended"
    notice = job_over_notice(A, 3, time.time(), reason)
    alerts, dead, _ = worker.cross_one(notice.value, notice.key, list(notice.headers), state, SRC)
    assert dead == [] and _events(alerts) == [("SimilarAcrossRuns", "resolved", 2)]
    assert "job_idle_timeout_s=9" in AlertEvent.from_json(alerts[0]).message
    assert worker.metrics.registry.get_sample_value("tensorpulse_rule_firing", firing) is None
    # A second notice (a redelivery) finds nothing firing.
    assert worker.cross_one(notice.value, notice.key, list(notice.headers), state, SRC)[0] == []


def test_a_comparison_that_comes_after_the_end_fires_and_resolves_at_once(worker: Worker) -> None:
    """A's step 3 came before its end, B's step 3 (diverging) after the notice (another partition):
    it is compared, and its alert resolves at once with A's end reason, once per rule and rank; a
    step A never published says nothing; A's next record makes it a live job again."""
    state = MemoryStore()
    _firing(worker, state)
    worker.cross_one(_record(B, 3), A.encode(), [], state, SRC)  # B back in line: A's alert resolves
    worker.cross_one(_record(A, 3), A.encode(), [], state, SRC)
    notice = job_over_notice(A, 3, time.time(), "every rank of the job finished")
    assert worker.cross_one(notice.value, notice.key, list(notice.headers), state, SRC)[0] == []
    late = worker.cross_one(_record(B, 3, shift=0.5), A.encode(), [], state, SRC)[0]
    assert _events(late) == [("SimilarAcrossRuns", "firing", 3), ("SimilarAcrossRuns", "resolved", 3)]
    assert AlertEvent.from_json(late[1]).message.endswith("every rank of the job finished")
    # said once per rule and rank: another late difference (step 2, which A published) is not said again
    assert worker.cross_one(_record(B, 2, shift=0.9), A.encode(), [], state, SRC)[0] == []
    assert worker.cross_one(_record(B, 9, shift=0.5), A.encode(), [], state, SRC)[0] == []
    again = worker.cross_one(_record(A, 4), A.encode(), [], state, SRC)[0]
    again += worker.cross_one(_record(B, 4, shift=0.5), A.encode(), [], state, SRC)[0]
    assert _events(again) == [("SimilarAcrossRuns", "firing", 4)]


def test_the_last_end_record_of_a_job_sends_the_notice_keyed_by_that_job(worker: Worker) -> None:
    """A's own path: the end record of its last rank forwards one notice (key A, the reason in its header);
    a job without cross-run rules (B) sends none."""
    store = MemoryStore()
    src = Source("tensorpulse.reductions.cross-a", 0, 0)
    steps = worker.process_one(A, _record(A, 0), None, store, src)[3]
    assert [(f.key, f.headers) for f in steps] == [(A.encode(), ())]  # A's own side of its comparisons
    forwards = worker.process_one(A, _record(A, 1, kind="end"), None, store, src)[3]
    reason = b"every rank of the job finished"
    assert [(f.key, f.headers) for f in forwards] == [(A.encode(), ((JOB_OVER_HEADER, reason),))]
    assert wire.decode(forwards[0].value).kind == "end"
    assert worker.process_one(B, _record(B, 1, kind="end"), None, MemoryStore(), src)[3] == []


def test_a_notice_carrying_a_record_of_another_job_is_not_obeyed(worker: Worker) -> None:
    """Only a record of the key's own job can say that job is over: B's end record with the header ends nothing."""
    state = MemoryStore()
    _firing(worker, state)
    notice = job_over_notice(B, 3, time.time(), "forged")
    assert worker.cross_one(notice.value, A.encode(), list(notice.headers), state, SRC) == ([], [], [])
    firing = {"training_job": A, "rule": "SimilarAcrossRuns", "rank": "0"}
    assert worker.metrics.registry.get_sample_value("tensorpulse_rule_firing", firing) == 1
