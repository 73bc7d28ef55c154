"""The documented limits on what jobs send (docs/architecture.md#limits): beyond each, the excess
is dropped, said and counted in `tensorpulse_limit_exceeded_total{limit}`, and the worker goes on.

The worker runs here without a broker: `Worker.process_one` is the whole per-record path after
the intake, and a `MemoryStore` stands in for the job's state.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from corpus import _raw, good
from prometheus_client import CollectorRegistry

from tensorpulse import wire
from tensorpulse.errors import DECODE_REASONS, LIMITS, DecodeError
from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.stream.intake import Intake, IntakeConfig
from tensorpulse.stream.settings import WorkerSettings
from tensorpulse.stream.state import MemoryStore
from tensorpulse.stream.worker import LIMIT_OF_REASON, Source, Worker

JOB = "limits-job"
SRC = Source("tensorpulse.reductions.limits-job", 0, 0)


def worker(tmp_path: Path, **settings: object) -> Worker:
    """A worker that is never started (no broker needed to run `process_one`)."""
    return Worker(
        WorkerSettings(bootstrap="127.0.0.1:1", metrics_port=None, state_dir=tmp_path, **settings),
        metrics=WorkerMetrics(CollectorRegistry(), max_scalars_per_job=int(settings.get("max_scalars_per_job", 1024))),
    )


def exceeded(w: Worker, limit: str) -> float | None:
    return w.metrics.registry.get_sample_value("tensorpulse_limit_exceeded_total", {"limit": limit})


def test_every_limit_is_counted_from_zero_and_every_record_limit_has_its_reason(tmp_path: Path) -> None:
    """Each limit's counter exists at 0 from the start; each record-level limit's reason is a decode reason."""
    w = worker(tmp_path)
    assert {limit: exceeded(w, limit) for limit in LIMITS} == dict.fromkeys(LIMITS, 0.0)
    assert set(LIMIT_OF_REASON.values()) <= set(LIMITS) and set(LIMIT_OF_REASON) <= set(DECODE_REASONS)


def test_a_record_over_the_byte_limit_is_dead_lettered_and_counted(tmp_path: Path) -> None:
    """A record over wire.MAX_RECORD_BYTES: `too_large`, limit record_bytes; the next record is evaluated."""
    w, store = worker(tmp_path), MemoryStore()
    big = _raw(JOB, s={"x" * (wire.MAX_RECORD_BYTES + 1): 1.0})
    _, dead, _, _ = w.process_one(JOB, big, None, store, SRC)
    assert [json.loads(d)["reason"] for d in dead] == ["too_large"]
    assert exceeded(w, "record_bytes") == 1
    assert w.process_one(JOB, good(JOB, 1, announce=True), None, store, SRC)[1] == []


def test_a_record_of_more_tensors_than_the_limit_gets_its_own_reason(tmp_path: Path) -> None:
    """65,537 tensors: the decoder says `too_many_tensors` (was `not_msgpack`), the worker counts the limit."""
    names = ["t"] * (wire.MAX_TENSORS + 1)
    payload = _raw(JOB, t={"sid": 1, "names": names, "colls": names})
    with pytest.raises(DecodeError) as info:
        wire.decode(payload)
    assert info.value.reason == "too_many_tensors" and "MAX_TENSORS" in str(info.value)
    w = worker(tmp_path)
    _, dead, _, _ = w.process_one(JOB, payload, None, MemoryStore(), SRC)
    assert [json.loads(d)["reason"] for d in dead] == ["too_many_tensors"]
    assert exceeded(w, "tensors_per_record") == 1


def test_ranks_beyond_the_limit_are_dead_lettered_the_others_evaluated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """max_ranks_per_job=4: ranks 0-3 are evaluated, rank 4 and 999 dead-lettered (`too_many_ranks`)."""
    w, store = worker(tmp_path, max_ranks_per_job=4), MemoryStore()
    with caplog.at_level(logging.WARNING, logger="tensorpulse.stream"):
        for rank in (0, 3, 4, 999):
            _, dead, _, _ = w.process_one(JOB, good(JOB, 0, announce=True, rank=rank, world=1000), None, store, SRC)
            assert [json.loads(d)["reason"] for d in dead] == ([] if rank < 4 else ["too_many_ranks"])
    assert exceeded(w, "ranks_per_job") == 2
    assert w.metrics.registry.get_sample_value(
        "tensorpulse_records_total", {"training_job": JOB, "mode": "train"}
    ) == 2
    assert "max_ranks_per_job" in caplog.text and "rank 4 " in caplog.text


def test_a_new_scalar_name_every_step_stops_at_the_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A job sending a new scalar name each step: the first max_scalars_per_job names are kept, the
    rest dropped and counted, said once; /metrics never has more scalar series than the limit; the
    job's end clears its names, so a job of the same id starts afresh."""
    w, store = worker(tmp_path, max_scalars_per_job=8), MemoryStore()
    with caplog.at_level(logging.ERROR, logger="tensorpulse.stream"):
        for step in range(50):
            w.process_one(JOB, _raw(JOB, step=step, s={"loss": 1.0, f"metric_{step}": 0.5}), None, store, SRC)
            series = [s for m in w.metrics.registry.collect() if m.name == "tensorpulse_scalar" for s in m.samples]
            assert len(series) == (2 if step < 7 else 1)  # the latest record's admitted scalars
    assert exceeded(w, "scalars_per_job") == 50 - 7  # loss and metric_0..6 are the 8 admitted names
    said = [r for r in caplog.records if "max_scalars_per_job" in r.getMessage()]
    assert len(said) == 1 and "metric_7" in said[0].getMessage()
    # the record is still evaluated: its kept scalars reach the rules and the metrics
    assert w.metrics.registry.get_sample_value(
        "tensorpulse_scalar", {"training_job": JOB, "rank": "0", "mode": "train", "name": "loss"}
    ) == 1.0
    w.process_one(JOB, _raw(JOB, kind="end", step=50), None, store, SRC)  # the job is over
    w.process_one(JOB, _raw(JOB, step=51, s={"brand_new": 2.0}), None, store, SRC)
    assert exceeded(w, "scalars_per_job") == 50 - 7


def test_exported_scalar_series_are_bounded_per_job_across_ranks_and_modes() -> None:
    """Ranks x modes x names: at most max_scalars_per_job series of a job on /metrics, the rest in a gauge."""
    registry = CollectorRegistry()
    m = WorkerMetrics(registry, max_scalars_per_job=10)
    for rank in range(4):
        m.observe(wire.decode(_raw(JOB, rank=rank, world=4, s={f"s{i}": 1.0 for i in range(4)})), 1.0)
    samples = [s for f in registry.collect() if f.name == "tensorpulse_scalar" for s in f.samples]
    assert len(samples) == 10
    assert registry.get_sample_value("tensorpulse_scalar_series_over_limit", {"training_job": JOB}) == 6


def intake(max_jobs: int, refused: list[int]) -> Intake:
    config = IntakeConfig(
        group="g", topic_prefix="tensorpulse.", jobs_regex=None, shards=4, discovery_interval=0.1,
        max_record_bytes=wire.MAX_RECORD_BYTES, topic_config={}, replication_factor=1,
        tick_interval=None, tick_horizon=3600.0, max_jobs=max_jobs,
    )  # fmt: skip
    return Intake(config, {"bootstrap.servers": "127.0.0.1:1"}, on_refused=refused.append)


def test_jobs_beyond_the_limit_are_not_read_until_there_is_room(caplog: pytest.LogCaptureFixture) -> None:
    """max_jobs=2 of 4 jobs: the jobs read already keep their place, new ones go in name order, the
    rest are said and counted once each; when a job goes, a waiting one is taken in."""
    refused: list[int] = []
    i = intake(2, refused)
    i.owned = {"t.d": "d"}
    jobs = {"t.a": "a", "t.b": "b", "t.c": "c", "t.d": "d"}
    with caplog.at_level(logging.ERROR, logger="tensorpulse.stream"):
        assert i.limit_jobs(jobs) == {"t.d": "d", "t.a": "a"}
        assert i.limit_jobs(jobs) == {"t.d": "d", "t.a": "a"}  # listed again: not counted again
    assert refused == [2] and i.refused == {"b", "c"}
    assert len(caplog.records) == 1 and "max_jobs=2" in caplog.text and "b, c" in caplog.text
    i.owned = {"t.d": "d", "t.a": "a"}
    del jobs["t.a"]  # job a's topic went away
    assert i.limit_jobs(jobs) == {"t.d": "d", "t.b": "b"} and i.refused == {"c"} and refused == [2]
    assert i.limit_jobs({"t.b": "b"}) == {"t.b": "b"} and i.refused == frozenset()


def test_ended_jobs_topics_do_not_keep_new_jobs_out(caplog: pytest.LogCaptureFixture) -> None:
    """max_jobs counts live jobs, not topics: of two jobs read, one has been silent for longer than
    the tick horizon (its idle end and its state's retention are over; its topic outlives it), so a
    new job takes its place; the ended one is left out without being counted as refused.

    The test sets the intake's `_last_seen` (when it last copied each job's record): the clock the
    intake keeps for its ticks is the behaviour under test, and nothing outside the intake sets it.
    """
    refused: list[int] = []
    i = intake(2, refused)
    now = time.monotonic()
    i.owned = {"t.d": "d", "t.e": "e"}
    i._last_seen.update({"d": now, "e": now - 7200.0})
    jobs = {"t.a": "a", "t.b": "b", "t.d": "d", "t.e": "e"}
    with caplog.at_level(logging.ERROR, logger="tensorpulse.stream"):
        assert i.limit_jobs(jobs) == {"t.d": "d", "t.a": "a"}
    assert i.refused == {"b", "e"} and refused == [1]
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().endswith("raise max_jobs): b")
    # with room (no new job waiting), the ended job is read as before
    assert i.limit_jobs({"t.d": "d", "t.e": "e"}) == {"t.d": "d", "t.e": "e"} and i.refused == frozenset()
