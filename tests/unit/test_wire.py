"""Wire format v1: round trips, size, and clear rejection of bad input."""

from __future__ import annotations

import math
import re

import msgpack
import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.errors import DecodeError


def _block(k: int = 3, **over) -> wire.TensorBlock:
    rng = np.random.default_rng(0)
    kw = dict(
        names=[f"layer{i}.weight" for i in range(k)],
        collections=["weights"] * k,
        n=np.full(k, 262_144),
        floats=rng.normal(size=(k, 5)).astype(np.float32),
        zeros=np.arange(k),
    )
    kw.update(over)
    return wire.TensorBlock(**kw)


def _encode(**over) -> bytes:
    kw = dict(job="job-1", rank=0, world=1, step=7, mode="train", ts=1.5e9, seq=3, scalars={"loss": 0.25})
    kw.update(over)
    return wire.encode(**kw)


def test_round_trip_keeps_every_field() -> None:
    """A record decodes to the same values it was encoded from (float32 statistics)."""
    block = _block(
        nan=np.array([0, 5, 0]),
        inf=np.array([0, 0, 2]),
        activity={1: [10, 1, 2, 3, 4, 5]},
        quantiles={2: (-0.5, 0.5)},
    )
    rec = wire.decode(_encode(tensors=block), wire.SchemaCache())
    assert (rec.job, rec.rank, rec.world, rec.step, rec.mode, rec.seq) == ("job-1", 0, 1, 7, "train", 3)
    assert rec.scalars == {"loss": 0.25}
    assert [t.name for t in rec.tensors] == ["layer0.weight", "layer1.weight", "layer2.weight"]
    for i, t in enumerate(rec.tensors):
        assert [t.mean, t.std, t.min, t.max, t.abs_mean] == pytest.approx(block.floats[i].tolist(), rel=1e-6)
        assert t.n == 262_144 and t.zeros == i
    assert (rec.tensors[1].nan, rec.tensors[2].inf) == (5, 2)
    assert rec.tensors[1].activity == (10, 1, 2, 3, 4, 5)
    assert rec.tensors[2].quantiles == (-0.5, 0.5)


def test_l2_is_derived_from_mean_std_and_count() -> None:
    """l2 = sqrt(n (std^2 + mean^2)), the identity the format relies on instead of sending it."""
    x = np.random.default_rng(1).normal(0.3, 2.0, 10_000)
    t = wire.TensorStats("x", "weights", x.size, x.mean(), x.std(), x.min(), x.max(), np.abs(x).mean(), 0)
    assert t.l2 == pytest.approx(np.linalg.norm(x), rel=1e-9)


def test_names_are_sent_once_and_recalled_from_the_schema_cache() -> None:
    """A record without names decodes with the names its producer announced earlier."""
    cache = wire.SchemaCache()
    first = _encode(tensors=_block(), announce=True)
    later = _encode(tensors=_block(), announce=False, step=8)
    assert len(later) < len(first)
    wire.decode(first, cache)
    assert [t.name for t in wire.decode(later, cache).tensors][0] == "layer0.weight"


def test_unannounced_schema_is_a_clear_error() -> None:
    """Without the announcement the reader says which schema of which job is unknown."""
    with pytest.raises(DecodeError) as err:
        wire.decode(_encode(tensors=_block(), announce=False), wire.SchemaCache())
    assert err.value.reason == "unknown_schema" and "job-1" in str(err.value)


def test_bytes_per_tensor_per_step_within_budget() -> None:
    """A non-announcing record costs at most 40 bytes per tensor (the issue's budget)."""
    k = 64
    block = _block(k, n=np.full(k, 401_408), zeros=np.full(k, 120_000))
    size = len(_encode(tensors=block, announce=False)) - len(_encode())
    assert size / k <= 40, size / k


def test_nan_and_inf_statistics_are_data_not_errors() -> None:
    """NaN/inf inside statistics and scalars decode as values (ExplodingTensor needs them)."""
    floats = np.array([[np.nan, np.inf, -np.inf, np.nan, np.inf]], dtype=np.float32)
    rec = wire.decode(
        _encode(tensors=_block(1, floats=floats), scalars={"loss": float("nan")}), wire.SchemaCache()
    )
    assert (
        math.isnan(rec.scalars["loss"]) and math.isnan(rec.tensors[0].mean) and rec.tensors[0].std == math.inf
    )


def _raw(**over) -> bytes:
    rec = msgpack.unpackb(_encode(), raw=False)
    rec.update(over)
    return msgpack.packb({k: v for k, v in rec.items() if v is not ...}, use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not_msgpack"),
        (b"\x93\x01", "not_msgpack"),  # truncated array
        (_encode()[:-3], "not_msgpack"),
        (b"\xc1", "not_msgpack"),  # reserved byte
        (msgpack.packb([1, 2, 3]), "not_a_record"),
        (_raw(v=2), "unknown_version"),
        (_raw(v="1"), "unknown_version"),
        (_raw(job=...), "missing_field"),
        (_raw(step="7"), "wrong_type"),
        (_raw(step=True), "wrong_type"),
        (_raw(step=-1), "bad_value"),
        (_raw(rank=2, world=2), "bad_value"),
        (_raw(mode="training"), "bad_value"),
        (_raw(job="../other"), "bad_job"),
        (_raw(ts=float("nan")), "bad_value"),
        (_raw(s={"loss": "low"}), "wrong_type"),
        (_raw(t={"sid": 1, "n": [1], "z": [0], "f": b"\0" * 20}), "unknown_schema"),
        (
            _raw(t={"sid": 1, "names": ["a"], "colls": ["w"], "n": [1], "z": [0], "f": b"\0" * 20}),
            "bad_tensors",
        ),
        (b"\x00" * (wire.MAX_RECORD_BYTES + 1), "too_large"),
        (_raw(t={"sid": 1, "names": ["a"], "colls": ["w"], "n": [-1], "z": [0], "f": b"\0" * 20}), "bad_tensors"),
        (_raw(t={"sid": 1, "names": ["a"], "colls": ["w"], "n": [True], "z": [0], "f": b"\0" * 20}), "bad_tensors"),
        (_raw(t={"sid": 1, "names": ["a"], "colls": ["w"], "n": [1], "z": [0.0], "f": b"\0" * 20}), "bad_tensors"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    """Every kind of bad input raises DecodeError with a stable reason token."""
    with pytest.raises(DecodeError) as err:
        wire.decode(payload, wire.SchemaCache())
    assert err.value.reason == reason, err.value


def test_column_length_mismatch_is_rejected() -> None:
    """A float matrix that does not match the announced tensor count is refused."""
    good = msgpack.unpackb(_encode(tensors=_block(2)), raw=False)
    good["t"]["f"] = good["t"]["f"][:-4]
    with pytest.raises(DecodeError, match="bad_tensors"):
        wire.decode(msgpack.packb(good, use_bin_type=True), wire.SchemaCache())


@pytest.mark.parametrize("sparse", [False, True])
def test_float_columns_decode_to_numpys_doubles_bit_for_bit(sparse: bool) -> None:
    """Every float32 bit pattern (signalling and quiet NaNs with payloads, infinities, -0.0,
    subnormals, the extremes) decodes to the double numpy's float32 -> float64 gives, with or
    without sparse columns (the decoder's two paths)."""
    patterns = [0x7F800001, 0x7FC00001, 0xFFA00000, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001]
    patterns += [0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBEAAAAAB, 0x00800000, 0x7FFFFFFF]
    patterns += [0xFFFFFFFF]
    bits = np.array(patterns, dtype="<u4").view("<f4").reshape(3, 5)
    block = _block(3, floats=bits, activity={1: [10, 1, 2, 3, 4, 5]} if sparse else None)
    rec = wire.decode(_encode(tensors=block), wire.SchemaCache())
    with np.errstate(invalid="ignore"):
        want = bits.astype(np.float64)
    got = np.array([[t.mean, t.std, t.min, t.max, t.abs_mean] for t in rec.tensors], dtype=np.float64)
    assert got.view("<u8").tolist() == want.view("<u8").tolist()


def test_select_filters_by_collection_and_regex() -> None:
    """StepRecord.select combines collection names and a regex search on tensor names."""
    block = _block(
        3,
        names=["a.weight", "gradient/a.weight", "net.1/relu_output"],
        collections=["weights", "gradients", "activations"],
    )
    rec = wire.decode(_encode(tensors=block), wire.SchemaCache())
    assert [t.name for t in rec.select(["gradients"])] == ["gradient/a.weight"]
    assert [t.name for t in rec.select(regex=r"relu_output$")] == ["net.1/relu_output"]
    assert [t.name for t in rec.select(["weights", "gradients"], r"^a")] == ["a.weight"]


def test_select_remembers_matches_per_pattern_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """select's remembered matches give what a search gives, for the same names in every record,
    for new names, for a second pattern, and past the bound (the memo starts again)."""
    from tensorpulse import records
    from tensorpulse.rules.base import compile_regex

    monkeypatch.setattr(records, "_MAX_NAMES", 3)
    relu = compile_regex(r"relu_output$", "tensor_regex")
    weights = compile_regex(r"weight", "tensor_regex")
    for i in range(4):  # the third record's names pass the bound of 3 remembered names
        names = ["a.weight", f"net.{i}/relu_output", f"b{i}.weight"]
        block = _block(3, names=names, collections=["weights", "activations", "weights"])
        rec = wire.decode(_encode(tensors=block), wire.SchemaCache())
        for pattern in (relu, weights, r"^a"):
            want = [n for n in names if re.search(getattr(pattern, "pattern", pattern), n)]
            assert [t.name for t in rec.select(regex=pattern)] == want
        assert [t.name for t in rec.select(["activations"], weights)] == []
        assert len(records._MATCHED[relu]) <= 3


def test_records_of_one_schema_share_it_and_what_it_remembers() -> None:
    """Every record of a schema, announced, recalled or announced again, carries the same
    wire.Schema; the selections remembered there equal those of the same tensors in a plain tuple,
    and the memo stays bounded whatever patterns callers pass."""
    import dataclasses
    import pickle

    from tensorpulse.rules import functional as F

    block = _block(
        4,
        names=["a.weight", "gradient/a.weight", "b.weight", "net.1/relu_output"],
        collections=["weights", "gradients", "weights", "activations"],
    )
    cache = wire.SchemaCache()
    recs = [wire.decode(_encode(tensors=block, announce=step % 3 == 0, step=step), cache) for step in range(6)]
    schema = recs[0].tensors.schema
    assert all(r.tensors.schema is schema for r in recs)
    for r in recs:
        plain = dataclasses.replace(r, tensors=tuple(r.tensors))
        for colls, regex in ((["gradients"], None), (None, "weight$"), (["weights"], "^a"), (None, None), ([], None)):
            assert r.select(colls, regex) == plain.select(colls, regex)
        assert F.frozen(r.tensors) == F.frozen(plain.tensors) == {"b.weight"}
    assert ("frozen", "gradient/") in schema.memo
    for i in range(wire.Schema.MAX_MEMO + 10):
        assert recs[-1].select(regex=f"^{i}") == []
    assert 0 < len(schema.memo) <= wire.Schema.MAX_MEMO
    assert pickle.loads(pickle.dumps(recs[0])) == recs[0]  # a copy's tensors are a plain tuple


def test_schema_cache_is_bounded() -> None:
    """The schema cache forgets the least recently used entries beyond its bound."""
    cache = wire.SchemaCache(max_entries=2)
    for i in range(5):
        cache[("j", 0, i)] = (["a"], ["w"])
    assert len(cache) == 2 and ("j", 0, 4) in cache and ("j", 0, 0) not in cache
