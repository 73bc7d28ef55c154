"""The optional v1 keys added for the full rule catalogue round-trip, and are validated."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.errors import DecodeError


def _block() -> wire.TensorBlock:
    return wire.TensorBlock(
        names=["weights/fc.weight", "gradients/fc.weight"],
        collections=["weights", "gradients"],
        n=np.array([6, 6]),
        floats=np.zeros((2, 5), dtype=np.float32),
        zeros=np.array([0, 6]),
        deltas={0: (9, 0.5, 2.0, -1e-6)},
        tolerance=(1e-5, 1e-8),
    )


def _encode(**extra) -> bytes:
    return wire.encode(job="j", rank=0, world=1, step=10, mode="train", ts=1.0, **extra)


def test_extensions_round_trip() -> None:
    payload = _encode(
        tensors=_block(),
        classes={"labels": wire.ClassCounts(2, (3, 1), (2, 1, 0, 1))},
        images={"inputs": wire.ImageSums(4, 9, (1.5, -2.0, 0.0), (3.0, 4.0, 0.0))},
        tokens={"input_ids": wire.TokenCounts(100, {0: 60, 1: 2})},
        vectors={"feature_importance/gain": wire.Vector((0.5, 0.25), ("f0", "f1"))},
    )
    rec = wire.decode(payload, {})
    w, g = rec.tensors
    assert w.delta == wire.Delta(9, 0.5, 2.0, pytest.approx(-1e-6))
    assert g.delta is None
    assert rec.tolerance == (1e-5, 1e-8)
    cls = rec.classes["labels"]
    assert cls.labels == (3, 1) and cls.predicted() == (2, 2) and cls.correct() == (2, 1)
    img = rec.images["inputs"]
    assert img.channel_means()[0] == pytest.approx(1.5 / 36) and img.sumsq[1] == 4.0
    assert rec.tokens["input_ids"].counts == {0: 60, 1: 2}
    assert rec.vectors["feature_importance/gain"] == wire.Vector((0.5, 0.25), ("f0", "f1"))


def test_records_without_extensions_decode_to_empty_maps() -> None:
    rec = wire.decode(_encode(scalars={"loss": 1.0}), {})
    assert rec.classes == {} and rec.images == {} and rec.tokens == {} and rec.vectors == {}
    assert rec.tolerance is None


def test_nan_in_image_sums_is_data() -> None:
    rec = wire.decode(_encode(images={"x": wire.ImageSums(1, 1, (math.nan,), (math.nan,))}), {})
    assert math.isnan(rec.images["x"].sums[0])


def _raw(extra: dict) -> bytes:
    rec = {"v": 1, "kind": "step", "job": "j", "rank": 0, "world": 1, "step": 1, "mode": "train", "ts": 1.0}
    return msgpack.packb(rec | extra, use_bin_type=True)


@pytest.mark.parametrize(
    "extra",
    [
        {"cls": {"labels": {"l": [1, -1]}}},
        {"cls": {"labels": {"l": [1, 1], "c": [1, 0, 0]}}},
        {"cls": {"labels": {"l": "xx"}}},
        {"cls": []},
        {"img": {"x": {"n": 1, "p": 1, "s": [1.0], "q": [1.0, 2.0]}}},
        {"img": {"x": {"n": -1, "p": 1, "s": [1.0]}}},
        {"tok": {"ids": {"n": 5, "c": {0: 6}}}},
        {"tok": {"ids": {"n": 5, "c": {"a": 1}}}},
        {"vec": {"fi": {"v": b"abc"}}},
        {"vec": {"fi": {"v": b"abcd", "k": ["a", "b"]}}},
        {"skip": 1},
    ],
)
def test_bad_extensions_are_rejected_with_a_reason(extra: dict) -> None:
    with pytest.raises(DecodeError) as info:
        wire.decode(_raw(extra), {})
    assert info.value.reason in {"wrong_type", "bad_value"}


def test_skipped_step_round_trips_and_defaults_to_false() -> None:
    """`skip` (a step the GradScaler skipped) is sent only when true; absent decodes as False."""
    assert wire.decode(_encode(skipped=True), {}).skipped is True
    plain = _encode()
    assert b"skip" not in plain and wire.decode(plain, {}).skipped is False
