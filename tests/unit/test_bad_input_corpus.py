"""Every payload of the bad-input corpus gets its verdict from the shared codec, and nothing else."""

from __future__ import annotations

import random

import msgpack
import pytest
from corpus import corpus, good

from tensorpulse import wire
from tensorpulse.errors import DecodeError

JOB = "corpus-job"
WORKER_ONLY = {"wrong_key", "job_mismatch", "too_many_ranks"}  # the worker's to check (topic, key, its limits)


@pytest.mark.parametrize("case", corpus(JOB, 10), ids=lambda c: c.name)
def test_corpus_verdicts(case) -> None:
    schemas = wire.SchemaCache()
    wire.decode(good(JOB, 0, announce=True), schemas)
    if case.expected is None or case.expected in WORKER_ONLY:
        record = wire.decode(case.payload, schemas)
        if case.expected == "job_mismatch":
            assert record.job != JOB
        else:
            assert record.job == JOB and record.step == (case.step if case.step is not None else record.step)
        return
    with pytest.raises(DecodeError) as info:
        wire.decode(case.payload, schemas)
    assert info.value.reason == case.expected, info.value
    assert str(info.value)  # a message a person can act on


def test_corpus_covers_what_the_issue_lists() -> None:
    reasons = {c.expected for c in corpus(JOB, 10)}
    assert {"not_msgpack", "unknown_version", "wrong_type", "missing_field", "too_large", "bad_value",
            "job_mismatch", "bad_job"} <= reasons  # fmt: skip
    assert any(c.expected is None and "NaN" in c.name for c in corpus(JOB, 10))


def _mutations(payload: bytes, rng: random.Random, n: int) -> list[bytes]:
    """`n` variants of `payload`: bytes flipped, cut, repeated, and fields swapped for other shapes."""
    shapes: list[object] = [None, True, -1, 2**64 - 1, float("inf"), float("nan"), "x", b"\x00", [], [[1]], {}, {"a": [1]}]
    out = []
    for _ in range(n):
        how = rng.randrange(4)
        if how == 0:
            b = bytearray(payload)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            out.append(bytes(b))
        elif how == 1:
            out.append(payload[: rng.randrange(len(payload))] + payload[rng.randrange(len(payload)) :])
        else:  # one field (top level or in the tensor block) replaced by a value of another shape
            doc = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            where = doc if how == 2 or "t" not in doc else doc["t"]
            where[rng.choice(sorted(where))] = rng.choice(shapes)
            out.append(msgpack.packb(doc, use_bin_type=True))
    return out


def test_decoder_raises_only_decode_error_on_mutated_records() -> None:
    """3,000 seeded mutations of valid records (with and without names): DecodeError or a record, nothing else."""
    rng = random.Random(20261207)
    schemas = wire.SchemaCache()
    wire.decode(good(JOB, 0, announce=True), schemas)
    reasons: set[str] = set()
    for base in (good(JOB, 1, announce=True), good(JOB, 2, nan=True)):
        for payload in _mutations(base, rng, 1500):
            try:
                wire.decode(payload, schemas)
            except DecodeError as exc:
                reasons.add(exc.reason)
    assert {"not_msgpack", "wrong_type", "bad_tensors"} <= reasons
