"""The optional per-record maps of wire v1: label counts `cls`, image sums `img`, token counts
`tok` and named vectors `vec`, encoded and decoded (readers that predate a map ignore it).

Why apart from the codec: they are independent of the tensor columns, and each is a small
format of its own with its own limits (docs/wire-format.md, "Optional keys").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import DecodeError
from .records import (
    MAX_CHANNELS,
    MAX_CONFUSION_CLASSES,
    MAX_NAME_LEN,
    MAX_SCALARS,
    MAX_TENSORS,
    ClassCounts,
    ImageSums,
    TokenCounts,
    Vector,
)
from .wire_checks import count_list, named_map, number_list


def encode_extensions(
    rec: dict[str, Any],
    classes: Mapping[str, ClassCounts] | None,
    images: Mapping[str, ImageSums] | None,
    tokens: Mapping[str, TokenCounts] | None,
    vectors: Mapping[str, Vector] | None,
) -> None:
    """Adds the maps that are not empty to `rec`, in this order (`cls`, `img`, `tok`, `vec`)."""
    if classes:
        rec["cls"] = {
            str(name): {"l": [int(x) for x in c.labels]}
            | ({} if c.confusion is None else {"c": [int(x) for x in c.confusion]})
            for name, c in classes.items()
        }
    if images:
        rec["img"] = {
            str(name): {
                "n": int(im.images),
                "p": int(im.pixels),
                "s": [float(x) for x in im.sums],
                "q": [float(x) for x in im.sumsq],
            }
            for name, im in images.items()
        }
    if tokens:
        rec["tok"] = {
            str(name): {"n": int(tc.total), "c": {int(v): int(c) for v, c in tc.counts.items()}}
            for name, tc in tokens.items()
        }
    if vectors:
        rec["vec"] = {
            str(name): {"v": np.asarray(vec.values, dtype="<f4").tobytes()}
            | ({} if vec.labels is None else {"k": [str(x) for x in vec.labels]})
            for name, vec in vectors.items()
        }


def decode_classes(value: Any) -> dict[str, ClassCounts]:
    out = {}
    for name, entry in named_map(value, "cls").items():
        labels = count_list(entry.get("l"), f"cls[{name!r}].l", MAX_TENSORS)
        k = len(labels)
        confusion = entry.get("c")
        if confusion is not None:
            if k > MAX_CONFUSION_CLASSES:
                raise DecodeError("bad_value", f"cls[{name!r}]: confusion counts for {k} > 256 classes")
            confusion = count_list(confusion, f"cls[{name!r}].c", k * k)
            if len(confusion) != k * k:
                raise DecodeError("bad_value", f"cls[{name!r}].c must hold {k}×{k} counts")
        out[name] = ClassCounts(k, labels, confusion)
    return out


def decode_images(value: Any) -> dict[str, ImageSums]:
    out = {}
    for name, entry in named_map(value, "img").items():
        images, pixels = entry.get("n"), entry.get("p")
        for what, v in (("n", images), ("p", pixels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DecodeError("wrong_type", f"img[{name!r}].{what} must be a count >= 0")
        sums = number_list(entry.get("s"), f"img[{name!r}].s", MAX_CHANNELS)
        sumsq = number_list(entry.get("q", [0.0] * len(sums)), f"img[{name!r}].q", MAX_CHANNELS)
        if len(sumsq) != len(sums):
            raise DecodeError("bad_value", f"img[{name!r}]: {len(sums)} sums but {len(sumsq)} squares")
        out[name] = ImageSums(images, pixels, sums, sumsq)
    return out


def decode_tokens(value: Any) -> dict[str, TokenCounts]:
    out = {}
    for name, entry in named_map(value, "tok").items():
        total, counts = entry.get("n"), entry.get("c", {})
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise DecodeError("wrong_type", f"tok[{name!r}].n must be a count >= 0")
        if not isinstance(counts, dict) or len(counts) > MAX_SCALARS:
            raise DecodeError("wrong_type", f"tok[{name!r}].c must be a map of token value -> count")
        for v, c in counts.items():
            if isinstance(v, bool) or not isinstance(v, int) or isinstance(c, bool) or not isinstance(c, int):
                raise DecodeError("wrong_type", f"tok[{name!r}].c has a bad entry {v!r}: {c!r}")
            if not 0 <= c <= total:
                raise DecodeError("bad_value", f"tok[{name!r}]: {c} tokens of value {v} of {total}")
        out[name] = TokenCounts(total, dict(counts))
    return out


def decode_vectors(value: Any) -> dict[str, Vector]:
    out = {}
    for name, entry in named_map(value, "vec").items():
        raw, labels = entry.get("v"), entry.get("k")
        if not isinstance(raw, bytes) or len(raw) % 4 or len(raw) > 4 * MAX_TENSORS:
            raise DecodeError("wrong_type", f"vec[{name!r}].v must be float32 bytes (at most {MAX_TENSORS})")
        values = tuple(np.frombuffer(raw, dtype="<f4").astype(np.float64).tolist())
        if labels is not None:
            if (
                not isinstance(labels, list)
                or len(labels) != len(values)
                or not all(isinstance(x, str) and len(x) <= MAX_NAME_LEN for x in labels)
            ):
                raise DecodeError("wrong_type", f"vec[{name!r}].k must be one short label per value")
            labels = tuple(labels)
        out[name] = Vector(values, labels)
    return out
