"""Every payload of the bad-input corpus gets its verdict from the shared codec, and nothing else."""

from __future__ import annotations

import pytest
from corpus import corpus, good

from tensorpulse import wire
from tensorpulse.errors import DecodeError

JOB = "corpus-job"
WORKER_ONLY = {"wrong_key", "job_mismatch"}  # the topic and key are the worker's to check


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
