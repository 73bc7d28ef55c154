"""Synthetic training jobs for the load benchmark: wire records built without torch, sent at a paced rate.

Each simulated job reports M tensors per step (half weights, half gradients) whose statistics
are drawn once from a seeded generator and then vary a little from step to step, plus a slowly
decreasing loss. A fault is one step whose first tensor holds NaN (with NaN min/max/mean, as a
real hook reports it), so ExplodingTensor fires on that step and resolves on the next one.
Everything but the record timestamps and the job-id suffix follows from the seed.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tensorpulse import wire
from tensorpulse.kafka import client_config
from tensorpulse.topics import reductions_topic

#: Steps between re-announcements of a job's tensor names (the hook's default).
ANNOUNCE_EVERY = 100
#: Per-step variants of a job's statistics (cycled; cheaper than drawing noise per record).
VARIANTS = 16
NAN_IN_FAULT = 7
RETENTION_MS = str(24 * 3600 * 1000)


@dataclass(frozen=True, slots=True)
class Fault:
    """A step that carries NaN: the alert it should cause is matched by (job, step)."""

    job: str
    step: int
    ts: float
    level: int


class SyntheticJob:
    """One simulated job (rank 0 of 1): a deterministic sequence of step records."""

    def __init__(self, job: str, tensors: int, rng: np.random.Generator) -> None:
        if tensors < 1:
            raise ValueError(f"Expected argument `tensors` to be >= 1 but got {tensors}")
        self.job = job
        self.topic = reductions_topic(job)
        self.key = job.encode()
        half = (tensors + 1) // 2
        self.names = [f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(half)]
        self.names += [
            f"gradient/layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(tensors - half)
        ]
        self.colls = ["weights"] * half + ["gradients"] * (tensors - half)
        self.sid = wire.schema_id(self.names, self.colls)
        scale = np.where(np.arange(tensors) < half, 0.05, 1e-3)  # weights vs gradients
        std = scale * rng.uniform(0.5, 2.0, tensors)
        mean = std * rng.normal(0.0, 0.1, tensors)
        base = np.column_stack([mean, std, mean - 4 * std, mean + 4 * std, 0.8 * std])
        self.n = rng.integers(1_000, 1_000_000, tensors)
        self.zeros = np.zeros(tensors, dtype=np.int64)
        self.variants = [
            (base * (1.0 + 0.01 * rng.standard_normal(base.shape))).astype(np.float32)
            for _ in range(VARIANTS)
        ]
        faulty = self.variants[0].copy()
        faulty[0, :] = np.nan
        self.faulty = faulty
        self.nan = np.zeros(tensors, dtype=np.int64)
        self.nan[0] = NAN_IN_FAULT
        self.step = 0
        self.pending_fault = False
        self.last_faulty = False

    def next_record(self) -> tuple[bytes, int, float, bool]:
        """(payload, step, record ts, whether this step is a fault) of the job's next step."""
        step = self.step
        self.step += 1
        # A fault right after a fault would not fire again (the rule is still firing): wait one step.
        fault = self.pending_fault and not self.last_faulty
        if fault:
            self.pending_fault = False
        self.last_faulty = fault
        block = wire.TensorBlock(
            self.names,
            self.colls,
            self.n,
            self.faulty if fault else self.variants[step % VARIANTS],
            self.zeros,
            nan=self.nan if fault else None,
        )
        ts = time.time()
        payload = wire.encode(
            job=self.job,
            rank=0,
            world=1,
            step=step,
            mode="train",
            ts=ts,
            seq=step,
            scalars={"loss": 0.1 + 2.0 / (1.0 + step / 200.0)},
            tensors=block,
            announce=step % ANNOUNCE_EVERY == 0,
            sid=self.sid,
        )
        return payload, step, ts, fault


def make_jobs(run_id: str, jobs: int, tensors: int, seed: int) -> list[SyntheticJob]:
    """`jobs` simulated jobs named load-<run id>-<index>, their statistics drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return [SyntheticJob(f"load-{run_id}-{i:04d}", tensors, rng) for i in range(jobs)]


def create_topics(bootstrap: str, topics: Iterable[str], partitions: int = 1, timeout: float = 30.0) -> None:
    """Create the jobs' reductions topics up front, so that a worker joins its group only once."""
    admin = AdminClient(client_config(bootstrap))
    new = [NewTopic(t, partitions, 1, config={"retention.ms": RETENTION_MS}) for t in topics]
    for topic, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"cannot create topic {topic} on {bootstrap}: {exc}") from exc


class LoadGenerator:
    """Sends the jobs' records round-robin at a total rate; counts what was sent, delivered, failed.

    One producer for all jobs (the hook's settings: lz4, acks=all, short linger). Faults are
    scheduled `faults_per_s` times a second in total on jobs drawn (seeded) from the first
    `fault_jobs` jobs; the chosen job's next step carries the NaN.
    """

    def __init__(
        self,
        bootstrap: str,
        jobs: list[SyntheticJob],
        *,
        faults_per_s: float,
        fault_jobs: int,
        seed: int,
    ) -> None:
        if not jobs:
            raise ValueError("Expected at least one job")
        self.jobs = jobs
        self.faults_per_s = max(0.0, faults_per_s)
        self.fault_jobs = jobs[: max(1, min(fault_jobs, len(jobs)))]
        self._rng = random.Random(seed)
        self.producer = Producer(
            client_config(
                bootstrap,
                {
                    "compression.type": "lz4",
                    "linger.ms": 5,
                    "acks": "all",
                    "batch.num.messages": 10_000,
                    "queue.buffering.max.messages": 1_000_000,
                    "client.id": "tensorpulse-loadgen",
                },
            )
        )
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self.tensor_stats = 0
        self.faults: list[Fault] = []
        self.level = -1
        self._rr = 0
        self._first_error: str | None = None

    def _on_delivery(self, err, msg) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            self._first_error = self._first_error or str(err)

    def _emit(self, job: SyntheticJob) -> None:
        payload, step, ts, fault = job.next_record()
        while True:
            try:
                self.producer.produce(job.topic, payload, key=job.key, on_delivery=self._on_delivery)
                break
            except BufferError:  # librdkafka's queue is full: let it drain
                self.producer.poll(0.05)
        self.sent += 1
        self.tensor_stats += len(job.names)
        if fault:
            self.faults.append(Fault(job.job, step, ts, self.level))

    def announce_all(self) -> None:
        """One record (with tensor names) per job, so that every job exists for the worker."""
        for job in self.jobs:
            self._emit(job)
        self.flush()

    def run(self, rate: float, seconds: float, level: int) -> tuple[int, float]:
        """Offer `rate` records/s in total for `seconds`; returns (records sent, wall seconds).

        When the generator cannot keep up it sends as fast as it can: the caller compares the
        achieved rate with the target.
        """
        if rate <= 0:
            raise ValueError(f"Expected a rate > 0 records/s but got {rate}")
        self.level = level
        n_jobs = len(self.jobs)
        fault_period = math.inf if self.faults_per_s == 0 else rate / self.faults_per_s
        next_fault = fault_period / 2
        sent = 0
        t0 = time.monotonic()
        end = t0 + seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = min(int((now - t0) * rate) + 1, sent + 2_000)
            while sent < due:
                if sent >= next_fault:
                    self._rng.choice(self.fault_jobs).pending_fault = True
                    next_fault += fault_period
                self._emit(self.jobs[self._rr % n_jobs])
                self._rr += 1
                sent += 1
            self.producer.poll(0)
            wait = sent / rate - (time.monotonic() - t0)
            if wait > 0:
                time.sleep(min(wait, 0.02, max(0.0, end - time.monotonic())))
        return sent, time.monotonic() - t0

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery reports; returns how many records are still undelivered."""
        left = self.producer.flush(timeout)
        if self.failed and self._first_error:
            print(
                f"warning: {self.failed} record(s) not delivered, first error: {self._first_error}",
                flush=True,
            )
        return left

    def close(self) -> None:
        """Flush and drop the producer (before the broker goes away, so that it logs no disconnect)."""
        with contextlib.suppress(Exception):
            self.producer.flush(5)
        del self.producer
