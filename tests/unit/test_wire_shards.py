"""The optional `t.sh` key (which shard of a parameter a row is, FSDP2) round-trips and is validated."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorpulse import wire
from tensorpulse.errors import DecodeError


def _payload(shards: dict[int, tuple[int, int, int, int]]) -> bytes:
    block = wire.TensorBlock(
        names=["0.weight", "gradient/0.weight", "0.bias"],
        collections=["weights", "gradients", "biases"],
        n=np.array([160, 160, 0]),
        floats=np.zeros((3, 5), dtype=np.float32),
        zeros=np.array([0, 0, 0]),
        shards=shards,
    )
    return wire.encode(job="j", rank=1, world=2, step=3, mode="train", ts=1.0, tensors=block)


def test_shard_marks_round_trip() -> None:
    """Each marked row decodes to its Shard (offset -1 is None); unmarked rows have none."""
    rec = wire.decode(_payload({0: (320, 1, 2, 160), 1: (320, 1, 2, -1)}), {})
    w, g, b = rec.tensors
    assert w.shard == wire.Shard(numel=320, index=1, count=2, offset=160)
    assert g.shard == wire.Shard(numel=320, index=1, count=2, offset=None)
    assert b.shard is None


def test_records_without_shards_have_none() -> None:
    """A record with no `sh` (every unsharded model) decodes as before."""
    rec = wire.decode(_payload({}), {})
    assert [t.shard for t in rec.tensors] == [None, None, None]
    assert b"sh" not in _payload({})


def test_unknown_tensor_keys_are_ignored() -> None:
    """How readers that predate `sh` read it: keys of `t` they do not know are skipped."""
    rec = msgpack.unpackb(_payload({0: (320, 1, 2, 160)}), raw=False, strict_map_key=False)
    rec["t"]["zz"] = {0: [1, 2, 3]}
    got = wire.decode(msgpack.packb(rec, use_bin_type=True), {})
    assert got.tensors[0].shard == wire.Shard(320, 1, 2, 160) and got.tensors[0].n == 160


@pytest.mark.parametrize(
    "entry",
    [
        [100, 0, 2, 0],  # numel smaller than the shard's n (160)
        [320, 2, 2, 0],  # index not below count
        [320, -1, 2, 0],  # negative index
        [320, 0, 0, 0],  # no shards at all
        [320, 0, 2, 161],  # the shard would end past the parameter
        [320, 0, 2, -2],  # offset neither -1 nor >= 0
        [320, 0, 2, 1.5],  # not an integer
        [320, True, 2, 0],  # a boolean is not an index
        [320, 0, 2],  # too short
    ],
)
def test_bad_shard_marks_are_refused(entry: list) -> None:
    """Every malformed `sh` entry is a DecodeError `bad_tensors`, never a crash or a silent pass."""
    rec = msgpack.unpackb(_payload({}), raw=False, strict_map_key=False)
    rec["t"]["sh"] = {0: entry}
    with pytest.raises(DecodeError) as err:
        wire.decode(msgpack.packb(rec, use_bin_type=True), {})
    assert err.value.reason == "bad_tensors"


def test_shard_mark_of_a_row_that_does_not_exist_is_refused() -> None:
    """An `sh` index beyond the tensor count is refused like any sparse column's."""
    rec = msgpack.unpackb(_payload({}), raw=False, strict_map_key=False)
    rec["t"]["sh"] = {7: [320, 0, 2, 0]}
    with pytest.raises(DecodeError) as err:
        wire.decode(msgpack.packb(rec, use_bin_type=True), {})
    assert err.value.reason == "bad_tensors"


leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=4)
entries = st.lists(leaves, max_size=6) | leaves | st.dictionaries(st.text(max_size=3), leaves, max_size=2)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.dictionaries(st.integers(-2, 4) | st.text(max_size=2), entries, max_size=3))
def test_any_shard_map_decodes_or_raises_decode_error(sh: dict) -> None:
    """Whatever `t.sh` holds, decoding gives valid Shard marks or a DecodeError, never another exception."""
    rec = msgpack.unpackb(_payload({}), raw=False, strict_map_key=False)
    rec["t"]["sh"] = sh
    try:
        got = wire.decode(msgpack.packb(rec, use_bin_type=True), {})
    except DecodeError:
        return
    for t in got.tensors:
        if t.shard is not None:
            assert t.n <= t.shard.numel and 0 <= t.shard.index < t.shard.count
            assert t.shard.offset is None or 0 <= t.shard.offset <= t.shard.numel - t.n
