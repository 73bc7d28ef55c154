"""The record types of wire format v1: what `wire.decode` gives readers and `wire.encode` takes.

Why apart from the codec: rules, sinks and reports only need these types and constants, and the
codec (tensorpulse/wire.py) is easier to read without them. Every name here is also importable
from `tensorpulse.wire`, where readers have always found it. The contract is docs/wire-format.md.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import statistics

VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MODES = ("train", "eval", "predict", "global")
KINDS = ("step", "end")

#: Order of the columns in the float32 matrix `f` (one row per tensor), from the declarations
#: in tensorpulse/statistics.py (wire key "f"); a change to it takes a new VERSION.
FLOAT_COLUMNS = statistics.FLOAT_COLUMNS
#: Upper edges of the per-unit activity histogram (fraction of samples in which a unit is > 0).
ACTIVITY_EDGES = statistics.ACTIVITY_EDGES

MAX_RECORD_BYTES = 4 * 1024 * 1024
MAX_TENSORS = 65_536
MAX_SCALARS = 4_096
MAX_NAME_LEN = 512
#: Largest class count k for confusion counts (k*k integers per step).
MAX_CONFUSION_CLASSES = 256
MAX_CHANNELS = 4_096


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
        if not self.n:
            return 0.0
        if self.inf and not self.nan:  # std is NaN there, but ||x|| of an infinite element is inf
            return math.inf
        squares = self.n * (self.std * self.std + self.mean * self.mean)
        if squares == math.inf:  # finite statistics whose squares overflow (|x| ~ 1e154 and up)
            return math.sqrt(self.n) * math.hypot(self.std, self.mean)
        return math.sqrt(squares)

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


class Schema(tuple):
    """An announced schema: the tuple (names, collections), in the order of a record's tensors,
    plus `memo`, what callers work out from the names and collections alone, kept with them.

    Why: a producer sends the same schema at every step, and every rule selects its tensors by
    name and collection (`StepRecord.select`, `functional.frozen`) for every record: 7 selections
    over 50 tensors a record with the default rules. `wire.decode` hands the same Schema object
    to every record of that schema, so such an answer is worked out once per schema, not per
    record. `memo` is bounded (`MAX_MEMO` answers: callers may pass regexes of their own).
    """

    MAX_MEMO = 256

    def __new__(cls, names: Sequence[str], collections: Sequence[str]) -> Schema:
        self = super().__new__(cls, (names, collections))
        self.memo: dict[object, object] = {}
        return self

    def __reduce__(self) -> tuple[object, ...]:  # a copy is a plain tuple: the memo holds patterns
        return (tuple, (tuple(self),))

    def remember(self, key: object, value: object) -> object:
        """`value`, kept as the answer for `key` (past MAX_MEMO answers, the others are forgotten)."""
        memo = self.memo
        if len(memo) >= self.MAX_MEMO:
            memo.clear()
        memo[key] = value
        return value


class Tensors(tuple):
    """`StepRecord.tensors` as `wire.decode` makes it: a tuple of TensorStats that also has the
    `Schema` it was decoded with (`schema`), whose names and collections are its tensors', in order.

    A tuple for every reader; a record built by hand, or given other tensors, has a plain tuple
    and no schema, and everything that asks for one works it out from the tensors instead.
    `finite` is True when the record sent no NaN or inf count and every float statistic of every
    tensor is finite (so no tensor has a non-finite value: what ExplodingTensor looks for).
    """

    def __new__(cls, tensors: Iterable[TensorStats], schema: Schema, finite: bool = False) -> Tensors:
        self = super().__new__(cls, tensors)
        self.schema = schema
        self.finite = finite
        return self

    def __reduce__(self) -> tuple[object, ...]:
        return (tuple, (tuple(self),))


def schema_of(tensors: Sequence[TensorStats]) -> Schema | None:
    """The `Schema` that `tensors` were decoded with, if they are a decoded record's `Tensors`."""
    return tensors.schema if type(tensors) is Tensors else None


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
        """Tensors in any of `collections` (all if None) whose name matches `regex` (search).

        Whether a pattern matches a name is remembered (`_matches`): a job sends the same names at
        every step, and a rule's RE2 search costs about 3 us a name (two regex rules of the default
        set searched 100 names per record, about 300 us of the worker's CPU per record). Which
        tensors a selection picks is remembered too, with the record's `Schema` (decoded records).
        """
        colls = None if collections is None else frozenset(collections)
        tensors = self.tensors
        if colls is None and regex is None:
            return list(tensors)
        if type(tensors) is Tensors:  # decoded: which tensors a selection picks is the schema's
            memo = tensors.schema.memo
            key = (colls, regex)
            picked = memo.get(key)
            if picked is None:
                picked = tensors.schema.remember(key, self._pick(tensors, colls, regex))
            return [tensors[i] for i in picked]
        return [tensors[i] for i in self._pick(tensors, colls, regex)]

    @staticmethod
    def _pick(
        tensors: Sequence[TensorStats], colls: frozenset[str] | None, regex: str | re.Pattern[str] | None
    ) -> tuple[int, ...]:
        """Indices of the tensors `select` returns."""
        if regex is None:
            return tuple(i for i, t in enumerate(tensors) if colls is None or t.collection in colls)
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        seen = _matches(pattern)
        out = []
        for i, t in enumerate(tensors):
            if colls is not None and t.collection not in colls:
                continue
            hit = seen.get(t.name)
            if hit is None:
                hit = seen[t.name] = pattern.search(t.name) is not None
            if hit:
                out.append(i)
        return tuple(out)


#: pattern -> {name: whether pattern.search(name) matched}, for `StepRecord.select`. Bounded: a
#: pattern's names are forgotten past _MAX_NAMES (names come from records anyone can write), and
#: every pattern's past _MAX_PATTERNS (callers may pass string regexes of their own).
_MATCHED: dict[object, dict[str, bool]] = {}
_MAX_NAMES = 100_000
_MAX_PATTERNS = 1_000


def _matches(pattern: object) -> dict[str, bool]:
    seen = _MATCHED.get(pattern)
    if seen is None or len(seen) >= _MAX_NAMES:
        if len(_MATCHED) >= _MAX_PATTERNS:
            _MATCHED.clear()
        seen = _MATCHED[pattern] = {}
    return seen


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
