"""Wire format v1: the one encoder/decoder that producers and stream processors share.

A record is a msgpack map describing one (job, rank, step, mode). Tensor statistics travel
column-wise: float statistics as one little-endian float32 matrix (a msgpack `bin`), counts
as msgpack integer arrays (1 byte each when small). Tensor names are sent only when a
producer announces its *schema* (first record, then every `announce_every` records); other
records carry the schema id. This keeps a tensor's statistics at about 25-30 bytes per step.
The contract is documented in docs/wire-format.md; change both together.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .errors import DecodeError
from .topics import validate_job

VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MODES = ("train", "eval", "predict", "global")
KINDS = ("step", "end")

#: Order of the columns in the float32 matrix `f` (one row per tensor).
FLOAT_COLUMNS = ("mean", "std", "min", "max", "abs_mean")
#: Upper edges of the per-unit activity histogram (fraction of samples in which a unit is > 0).
ACTIVITY_EDGES = (0.001, 0.01, 0.05, 0.1, 0.5)

MAX_RECORD_BYTES = 4 * 1024 * 1024
MAX_TENSORS = 65_536
MAX_SCALARS = 4_096
MAX_NAME_LEN = 512

_unpack_limits = dict(
    max_str_len=MAX_RECORD_BYTES,
    max_bin_len=MAX_RECORD_BYTES,
    max_array_len=MAX_TENSORS,
    max_map_len=max(MAX_SCALARS, MAX_TENSORS),
    max_ext_len=0,
)


@dataclass(frozen=True, slots=True)
class TensorStats:
    """Statistics of one tensor at one step, computed over all elements (population std)."""

    name: str
    collection: str
    n: int
    mean: float
    std: float
    min: float
    max: float
    abs_mean: float
    zeros: int
    nan: int = 0
    inf: int = 0
    #: (units, units with activity < ACTIVITY_EDGES[i] ...) for activation outputs, else None.
    activity: tuple[int, ...] | None = None
    #: (p5, p95) where the producer computed quantiles, else None.
    quantiles: tuple[float, float] | None = None

    @property
    def l2(self) -> float:
        """Euclidean norm, derived exactly from n, mean and std (it is not sent separately)."""
        return math.sqrt(self.n * (self.std * self.std + self.mean * self.mean)) if self.n else 0.0

    @property
    def variance(self) -> float:
        return self.std * self.std

    @property
    def zero_frac(self) -> float:
        return self.zeros / self.n if self.n else 0.0

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    def inactive_unit_fraction(self, threshold: float) -> float | None:
        """Fraction of units active in fewer than `threshold` (0-1) of samples, if captured."""
        if self.activity is None or self.activity[0] == 0:
            return None
        try:
            i = ACTIVITY_EDGES.index(threshold)
        except ValueError:
            return None
        return self.activity[1 + i] / self.activity[0]


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One decoded record: everything one rank reported for one step of one mode."""

    job: str
    rank: int
    world: int
    step: int
    mode: str
    ts: float
    seq: int = 0
    kind: str = "step"
    scalars: Mapping[str, float] = field(default_factory=dict)
    tensors: tuple[TensorStats, ...] = ()

    def select(
        self, collections: Iterable[str] | None = None, regex: str | re.Pattern[str] | None = None
    ) -> list[TensorStats]:
        """Tensors in any of `collections` (all if None) whose name matches `regex` (search)."""
        colls = None if collections is None else frozenset(collections)
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        return [
            t
            for t in self.tensors
            if (colls is None or t.collection in colls) and (pattern is None or pattern.search(t.name))
        ]


@dataclass(slots=True)
class TensorBlock:
    """Producer-side columns for the tensors of one record (numpy arrays, one entry per tensor)."""

    names: Sequence[str]
    collections: Sequence[str]
    n: np.ndarray  # int64 [K]
    floats: np.ndarray  # float32 [K, len(FLOAT_COLUMNS)]
    zeros: np.ndarray  # int64 [K]
    nan: np.ndarray | None = None  # int64 [K]; None means all zero
    inf: np.ndarray | None = None
    activity: Mapping[int, Sequence[int]] = field(default_factory=dict)
    quantiles: Mapping[int, tuple[float, float]] = field(default_factory=dict)


def schema_id(names: Sequence[str], collections: Sequence[str]) -> int:
    """A stable 32-bit id for a list of (collection, name) pairs."""
    h = zlib.crc32("\x1f".join(f"{c}\x1e{n}" for c, n in zip(collections, names, strict=True)).encode())
    return h or 1


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
    if scalars:
        rec["s"] = {k: float(v) for k, v in scalars.items()}
    if tensors is not None and len(tensors.names):
        k = len(tensors.names)
        t: dict[str, Any] = {
            "sid": schema_id(tensors.names, tensors.collections) if sid is None else sid,
            "n": [int(x) for x in tensors.n],
            "f": np.ascontiguousarray(tensors.floats, dtype="<f4").reshape(k, len(FLOAT_COLUMNS)).tobytes(),
            "z": [int(x) for x in tensors.zeros],
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
        if tensors.activity:
            t["act"] = {int(i): [int(c) for c in v] for i, v in tensors.activity.items()}
        if tensors.quantiles:
            t["q"] = {int(i): [float(a), float(b)] for i, (a, b) in tensors.quantiles.items()}
        rec["t"] = t
    return msgpack.packb(rec, use_bin_type=True)


class SchemaCache(MutableMapping[tuple[str, int, int], tuple[list[str], list[str]]]):
    """Bounded LRU of announced schemas, keyed by (job, rank, schema id)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._d: OrderedDict[tuple[str, int, int], tuple[list[str], list[str]]] = OrderedDict()
        self.max_entries = max_entries

    def __getitem__(self, key: tuple[str, int, int]) -> tuple[list[str], list[str]]:
        value = self._d[key]
        self._d.move_to_end(key)
        return value

    def __setitem__(self, key: tuple[str, int, int], value: tuple[list[str], list[str]]) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def __delitem__(self, key: tuple[str, int, int]) -> None:
        del self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


def _field(rec: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in rec:
        raise DecodeError("missing_field", f"record has no '{key}' ({what})")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise DecodeError("wrong_type", f"'{key}' ({what}) is {type(value).__name__}, expected {types}")
    return value


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeError("wrong_type", f"{what} is {type(value).__name__}, expected a number")
    return float(value)


def _int_list(t: Mapping[str, Any], key: str, k: int) -> list[int]:
    values = t.get(key)
    if not isinstance(values, list) or len(values) != k:
        raise DecodeError("bad_tensors", f"tensor column '{key}' must be a list of {k} integers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DecodeError("bad_tensors", f"tensor column '{key}' holds {v!r}, expected a count >= 0")
    return values


def _sparse(t: Mapping[str, Any], key: str, k: int, width: int) -> dict[int, list[Any]]:
    values = t.get(key, {})
    if not isinstance(values, dict):
        raise DecodeError("bad_tensors", f"tensor column '{key}' must be a map")
    for i, v in values.items():
        if not isinstance(i, int) or not 0 <= i < k or not isinstance(v, list) or len(v) != width:
            raise DecodeError("bad_tensors", f"tensor column '{key}' has a bad entry {i!r}: {v!r}")
    return values


def decode(payload: bytes, schemas: MutableMapping[tuple[str, int, int], Any] | None = None) -> StepRecord:
    """Decode and validate one record; raise DecodeError (with a stable `reason`) on bad input.

    `schemas` remembers announced tensor names between records of the same producer; pass the
    same mapping for every record of a stream (the stream worker keeps it in per-job state).
    NaN and inf *inside statistics* are data, not errors: they are what ExplodingTensor looks for.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError("wrong_type", f"payload is {type(payload).__name__}, expected bytes")
    if len(payload) > MAX_RECORD_BYTES:
        raise DecodeError("too_large", f"payload is {len(payload)} bytes, limit {MAX_RECORD_BYTES}")
    try:
        rec = msgpack.unpackb(payload, raw=False, strict_map_key=False, **_unpack_limits)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise DecodeError(
            "not_msgpack", f"payload of {len(payload)} bytes is not one msgpack value: {exc}"
        ) from exc
    if not isinstance(rec, dict):
        raise DecodeError("not_a_record", f"top-level value is {type(rec).__name__}, expected a map")
    version = rec.get("v")
    if version not in SUPPORTED_VERSIONS:
        raise DecodeError(
            "unknown_version", f"wire version {version!r}; this reader supports {sorted(SUPPORTED_VERSIONS)}"
        )

    kind = _field(rec, "kind", str, "record kind")
    if kind not in KINDS:
        raise DecodeError("bad_value", f"kind {kind!r} is not one of {KINDS}")
    job = _field(rec, "job", str, "job id")
    try:
        validate_job(job)
    except ValueError as exc:
        raise DecodeError("bad_job", str(exc)) from exc
    rank = _field(rec, "rank", int, "rank")
    world = _field(rec, "world", int, "world size")
    if not (0 <= rank < world <= 1_000_000):
        raise DecodeError("bad_value", f"rank {rank} / world {world} is not 0 <= rank < world")
    step = _field(rec, "step", int, "step")
    if not 0 <= step < 2**63:
        raise DecodeError("bad_value", f"step {step} is negative or too large")
    mode = _field(rec, "mode", str, "mode")
    if mode not in MODES:
        raise DecodeError("bad_value", f"mode {mode!r} is not one of {MODES}")
    ts = _finite_number(_field(rec, "ts", (int, float), "publish time"), "'ts'")
    if not math.isfinite(ts):
        raise DecodeError("bad_value", f"publish time {ts!r} is not finite")
    seq = rec.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise DecodeError("wrong_type", f"'seq' is {type(seq).__name__}, expected an integer")

    raw_scalars = rec.get("s", {})
    if not isinstance(raw_scalars, dict) or len(raw_scalars) > MAX_SCALARS:
        raise DecodeError("wrong_type", f"'s' (scalars) must be a map of at most {MAX_SCALARS} names")
    scalars: dict[str, float] = {}
    for name, value in raw_scalars.items():
        if not isinstance(name, str) or len(name) > MAX_NAME_LEN:
            raise DecodeError(
                "wrong_type", f"scalar name {name!r} is not a string of <= {MAX_NAME_LEN} chars"
            )
        scalars[name] = _finite_number(value, f"scalar {name!r}")  # NaN/inf allowed: they are data

    tensors: tuple[TensorStats, ...] = ()
    t = rec.get("t")
    if t is not None:
        tensors = _decode_tensors(t, job, rank, schemas)
    return StepRecord(job, rank, world, step, mode, ts, seq, kind, scalars, tensors)


def _decode_tensors(
    t: Any, job: str, rank: int, schemas: MutableMapping[tuple[str, int, int], Any] | None
) -> tuple[TensorStats, ...]:
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
        if schemas is not None:
            schemas[(job, rank, sid)] = (names, colls)
    else:
        known = None if schemas is None else schemas.get((job, rank, sid))
        if known is None:
            raise DecodeError(
                "unknown_schema",
                f"tensor names for schema {sid} of job {job!r} rank {rank} were never announced "
                "(the producer re-announces them periodically; records before that cannot be named)",
            )
        names, colls = known
    k = len(names)
    n = _int_list(t, "n", k)
    zeros = _int_list(t, "z", k)
    f = t.get("f")
    width = len(FLOAT_COLUMNS)
    if not isinstance(f, bytes) or len(f) != 4 * width * k:
        raise DecodeError("bad_tensors", f"'t.f' must be {4 * width * k} bytes of float32 for {k} tensors")
    floats = np.frombuffer(f, dtype="<f4").reshape(k, width).astype(np.float64).tolist()
    nonfinite = _sparse(t, "nf", k, 2)
    activity = _sparse(t, "act", k, 1 + len(ACTIVITY_EDGES))
    quantiles = _sparse(t, "q", k, 2)
    out = []
    for i in range(k):
        if zeros[i] > n[i]:
            raise DecodeError("bad_tensors", f"tensor {names[i]!r} has {zeros[i]} zeros of {n[i]} elements")
        nan, inf = nonfinite.get(i, (0, 0))
        act = activity.get(i)
        q = quantiles.get(i)
        mean, std, mn, mx, amean = floats[i]
        out.append(
            TensorStats(
                names[i],
                colls[i],
                n[i],
                mean,
                std,
                mn,
                mx,
                amean,
                zeros[i],
                int(nan),
                int(inf),
                None if act is None else tuple(int(a) for a in act),
                None if q is None else (float(q[0]), float(q[1])),
            )
        )
    return tuple(out)


def peek_job(payload: bytes) -> str | None:
    """Best-effort job id of a payload that failed to decode (for error messages only)."""
    try:
        rec = msgpack.unpackb(payload, raw=False, strict_map_key=False, **_unpack_limits)
        job = rec.get("job") if isinstance(rec, dict) else None
        return job if isinstance(job, str) else None
    except Exception:
        return None
