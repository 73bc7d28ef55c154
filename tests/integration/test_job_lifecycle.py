"""A job's end, by its end record or by silence, resolves its alerts and removes its series."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from tensorpulse import wire
from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC, reductions_topic

from .helpers import create_topic, metric_value, read_topic, scrape, train_record, wait_for, worker_process

pytestmark = pytest.mark.integration


def _record(job: str, step: int, *, nan: bool) -> bytes:
    """Rank 0's step with one gradient, NaN from `nan` on (ExplodingTensor fires and stays firing)."""
    floats = np.array([[np.nan] * 5 if nan else [0.0, 0.1, -1.0, 1.0, 0.05]], dtype=np.float32)
    block = wire.TensorBlock(
        ["gradient/fc.weight"],
        ["gradients"],
        np.array([1000]),
        floats,
        np.zeros(1, dtype=np.int64),
        nan=np.array([10 if nan else 0]),
    )
    return train_record(job, step, seq=step, scalars={"loss": 1.0}, tensors=block, announce=step == 0)


def _events(bootstrap: str, job: str) -> list[AlertEvent]:
    evs = [AlertEvent.from_json(m.value()) for m in read_topic(bootstrap, ALERTS_TOPIC, timeout=1)]
    return [e for e in evs if e.job == job and e.rule == "ExplodingTensor"]


def _fire(bootstrap: str, job: str, url: str) -> Producer:
    """Publish 20 steps, NaN from step 10: wait until ExplodingTensor fires and /metrics shows it firing."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for step in range(20):
        producer.produce(reductions_topic(job), key=job.encode(), value=_record(job, step, nan=step >= 10))
    producer.flush(10)
    wait_for(
        lambda: [e for e in _events(bootstrap, job) if e.status == "firing"], 60, "ExplodingTensor firing"
    )
    wait_for(
        lambda: (
            metric_value(scrape(url), "tensorpulse_rule_firing", training_job=job, rule="ExplodingTensor")
            == 1
        ),
        20,
        "the firing gauge at 1",
    )
    return producer


def test_end_record_resolves_the_jobs_alerts_and_removes_its_series(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """A job still firing when its hook closes gets a resolved event that says so; its series go."""
    job = f"end-{unique}"
    create_topic(kafka_bootstrap, reductions_topic(job))
    with worker_process(kafka_bootstrap, tmp_path, group=f"g-{unique}", jobs_regex=f"^{job}$") as (_, url):
        producer = _fire(kafka_bootstrap, job, url)
        end = wire.encode(job=job, rank=0, world=1, step=19, mode="global", ts=time.time(), kind="end")
        producer.produce(reductions_topic(job), key=job.encode(), value=end)
        producer.flush(10)
        events = wait_for(
            lambda: (evs := _events(kafka_bootstrap, job)) and evs[-1].status == "resolved" and evs,
            30,
            "a resolved ExplodingTensor event",
        )
        assert [(e.status, e.step) for e in events] == [("firing", 10), ("resolved", 19)]
        assert "rank 0 finished" in events[-1].message
        wait_for(
            lambda: f'training_job="{job}"' not in scrape(url), 20, "the ended job's series to disappear"
        )


def test_a_silent_job_ends_after_the_idle_timeout(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """A job that stops publishing without an end record (a killed run) is resolved after job_idle_timeout_s."""
    job = f"idle-{unique}"
    create_topic(kafka_bootstrap, reductions_topic(job))
    config = tmp_path / "worker.yaml"
    config.write_text("job_idle_timeout_s: 3\n")
    with worker_process(
        kafka_bootstrap, tmp_path, group=f"g-{unique}", jobs_regex=f"^{job}$", extra=["--config", str(config)]
    ) as (_, url):
        _fire(kafka_bootstrap, job, url)
        events = wait_for(
            lambda: (evs := _events(kafka_bootstrap, job)) and evs[-1].status == "resolved" and evs,
            30,
            "a resolved event after the idle timeout",
        )
        assert [(e.status, e.step) for e in events] == [("firing", 10), ("resolved", 10)]
        assert "no record for" in events[-1].message and "job_idle_timeout_s=3" in events[-1].message
        wait_for(
            lambda: f'training_job="{job}"' not in scrape(url), 20, "the silent job's series to disappear"
        )


def _diverging(job: str, step: int, shift: float) -> bytes:
    """A step with one gradient, the same for every job at a step unless `shift` moves its mean."""
    floats = np.array([[0.01 * step + shift, 0.1, -1.0, 1.0, 0.05]], dtype=np.float32)
    block = wire.TensorBlock(
        ["gradient/fc.weight"], ["gradients"], np.array([1000]), floats, np.zeros(1, np.int64)
    )
    return train_record(job, step, seq=step, tensors=block, announce=step == 0)


def test_a_silent_job_resolves_its_cross_run_alerts_too(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """SimilarAcrossRuns firing for job A, then A and B go silent: after job_idle_timeout_s A's
    cross-run alert resolves with the idle reason (it used to fire for ever)."""
    job_a, job_b = f"xa-{unique}", f"xb-{unique}"
    for job in (job_a, job_b):
        create_topic(kafka_bootstrap, reductions_topic(job))
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "defaults: false\n"
        "rules:\n"
        "  - rule: SimilarAcrossRuns\n"
        f"    jobs: '^{job_a}$'\n"
        f"    params: {{other_trials: [{job_b}], collection_names: [gradients]}}\n"
    )
    config = tmp_path / "worker.yaml"
    config.write_text("job_idle_timeout_s: 3\n")
    with worker_process(
        kafka_bootstrap,
        tmp_path,
        group=f"g-{unique}",
        rules=rules,
        jobs_regex=f"-{unique}$",
        extra=["--config", str(config)],
    ):
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
        for step in range(6):
            producer.produce(reductions_topic(job_a), key=job_a.encode(), value=_diverging(job_a, step, 0.0))
            shift = 0.5 if step >= 4 else 0.0
            producer.produce(
                reductions_topic(job_b), key=job_b.encode(), value=_diverging(job_b, step, shift)
            )
        producer.flush(10)

        def similar() -> list[AlertEvent] | None:
            evs = [
                AlertEvent.from_json(m.value()) for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1)
            ]
            found = [e for e in evs if e.job == job_a and e.rule == "SimilarAcrossRuns"]
            return found if found and found[-1].status == "resolved" else None

        events = wait_for(
            similar, 60, "A's SimilarAcrossRuns alert to fire and then resolve after the idle timeout"
        )
        assert [(e.status, e.step) for e in events] == [("firing", 4), ("resolved", 4)]
        assert "job_idle_timeout_s=3" in events[-1].message
