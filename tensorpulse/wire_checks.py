"""Checks of one decoded value each, for the wire decoder: a bad value raises DecodeError.

Why a module: `wire.decode` and the decoders of the optional record maps (wire_extensions) share
them; each names what it checks, so a dead-lettered record says which key was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import DecodeError
from .records import MAX_NAME_LEN, MAX_SCALARS, Shard


def field_value(rec: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    """rec[key], required, of `types` (bool is never an int here)."""
    if key not in rec:
        raise DecodeError("missing_field", f"record has no '{key}' ({what})")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise DecodeError("wrong_type", f"'{key}' ({what}) is {type(value).__name__}, expected {types}")
    return value


def number(value: Any, what: str) -> float:
    """A float from an int or float (NaN and inf allowed: inside statistics they are data)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeError("wrong_type", f"{what} is {type(value).__name__}, expected a number")
    return float(value)


def count_column(t: Mapping[str, Any], key: str, k: int) -> list[int]:
    """Tensor column `key`: k counts >= 0."""
    values = t.get(key)
    if not isinstance(values, list) or len(values) != k:
        raise DecodeError("bad_tensors", f"tensor column '{key}' must be a list of {k} integers")
    # Two passes in C for the usual column (every value an int, bool excluded by `type is`, none
    # negative); the loop below names the bad value otherwise. Two columns of 50 per record.
    if not values or (set(map(type, values)) == {int} and min(values) >= 0):
        return values
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DecodeError("bad_tensors", f"tensor column '{key}' holds {v!r}, expected a count >= 0")
    return values


def sparse_column(t: Mapping[str, Any], key: str, k: int, width: int) -> dict[int, list[Any]]:
    """Sparse tensor column `key`: a map from row (0 <= row < k) to a list of `width` values."""
    values = t.get(key, {})
    if not isinstance(values, dict):
        raise DecodeError("bad_tensors", f"tensor column '{key}' must be a map")
    for i, v in values.items():
        if not isinstance(i, int) or not 0 <= i < k or not isinstance(v, list) or len(v) != width:
            raise DecodeError("bad_tensors", f"tensor column '{key}' has a bad entry {i!r}: {v!r}")
    return values


def named_map(value: Any, key: str) -> dict[str, Any]:
    """An optional map of short names to maps ({} when absent)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_SCALARS:
        raise DecodeError("wrong_type", f"'{key}' must be a map of at most {MAX_SCALARS} names")
    for name, entry in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN or not isinstance(entry, dict):
            raise DecodeError("wrong_type", f"'{key}' entry {name!r} must be a short name mapped to a map")
    return value


def count_list(value: Any, what: str, limit: int) -> tuple[int, ...]:
    """At most `limit` counts >= 0."""
    if not isinstance(value, list) or len(value) > limit:
        raise DecodeError("wrong_type", f"{what} must be a list of at most {limit} counts")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DecodeError("bad_value", f"{what} holds {v!r}, expected a count >= 0")
    return tuple(value)


def number_list(value: Any, what: str, limit: int) -> tuple[float, ...]:
    """At most `limit` numbers, as floats."""
    if not isinstance(value, list) or len(value) > limit:
        raise DecodeError("wrong_type", f"{what} must be a list of at most {limit} numbers")
    return tuple(number(v, what) for v in value)


def tolerance_of(t: Any) -> tuple[float, float] | None:
    """`t.tol`: the (rtol, atol) of the exact deltas, or None when absent."""
    tol = t.get("tol") if isinstance(t, dict) else None
    if tol is None:
        return None
    if not isinstance(tol, list) or len(tol) != 2:
        raise DecodeError("bad_tensors", "'t.tol' must be [rtol, atol]")
    return (number(tol[0], "t.tol rtol"), number(tol[1], "t.tol atol"))


def nonfinite_order_of(t: Mapping[str, Any], k: int) -> tuple[int, ...]:
    """`t.nfo`: distinct tensor indices (0 <= i < k), earliest non-finite first; () when absent."""
    order = t.get("nfo")
    if order is None:
        return ()
    if (
        not isinstance(order, list)
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k for i in order)
        or len(set(order)) != len(order)
    ):
        raise DecodeError("bad_tensors", f"'t.nfo' must be a list of distinct tensor indices below {k}")
    return tuple(order)


def shard_of(v: list[Any], n: int, name: str) -> Shard:
    """`t.sh` entry [numel, index, count, offset or -1] of a tensor of n elements."""
    if any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise DecodeError("bad_tensors", f"tensor {name!r}: shard {v!r} must be four integers")
    numel, index, count, offset = v
    if not (n <= numel < 2**63 and 0 <= index < count <= 1_000_000):
        raise DecodeError(
            "bad_tensors", f"tensor {name!r}: shard {v!r} needs n={n} <= numel and 0 <= index < count"
        )
    if offset != -1 and not 0 <= offset <= numel - n:
        raise DecodeError("bad_tensors", f"tensor {name!r}: shard offset {offset} outside 0..{numel - n}")
    return Shard(numel, index, count, None if offset == -1 else offset)
