"""The bad-input corpus through a real worker: every bad record dead-lettered and counted, every
valid one evaluated, and the pipeline never stops (a fault after all of them still alerts)."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from corpus import corpus, good

from tensorpulse.topics import ALERTS_TOPIC, DEADLETTER_TOPIC, reductions_topic

from .helpers import RETENTION, metric_value, read_topic, scrape, wait_for, worker_process

pytestmark = pytest.mark.integration

BIG = 16 * 1024 * 1024  # lets the 10 MB payload reach the worker, so that the worker's limit is what stops it


def test_corpus_through_a_worker(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    job = f"corpus-{unique}"
    topic = reductions_topic(job)
    evil = f"{topic}.evil"  # under the prefix, but "corpus-….evil" is not a valid job id
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    new = [NewTopic(t, 1, 1, config={**RETENTION, "max.message.bytes": str(BIG)}) for t in (topic, evil)]
    for fut in admin.create_topics(new).values():
        fut.result(10)

    cases = corpus(job, first_step=20)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5, "message.max.bytes": BIG})
    sent: list[tuple[str, str | None]] = []

    def send(payload: bytes | None, expected: str | None, name: str, key: bytes | None = None) -> None:
        producer.produce(topic, key=key or job.encode(), value=payload)
        sent.append((name, expected))

    for step in range(10):
        send(good(job, step, announce=step == 0, ts=time.time()), None, f"warm-up {step}")
    for case in cases:  # each bad record is followed by a valid one, which must still be processed
        send(case.payload, case.expected, case.name, case.key)
        if case.expected is not None:
            send(good(job, 10 + len(sent) % 9, ts=time.time()), None, f"valid after {case.name}")
    fault_step = 100
    send(good(job, fault_step, nan=True, ts=time.time()), None, "fault after the corpus")
    producer.produce(evil, key=b"evil", value=good(job, 1))
    assert producer.flush(30) == 0

    expected_dead = collections.Counter(e for _, e in sent if e is not None)
    valid = sum(1 for _, e in sent if e is None)
    with worker_process(kafka_bootstrap, tmp_path, group=f"g-{unique}", jobs_regex=f"^{job}") as (proc, url):

        def alerted() -> list[dict] | None:
            evs = [json.loads(m.value()) for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1)]
            evs = [e for e in evs if e["job"] == job and e["rule"] == "ExplodingTensor"]
            return evs if any(e["step"] == fault_step for e in evs) else None

        wait_for(alerted, 90, "the ExplodingTensor alert raised after the whole corpus")

        def dead_letters() -> list[dict] | None:
            docs = [json.loads(m.value()) for m in read_topic(kafka_bootstrap, DEADLETTER_TOPIC, timeout=1)]
            docs = [d for d in docs if d["topic"] == topic]
            return docs if len(docs) >= sum(expected_dead.values()) else None

        dead = wait_for(dead_letters, 30, "every bad record in the dead-letter topic")
        assert collections.Counter(d["reason"] for d in dead) == expected_dead
        for d in dead:  # where it came from and why, so that an operator can find and replay it
            assert d["job"] == job and d["partition"] == 0 and d["offset"] >= 0 and d["error"]
            assert d["size"] <= 11_000_000 and (d["truncated"] == (d["size"] > 256 * 1024))
        assert len({d["offset"] for d in dead}) == len(dead)

        def counted() -> str | None:
            text = scrape(url)
            return text if metric_value(text, "tensorpulse_records_total", training_job=job) == valid else None

        text = wait_for(counted, 30, f"{valid} valid records counted")
        # records in = records evaluated + records dead-lettered (this worker follows only this job)
        dead_total = sum(metric_value(text, "tensorpulse_deadletter_total", reason=r) or 0 for r in expected_dead)
        assert valid + dead_total == len(sent)
        for reason, n in expected_dead.items():
            assert metric_value(text, "tensorpulse_deadletter_total", reason=reason) == n, reason
        assert proc.poll() is None
    log_text = (tmp_path / f"worker-g-{unique}.log").read_text(errors="replace")
    assert f"ignoring topic '{evil}'" in log_text
    assert "offset" in log_text and topic in log_text  # rejections name topic, partition and offset
