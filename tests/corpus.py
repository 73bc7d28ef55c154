"""The bad-input corpus: payloads a reductions topic may carry, each with the verdict it must get.

`expected` is the DecodeError reason a worker files the payload under in the dead-letter topic,
or None for a record that is valid and must be evaluated (NaN in statistics, steps out of order
and repeated steps are data, not errors). The same corpus drives the codec's unit test and the
worker's end-to-end test, so both sides agree on every verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from tensorpulse import wire

NAMES = ["fc.weight", "gradient/fc.weight"]
COLLS = ["weights", "gradients"]


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes | None
    expected: str | None  # dead-letter reason, or None: a valid record
    key: bytes | None = None  # None: the job id (the normal key)
    step: int | None = None  # the step of a valid record


def good(
    job: str, step: int, *, announce: bool = False, nan: bool = False, ts: float = 1.0, rank: int = 0, world: int = 1
) -> bytes:
    """A valid record of `job` (announcing its schema when asked); `nan` puts NaN in the gradient."""
    floats = np.array([[0.0, 0.1, -0.3, 0.3, 0.08], [0.0, 0.01, -0.03, 0.03, 0.008]], dtype=np.float32)
    nans = np.zeros(2, dtype=np.int64)
    if nan:
        floats[1, :] = np.nan
        nans[1] = 5
    block = wire.TensorBlock(NAMES, COLLS, np.array([64, 64]), floats, np.zeros(2, dtype=np.int64), nan=nans)
    return wire.encode(
        job=job, rank=rank, world=world, step=step, mode="train", ts=ts, seq=step,
        scalars={"loss": 1.0 / (step + 1)}, tensors=block, announce=announce,
    )  # fmt: skip


def _raw(job_id: str, **changes: Any) -> bytes:
    rec: dict[str, Any] = {
        "v": 1, "kind": "step", "job": job_id, "rank": 0, "world": 1, "step": 7, "mode": "train",
        "ts": 1.0, "seq": 7, "s": {"loss": 0.5},
    }  # fmt: skip
    for k, v in changes.items():
        if v is _DROP:
            rec.pop(k, None)
        else:
            rec[k] = v
    return msgpack.packb(rec, use_bin_type=True)


_DROP = object()


def corpus(job: str, first_step: int) -> list[Case]:
    """Bad payloads for `job`, mixed with valid records whose steps start at `first_step`."""
    s = first_step
    valid = good(job, s)
    nested = b"\x91" * 100_000 + b"\xc0"  # [[[[...nil...]]]], 100k deep
    many = ["t"] * (wire.MAX_TENSORS + 1)
    return [
        Case("truncated record", valid[: len(valid) // 2], "not_msgpack"),
        Case("not msgpack (text)", b"hello, tensorpulse", "not_msgpack"),
        Case("JSON instead of msgpack", b'{"v": 1, "job": "x"}', "not_msgpack"),
        Case("empty payload", b"", "not_msgpack"),
        Case("version as an array (81a17690)", bytes.fromhex("81a17690"), "unknown_version"),
        Case("version as a map", msgpack.packb({"v": {}}), "unknown_version"),
        Case("null value (tombstone)", None, "wrong_type"),
        Case("two msgpack values", valid + valid, "not_msgpack"),
        Case("nesting bomb", nested, "not_msgpack"),
        Case("array header claiming 2^31 items", b"\xdd\x80\x00\x00\x00", "too_many_tensors"),
        Case("65,537 tensors in one record", _raw(job, t={"sid": 9, "names": many, "colls": many}), "too_many_tensors"),
        Case("rank beyond the worker's max_ranks_per_job", _raw(job, rank=5000, world=5001), "too_many_ranks"),
        Case("msgpack extension type", msgpack.packb(msgpack.ExtType(1, b"\x00" * 8)), "not_msgpack"),
        Case("top level is a list", msgpack.packb([1, 2, 3]), "not_a_record"),
        Case("unknown version 2", _raw(job, v=2), "unknown_version"),
        Case("version as a string", _raw(job, v="1"), "unknown_version"),
        Case("no version", _raw(job, v=_DROP), "unknown_version"),
        Case("missing step", _raw(job, step=_DROP), "missing_field"),
        Case("missing job", _raw(job, job=_DROP), "missing_field"),
        Case("step as a string", _raw(job, step="7"), "wrong_type"),
        Case("rank as a bool", _raw(job, rank=True), "wrong_type"),
        Case("scalars as a list", _raw(job, s=[0.5]), "wrong_type"),
        Case("scalar as a string", _raw(job, s={"loss": "0.5"}), "wrong_type"),
        Case("tensors as a string", _raw(job, t="weights"), "bad_tensors"),
        Case("negative step", _raw(job, step=-1), "bad_value"),
        Case("rank outside world", _raw(job, rank=3, world=2), "bad_value"),
        Case("unknown mode", _raw(job, mode="training"), "bad_value"),
        Case("NaN publish time", _raw(job, ts=math.nan), "bad_value"),
        Case("infinite publish time", _raw(job, ts=math.inf), "bad_value"),
        Case("NaN step", _raw(job, step=math.nan), "wrong_type"),
        Case("job id with a path", _raw(job, job="../etc"), "bad_job"),
        Case("another job's record", _raw(job, job=f"{job}-other"), "job_mismatch"),
        Case("wrong message key", _raw(job), "wrong_key", key=b"someone-else"),
        Case("10 MB payload", _raw(job, s={"x" * 10_000_000: 1.0}), "too_large"),
        Case(
            "schema never announced",
            wire.encode(
                job=job, rank=0, world=1, step=s, mode="train", ts=1.0,
                tensors=wire.TensorBlock(["never.seen"], ["weights"], np.array([1]),
                                         np.zeros((1, 5), np.float32), np.array([0])),
                announce=False,
            ),
            "unknown_schema",
        ),  # fmt: skip
        Case("bad float column length", _raw(job, t={"sid": 5, "names": ["a"], "colls": ["w"], "n": [1],
                                                     "f": b"\x00" * 7, "z": [0]}), "bad_tensors"),  # fmt: skip
        Case("valid record", valid, None, step=s),
        Case("NaN and inf in statistics are data", good(job, s + 1, nan=True), None, step=s + 1),
        Case("NaN loss is data", _raw(job, step=s + 2, s={"loss": math.nan}), None, step=s + 2),
        Case("step out of order", good(job, s - 5), None, step=s - 5),
        Case("duplicated step", good(job, s + 1), None, step=s + 1),
        Case("valid after all that", good(job, s + 3), None, step=s + 3),
    ]
