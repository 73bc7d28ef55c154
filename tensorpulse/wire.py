"""Wire format v1: the one encoder/decoder that producers and stream processors share.

A record is a msgpack map describing one (job, rank, step, mode). Tensor statistics travel
column-wise: float statistics as one little-endian float32 matrix (a msgpack `bin`), counts
as msgpack integer arrays (1 byte each when small). Tensor names are sent only when a
producer announces its *schema* (first record, then every `announce_every` records); other
records carry the schema id. This keeps a tensor's statistics at about 25-30 bytes per step.
The contract is documented in docs/wire-format.md; change both together.
"""

from __future__ import annotations

import array
import math
import operator
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import msgpack
import numpy as np

from .errors import DecodeError
from .records import (
    ACTIVITY_EDGES,
    FLOAT_COLUMNS,
    KINDS,
    MAX_CHANNELS,
    MAX_CONFUSION_CLASSES,
    MAX_NAME_LEN,
    MAX_RECORD_BYTES,
    MAX_SCALARS,
    MAX_TENSORS,
    MODES,
    SUPPORTED_VERSIONS,
    VERSION,
    ClassCounts,
    Delta,
    ImageSums,
    Schema,
    SchemaCache,
    Shard,
    StepRecord,
    TensorBlock,
    Tensors,
    TensorStats,
    TokenCounts,
    Vector,
    schema_id,
)
from .topics import validate_job
from .wire_checks import (
    count_column,
    field_value,
    nonfinite_order_of,
    number,
    shard_of,
    sparse_column,
    tolerance_of,
)
from .wire_extensions import decode_classes, decode_images, decode_tokens, decode_vectors, encode_extensions

__all__ = [
    "ACTIVITY_EDGES",
    "FLOAT_COLUMNS",
    "KINDS",
    "MAX_CHANNELS",
    "MAX_CONFUSION_CLASSES",
    "MAX_NAME_LEN",
    "MAX_RECORD_BYTES",
    "MAX_SCALARS",
    "MAX_TENSORS",
    "MODES",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "ClassCounts",
    "DecodeError",
    "Delta",
    "ImageSums",
    "Schema",
    "SchemaCache",
    "Shard",
    "StepRecord",
    "TensorBlock",
    "TensorStats",
    "Tensors",
    "TokenCounts",
    "Vector",
    "decode",
    "encode",
    "peek_job",
    "schema_id",
]

#: array.array("f") reads the wire's little-endian float32 as it is (else numpy converts).
_NATIVE_F32 = sys.byteorder == "little" and array.array("f").itemsize == 4

#: The sparse tensor columns: a record without any of them decodes by the dense path alone.
_SPARSE_KEYS = frozenset({"nf", "act", "q", "d", "ds", "sh"})

_unpack_limits = dict(
    max_str_len=MAX_RECORD_BYTES,
    max_bin_len=MAX_RECORD_BYTES,
    max_array_len=MAX_TENSORS,
    max_map_len=max(MAX_SCALARS, MAX_TENSORS),
    max_ext_len=0,
)


def encode(
    *,
    job: str,
    rank: int,
    world: int,
    step: int,
    mode: str,
    ts: float,
    seq: int = 0,
    kind: str = "step",
    scalars: Mapping[str, float] | None = None,
    tensors: TensorBlock | None = None,
    announce: bool = True,
    sid: int | None = None,
    classes: Mapping[str, ClassCounts] | None = None,
    images: Mapping[str, ImageSums] | None = None,
    tokens: Mapping[str, TokenCounts] | None = None,
    vectors: Mapping[str, Vector] | None = None,
    skipped: bool = False,
) -> bytes:
    """Encode one record. `announce=False` omits tensor names (the reader must know the schema).

    `sid` is the block's `schema_id`, when the caller already has it cached (it is the same for
    every step of a producer, so recomputing it per record is wasted work).
    """
    rec: dict[str, Any] = {
        "v": VERSION,
        "kind": kind,
        "job": job,
        "rank": rank,
        "world": world,
        "step": step,
        "mode": mode,
        "ts": ts,
        "seq": seq,
    }
    if skipped:
        rec["skip"] = True
    if scalars:
        rec["s"] = {k: float(v) for k, v in scalars.items()}
    if tensors is not None and len(tensors.names):
        k = len(tensors.names)
        t: dict[str, Any] = {
            "sid": schema_id(tensors.names, tensors.collections) if sid is None else sid,
            # tolist: Python ints in one call (a comprehension makes a numpy scalar per row)
            "n": np.asarray(tensors.n, dtype=np.int64).tolist(),
            "f": np.ascontiguousarray(tensors.floats, dtype="<f4").reshape(k, len(FLOAT_COLUMNS)).tobytes(),
            "z": np.asarray(tensors.zeros, dtype=np.int64).tolist(),
        }
        if announce:
            t["names"] = list(tensors.names)
            t["colls"] = list(tensors.collections)
        nonfinite = {}
        for arr, col in ((tensors.nan, 0), (tensors.inf, 1)):
            if arr is None:
                continue
            for i in np.flatnonzero(arr):
                nonfinite.setdefault(int(i), [0, 0])[col] = int(arr[i])
        if nonfinite:
            t["nf"] = nonfinite
        if len(tensors.nonfinite_order):
            t["nfo"] = [int(i) for i in tensors.nonfinite_order]
        if tensors.shards:
            t["sh"] = {int(i): [int(x) for x in v] for i, v in tensors.shards.items()}
        if tensors.activity:
            t["act"] = {int(i): [int(c) for c in v] for i, v in tensors.activity.items()}
        if tensors.quantiles:
            t["q"] = {int(i): [float(a), float(b)] for i, (a, b) in tensors.quantiles.items()}
        if tensors.deltas:
            exact = {
                int(i): [int(p), float(u), float(w), float(e)]
                for i, (p, u, w, e) in tensors.deltas.items()
                if e is not None
            }
            sketched = {
                int(i): [int(p), float(u), float(w)]
                for i, (p, u, w, e) in tensors.deltas.items()
                if e is None
            }
            if exact:
                t["d"] = exact
                if tensors.tolerance is not None:
                    t["tol"] = [float(tensors.tolerance[0]), float(tensors.tolerance[1])]
            if sketched:
                t["ds"] = sketched
        rec["t"] = t
    encode_extensions(rec, classes, images, tokens, vectors)
    return msgpack.packb(rec, use_bin_type=True)


def decode(payload: bytes, schemas: MutableMapping[tuple[str, int, int], Any] | None = None) -> StepRecord:
    """Decode and validate one record; raise DecodeError (with a stable `reason`) on bad input.

    `schemas` remembers announced tensor names between records of the same producer; pass the
    same mapping for every record of a stream (the stream worker keeps it in per-job state).
    NaN and inf *inside statistics* are data, not errors: they are what ExplodingTensor looks for.

    DecodeError is the only error bad input raises: the checks below name what they can, and
    whatever shape of value they did not foresee (a list where a number was expected, an
    unhashable version, an infinite count) becomes reason `malformed`, so that every caller's
    one `except DecodeError` counts and dead-letters it instead of crashing or skipping it silently.
    """
    try:
        return _decode(payload, schemas)
    except DecodeError:
        raise
    except (
        TypeError,
        ValueError,
        OverflowError,
        KeyError,
        IndexError,
        AttributeError,
        RecursionError,
    ) as exc:
        raise DecodeError("malformed", f"{type(exc).__name__}: {exc}") from exc


def _decode(payload: bytes, schemas: MutableMapping[tuple[str, int, int], Any] | None) -> StepRecord:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError("wrong_type", f"payload is {type(payload).__name__}, expected bytes")
    if len(payload) > MAX_RECORD_BYTES:
        raise DecodeError("too_large", f"payload is {len(payload)} bytes, limit {MAX_RECORD_BYTES}")
    try:
        rec = msgpack.unpackb(payload, raw=False, strict_map_key=False, **_unpack_limits)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        if "exceeds max_array_len" in str(exc) or "exceeds max_map_len" in str(exc):  # _unpack_limits
            raise DecodeError(
                "too_many_tensors",
                f"payload holds an array or map of more than {MAX_TENSORS} entries "
                f"(wire.MAX_TENSORS tensors per record): {exc}",
            ) from exc
        raise DecodeError(
            "not_msgpack", f"payload of {len(payload)} bytes is not one msgpack value: {exc}"
        ) from exc
    if not isinstance(rec, dict):
        raise DecodeError("not_a_record", f"top-level value is {type(rec).__name__}, expected a map")
    version = rec.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        raise DecodeError(
            "unknown_version", f"wire version {version!r}; this reader supports {sorted(SUPPORTED_VERSIONS)}"
        )

    kind = field_value(rec, "kind", str, "record kind")
    if kind not in KINDS:
        raise DecodeError("bad_value", f"kind {kind!r} is not one of {KINDS}")
    job = field_value(rec, "job", str, "job id")
    try:
        validate_job(job)
    except ValueError as exc:
        raise DecodeError("bad_job", str(exc)) from exc
    rank = field_value(rec, "rank", int, "rank")
    world = field_value(rec, "world", int, "world size")
    if not (0 <= rank < world <= 1_000_000):
        raise DecodeError("bad_value", f"rank {rank} / world {world} is not 0 <= rank < world")
    step = field_value(rec, "step", int, "step")
    if not 0 <= step < 2**63:
        raise DecodeError("bad_value", f"step {step} is negative or too large")
    mode = field_value(rec, "mode", str, "mode")
    if mode not in MODES:
        raise DecodeError("bad_value", f"mode {mode!r} is not one of {MODES}")
    ts = number(field_value(rec, "ts", (int, float), "publish time"), "'ts'")
    if not math.isfinite(ts):
        raise DecodeError("bad_value", f"publish time {ts!r} is not finite")
    seq = rec.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise DecodeError("wrong_type", f"'seq' is {type(seq).__name__}, expected an integer")

    skipped = rec.get("skip", False)
    if not isinstance(skipped, bool):
        raise DecodeError("wrong_type", f"'skip' is {type(skipped).__name__}, expected a boolean")

    raw_scalars = rec.get("s", {})
    if not isinstance(raw_scalars, dict) or len(raw_scalars) > MAX_SCALARS:
        raise DecodeError("wrong_type", f"'s' (scalars) must be a map of at most {MAX_SCALARS} names")
    scalars: dict[str, float] = {}
    for name, value in raw_scalars.items():
        if not isinstance(name, str) or len(name) > MAX_NAME_LEN:
            raise DecodeError(
                "wrong_type", f"scalar name {name!r} is not a string of <= {MAX_NAME_LEN} chars"
            )
        scalars[name] = number(value, f"scalar {name!r}")  # NaN/inf allowed: they are data

    tensors: tuple[TensorStats, ...] = ()
    tolerance = None
    order: tuple[int, ...] = ()
    t = rec.get("t")
    if t is not None:
        tensors = _decode_tensors(t, job, rank, schemas)
        tolerance = tolerance_of(t)
        order = nonfinite_order_of(t, len(tensors))
    return StepRecord(
        job,
        rank,
        world,
        step,
        mode,
        ts,
        seq,
        kind,
        scalars,
        tensors,
        classes=decode_classes(rec.get("cls")),
        images=decode_images(rec.get("img")),
        tokens=decode_tokens(rec.get("tok")),
        vectors=decode_vectors(rec.get("vec")),
        tolerance=tolerance,
        skipped=skipped,
        nonfinite_order=order,
    )


def _decode_tensors(
    t: Any, job: str, rank: int, schemas: MutableMapping[tuple[str, int, int], Any] | None
) -> Tensors:
    if not isinstance(t, dict):
        raise DecodeError("bad_tensors", "'t' (tensors) must be a map")
    sid = t.get("sid")
    if isinstance(sid, bool) or not isinstance(sid, int):
        raise DecodeError("bad_tensors", "'t.sid' (schema id) must be an integer")
    names, colls = t.get("names"), t.get("colls")
    if names is not None:
        if (
            not isinstance(names, list)
            or not isinstance(colls, list)
            or len(names) != len(colls)
            or not all(isinstance(x, str) and 0 < len(x) <= MAX_NAME_LEN for x in names + colls)
        ):
            raise DecodeError(
                "bad_tensors", "'t.names' and 't.colls' must be lists of equal length of short strings"
            )
        if schema_id(names, colls) != sid:
            raise DecodeError("bad_tensors", f"schema id {sid} does not match the announced names")
        schema = Schema(names, colls)
        if schemas is not None:
            known = schemas.get((job, rank, sid))
            if type(known) is Schema and known == schema:  # announced again: keep what it remembers
                schema = known
            schemas[(job, rank, sid)] = schema
    else:
        known = None if schemas is None else schemas.get((job, rank, sid))
        if known is None:
            raise DecodeError(
                "unknown_schema",
                f"tensor names for schema {sid} of job {job!r} rank {rank} were never announced "
                "(the producer re-announces them periodically; records before that cannot be named)",
            )
        schema = known if type(known) is Schema else Schema(known[0], known[1])
        names, colls = schema
    k = len(names)
    n = count_column(t, "n", k)
    zeros = count_column(t, "z", k)
    f = t.get("f")
    width = len(FLOAT_COLUMNS)
    if not isinstance(f, bytes) or len(f) != 4 * width * k:
        raise DecodeError("bad_tensors", f"'t.f' must be {4 * width * k} bytes of float32 for {k} tensors")
    if _NATIVE_F32:  # the same doubles as numpy's float32 -> float64, in a third of the time
        flat = array.array("f", f).tolist()
    else:
        with np.errstate(invalid="ignore"):  # any float32 bit pattern is data (signalling NaNs included)
            flat = np.frombuffer(f, dtype="<f4").astype(np.float64).tolist()
    floats = zip(*[iter(flat)] * width, strict=True)  # one tuple of `width` floats per tensor, in order
    # The sum of float32 values (at most MAX_TENSORS * 5 of them) cannot overflow a double: it is
    # finite exactly when every value is (an inf or NaN makes it inf or NaN).
    finite = math.isfinite(sum(flat))
    if any(map(operator.gt, zeros, n)):  # more zeros than elements: name the first such tensor
        for name, count, zs in zip(names, n, zeros, strict=True):
            if zs > count:
                raise DecodeError("bad_tensors", f"tensor {name!r} has {zs} zeros of {count} elements")
    if not _SPARSE_KEYS.intersection(t):
        # Only the dense columns (most records of most tensors): no per-tensor lookups at all.
        return Tensors(
            [
                TensorStats(name, coll, count, mean, std, mn, mx, amean, zs)
                for name, coll, count, zs, (mean, std, mn, mx, amean) in zip(
                    names, colls, n, zeros, floats, strict=True
                )
            ],
            schema,
            finite,
        )
    nonfinite = sparse_column(t, "nf", k, 2)
    activity = sparse_column(t, "act", k, 1 + len(ACTIVITY_EDGES))
    quantiles = sparse_column(t, "q", k, 2)
    deltas = sparse_column(t, "d", k, 4)
    sketched = sparse_column(t, "ds", k, 3)
    shards = sparse_column(t, "sh", k, 4)
    # One pass, zipped columns, a sparse column looked up only where the record has it: this loop
    # builds every TensorStats of every record (50 per record: most of wire.decode's time).
    out = []
    for i, (name, coll, count, zs, row) in enumerate(zip(names, colls, n, zeros, floats, strict=True)):
        nan, inf = nonfinite.get(i, (0, 0)) if nonfinite else (0, 0)
        act = activity.get(i) if activity else None
        q = quantiles.get(i) if quantiles else None
        d = deltas.get(i, sketched.get(i)) if deltas or sketched else None
        if d is not None:
            if isinstance(d[0], bool) or not isinstance(d[0], int):
                raise DecodeError("bad_tensors", f"tensor {name!r}: delta step {d[0]!r} is not an integer")
            rest = d[1:]
            if all(type(x) is float or type(x) is int for x in rest):  # what number() accepts
                d = Delta(d[0], *map(float, rest))
            else:  # number() raises, naming the tensor
                d = Delta(d[0], *(number(x, f"delta of {name!r}") for x in rest))
        mean, std, mn, mx, amean = row
        out.append(
            TensorStats(
                name,
                coll,
                count,
                mean,
                std,
                mn,
                mx,
                amean,
                zs,
                int(nan),
                int(inf),
                None if act is None else tuple(map(int, act)),
                None if q is None else (float(q[0]), float(q[1])),
                d,
                None if not shards or i not in shards else shard_of(shards[i], count, name),
            )
        )
    return Tensors(out, schema, finite and not any(x or y for x, y in nonfinite.values()))


def peek_job(payload: bytes) -> str | None:
    """Best-effort job id of a payload that failed to decode (for error messages only)."""
    try:
        rec = msgpack.unpackb(payload, raw=False, strict_map_key=False, **_unpack_limits)
        job = rec.get("job") if isinstance(rec, dict) else None
        return job if isinstance(job, str) else None
    except Exception:
        return None
