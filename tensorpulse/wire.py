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
class Delta:
    """How a tensor changed since the producer's previous saved step (computed on its device)."""

    prev_step: int
    update_l2: float
    prev_l2: float
    #: max(|w - w_prev| - (atol + rtol*|w_prev|)); None when the producer sketched the change
    #: (wire `ds`: update_l2 is then an estimate, see docs/wire-format.md).
    allclose_excess: float | None = None

    @property
    def exact(self) -> bool:
        """Whether update_l2 was computed from both tensors (not estimated from sketches)."""
        return self.allclose_excess is not None


@dataclass(frozen=True, slots=True)
class ClassCounts:
    """Label counts of one step (and, with predictions, the confusion counts).

    `labels[c]` is how many samples had label c; `confusion[i*k + j]` how many with label i were
    predicted j (row-major k×k), when the producer had predictions.
    """

    k: int
    labels: tuple[int, ...]
    confusion: tuple[int, ...] | None = None

    def predicted(self) -> tuple[int, ...] | None:
        """Per-class prediction counts (column sums), if confusion counts were sent."""
        if self.confusion is None:
            return None
        k = self.k
        return tuple(sum(self.confusion[i * k + j] for i in range(k)) for j in range(k))

    def correct(self) -> tuple[int, ...] | None:
        """Per-class correct counts (the diagonal), if confusion counts were sent."""
        if self.confusion is None:
            return None
        return tuple(self.confusion[i * self.k + i] for i in range(self.k))


@dataclass(frozen=True, slots=True)
class ImageSums:
    """Per-channel sums over one step's input images (for CheckInputImages).

    `images` images of `pixels` values per channel; channel c's mean is sums[c] / (images*pixels).
    """

    images: int
    pixels: int
    sums: tuple[float, ...]
    sumsq: tuple[float, ...]

    def channel_means(self) -> tuple[float, ...]:
        count = self.images * self.pixels
        return tuple(x / count if count else math.nan for x in self.sums)


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """How many of one step's tokens equal each watched value (for NLPSequenceRatio)."""

    total: int
    counts: Mapping[int, int]


@dataclass(frozen=True, slots=True)
class Vector:
    """A small named vector (e.g. XGBoost feature importances), with optional element labels."""

    values: tuple[float, ...]
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Shard:
    """Where a tensor's statistics sit in a sharded parameter (FSDP2 / DTensor; wire `t.sh`).

    Each rank reduces only its own shard, so its record's statistics are the shard's; this says
    what they are a part of, for the worker to combine the shards (stream/shards.py).
    """

    #: Element count of the whole parameter (the sum of its shards' `n`).
    numel: int
    #: This shard's index among the parameter's `count` shards (replicas of a shard share it).
    index: int
    count: int
    #: Offset of the shard's first element in the whole parameter, flattened in row-major order,
    #: when the shard is one contiguous block of it (sharded along dim 0); else None.
    offset: int | None = None


@dataclass(slots=True)
class TensorStats:
    """Statistics of one tensor at one step, computed over all elements (population std).

    Not frozen, unlike the other record types, for speed alone: the decoder builds one per tensor
    per record, and a frozen dataclass sets each of its 14 fields through object.__setattr__
    (about 70-120 µs of a 50-tensor record's 430-550 µs, bench/worker_profile.py stages). Treat
    it as read-only all the same: rules never change a record.
    """

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
    #: Difference from the same tensor at the producer's previous saved step, where the hook
    #: tracks it (weights by default): that step, ||w - w_prev||, ||w_prev||, and the largest
    #: allclose excess max(|w - w_prev| - (atol + rtol*|w_prev|)) (<= 0: allclose) computed with
    #: the record's `tolerance`.
    delta: Delta | None = None
    #: Which shard of which whole parameter these statistics are (wire `t.sh`), else None.
    shard: Shard | None = None

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
    #: Label / confusion counts by name (e.g. "labels"), where the hook captured them.
    classes: Mapping[str, ClassCounts] = field(default_factory=dict)
    #: Input image channel sums by input name (e.g. "inputs").
    images: Mapping[str, ImageSums] = field(default_factory=dict)
    #: Token value counts by input name (e.g. "input_ids").
    tokens: Mapping[str, TokenCounts] = field(default_factory=dict)
    #: Named small vectors (e.g. "feature_importance/gain").
    vectors: Mapping[str, Vector] = field(default_factory=dict)
    #: (rtol, atol) the producer used for `TensorStats.delta.allclose_excess`.
    tolerance: tuple[float, float] | None = None
    #: The optimizer did not apply this train step: a mixed-precision GradScaler skipped it
    #: because its gradients held inf or NaN (wire `skip`; absent means False).
    skipped: bool = False
    #: Indices into `tensors` of its non-finite tensors in the order their values appeared within
    #: the step, earliest first (wire `t.nfo`), where the producer knows it; () otherwise. Why:
    #: a NaN spreads within one step (forward into later activations, backward into every
    #: gradient, the optimizer's step into every weight), so record order names a tensor it
    #: spread to. Tensors it leaves out came later, in record order.
    nonfinite_order: tuple[int, ...] = ()

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
    #: Row index -> (prev_step, update_l2, prev_l2, allclose_excess); see TensorStats.delta. An
    #: excess of None marks a sketched (estimated) delta, sent under `ds`.
    deltas: Mapping[int, tuple[int, float, float, float | None]] = field(default_factory=dict)
    #: (rtol, atol) used for the allclose excess in `deltas`.
    tolerance: tuple[float, float] | None = None
    #: Row indices of non-finite tensors, earliest first (StepRecord.nonfinite_order); sent as `nfo`.
    nonfinite_order: Sequence[int] = ()
    #: Row index -> (numel, index, count, offset or -1) of the rows that are shards of a
    #: parameter (TensorStats.shard); sent as `sh`.
    shards: Mapping[int, tuple[int, int, int, int]] = field(default_factory=dict)


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
                int(i): [int(p), float(u), float(w)] for i, (p, u, w, e) in tensors.deltas.items() if e is None
            }
            if exact:
                t["d"] = exact
                if tensors.tolerance is not None:
                    t["tol"] = [float(tensors.tolerance[0]), float(tensors.tolerance[1])]
            if sketched:
                t["ds"] = sketched
        rec["t"] = t
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

    DecodeError is the only error bad input raises: the checks below name what they can, and
    whatever shape of value they did not foresee (a list where a number was expected, an
    unhashable version, an infinite count) becomes reason `malformed`, so that every caller's
    one `except DecodeError` counts and dead-letters it instead of crashing or skipping it silently.
    """
    try:
        return _decode(payload, schemas)
    except DecodeError:
        raise
    except (TypeError, ValueError, OverflowError, KeyError, IndexError, AttributeError, RecursionError) as exc:
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
        scalars[name] = _finite_number(value, f"scalar {name!r}")  # NaN/inf allowed: they are data

    tensors: tuple[TensorStats, ...] = ()
    tolerance = None
    order: tuple[int, ...] = ()
    t = rec.get("t")
    if t is not None:
        tensors = _decode_tensors(t, job, rank, schemas)
        tolerance = _tolerance(t)
        order = _nonfinite_order(t, len(tensors))
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
        classes=_decode_classes(rec.get("cls")),
        images=_decode_images(rec.get("img")),
        tokens=_decode_tokens(rec.get("tok")),
        vectors=_decode_vectors(rec.get("vec")),
        tolerance=tolerance,
        skipped=skipped,
        nonfinite_order=order,
    )


#: Largest class count k for confusion counts (k*k integers per step).
MAX_CONFUSION_CLASSES = 256
MAX_CHANNELS = 4_096


def _named_map(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_SCALARS:
        raise DecodeError("wrong_type", f"'{key}' must be a map of at most {MAX_SCALARS} names")
    for name, entry in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN or not isinstance(entry, dict):
            raise DecodeError("wrong_type", f"'{key}' entry {name!r} must be a short name mapped to a map")
    return value


def _counts(value: Any, what: str, limit: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise DecodeError("wrong_type", f"{what} must be a list of at most {limit} counts")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DecodeError("bad_value", f"{what} holds {v!r}, expected a count >= 0")
    return tuple(value)


def _numbers(value: Any, what: str, limit: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise DecodeError("wrong_type", f"{what} must be a list of at most {limit} numbers")
    return tuple(_finite_number(v, what) for v in value)


def _decode_classes(value: Any) -> dict[str, ClassCounts]:
    out = {}
    for name, entry in _named_map(value, "cls").items():
        labels = _counts(entry.get("l"), f"cls[{name!r}].l", MAX_TENSORS)
        k = len(labels)
        confusion = entry.get("c")
        if confusion is not None:
            if k > MAX_CONFUSION_CLASSES:
                raise DecodeError("bad_value", f"cls[{name!r}]: confusion counts for {k} > 256 classes")
            confusion = _counts(confusion, f"cls[{name!r}].c", k * k)
            if len(confusion) != k * k:
                raise DecodeError("bad_value", f"cls[{name!r}].c must hold {k}×{k} counts")
        out[name] = ClassCounts(k, labels, confusion)
    return out


def _decode_images(value: Any) -> dict[str, ImageSums]:
    out = {}
    for name, entry in _named_map(value, "img").items():
        images, pixels = entry.get("n"), entry.get("p")
        for what, v in (("n", images), ("p", pixels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DecodeError("wrong_type", f"img[{name!r}].{what} must be a count >= 0")
        sums = _numbers(entry.get("s"), f"img[{name!r}].s", MAX_CHANNELS)
        sumsq = _numbers(entry.get("q", [0.0] * len(sums)), f"img[{name!r}].q", MAX_CHANNELS)
        if len(sumsq) != len(sums):
            raise DecodeError("bad_value", f"img[{name!r}]: {len(sums)} sums but {len(sumsq)} squares")
        out[name] = ImageSums(images, pixels, sums, sumsq)
    return out


def _decode_tokens(value: Any) -> dict[str, TokenCounts]:
    out = {}
    for name, entry in _named_map(value, "tok").items():
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


def _decode_vectors(value: Any) -> dict[str, Vector]:
    out = {}
    for name, entry in _named_map(value, "vec").items():
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


def _tolerance(t: Any) -> tuple[float, float] | None:
    tol = t.get("tol") if isinstance(t, dict) else None
    if tol is None:
        return None
    if not isinstance(tol, list) or len(tol) != 2:
        raise DecodeError("bad_tensors", "'t.tol' must be [rtol, atol]")
    return (_finite_number(tol[0], "t.tol rtol"), _finite_number(tol[1], "t.tol atol"))


def _nonfinite_order(t: Mapping[str, Any], k: int) -> tuple[int, ...]:
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
    with np.errstate(invalid="ignore"):  # any float32 bit pattern is data (signalling NaNs included)
        floats = np.frombuffer(f, dtype="<f4").reshape(k, width).astype(np.float64).tolist()
    nonfinite = _sparse(t, "nf", k, 2)
    activity = _sparse(t, "act", k, 1 + len(ACTIVITY_EDGES))
    quantiles = _sparse(t, "q", k, 2)
    deltas = _sparse(t, "d", k, 4)
    sketched = _sparse(t, "ds", k, 3)
    shards = _sparse(t, "sh", k, 4)
    out = []
    for i in range(k):
        if zeros[i] > n[i]:
            raise DecodeError("bad_tensors", f"tensor {names[i]!r} has {zeros[i]} zeros of {n[i]} elements")
        nan, inf = nonfinite.get(i, (0, 0))
        act = activity.get(i)
        q = quantiles.get(i)
        d = deltas.get(i, sketched.get(i))
        if d is not None:
            if isinstance(d[0], bool) or not isinstance(d[0], int):
                raise DecodeError(
                    "bad_tensors", f"tensor {names[i]!r}: delta step {d[0]!r} is not an integer"
                )
            d = Delta(d[0], *(_finite_number(x, f"delta of {names[i]!r}") for x in d[1:]))
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
                d,
                None if i not in shards else _shard(shards[i], n[i], names[i]),
            )
        )
    return tuple(out)


def _shard(v: list[Any], n: int, name: str) -> Shard:
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


def peek_job(payload: bytes) -> str | None:
    """Best-effort job id of a payload that failed to decode (for error messages only)."""
    try:
        rec = msgpack.unpackb(payload, raw=False, strict_map_key=False, **_unpack_limits)
        job = rec.get("job") if isinstance(rec, dict) else None
        return job if isinstance(job, str) else None
    except Exception:
        return None
