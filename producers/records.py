"""Records: what one step's capture becomes, and how it is encoded for the wire.

Why a module of its own: a record is assembled on the training thread (`Record`, whose parts
hold host statistics still to be finished) and encoded later on the publisher thread
(`RecordEncoder`, the only owner of the encoder's state: schema ids and when each was last
announced). Nothing here touches a model, a tensor's device or Kafka; `publisher.Publisher`
sends what `RecordEncoder.encode` returns.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorpulse import wire

from .stats_numpy import Columns

#: A queued record's memory, for the publisher's byte bound: per tensor, its host statistics
#: (about 12 float64 / int64 values in numpy arrays, plus dict entries for the rare columns);
#: per record, the objects around them.
TENSOR_HOST_BYTES = 128
RECORD_OVERHEAD_BYTES = 2048


@dataclass(slots=True)
class Part:
    names: list[str]
    collections: list[str]
    stats: Any  # Columns, or stats_host.HostStats (finished on the publisher thread)


@dataclass(slots=True)
class Record:
    """A record being assembled on the training thread, encoded later on the publisher thread."""

    step: int
    mode: str
    ts: float
    kind: str = "step"
    seq: int = 0
    parts: list[Part] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    scalar_tensors: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, wire.ClassCounts] = field(default_factory=dict)
    images: dict[str, wire.ImageSums] = field(default_factory=dict)
    tokens: dict[str, wire.TokenCounts] = field(default_factory=dict)
    vectors: dict[str, wire.Vector] = field(default_factory=dict)
    #: captures_torch.Capture objects still on a device (label counts, input sums), copied at publish.
    captures: list[Any] = field(default_factory=list)
    #: The optimizer did not apply this step (a GradScaler skipped it): wire `skip`.
    skipped: bool = False
    #: Whether the record's weights were read after the optimizer applied this step's gradients
    #: (TorchHook knows; None: unknown, and no order of its non-finite tensors is sent). See
    #: `nonfinite_order`.
    weights_after: bool | None = None

    def has_data(self) -> bool:
        return bool(
            self.parts
            or self.scalars
            or self.scalar_tensors
            or self.captures
            or self.classes
            or self.images
            or self.tokens
            or self.vectors
        )

    def add_host_block(self, kind: str, name: str, value: Any) -> None:
        """Store a finished record-level block under its wire key ("cls", "img" or "tok")."""
        {"cls": self.classes, "img": self.images, "tok": self.tokens}[kind][name] = value

    def nbytes(self) -> int:
        """About what this record holds in memory while it waits to be published: its host
        statistics per tensor, its scalars and blocks (names are shared with the hook, not
        counted). What bounds the publisher's queue in bytes (`max_queued_bytes`)."""
        tensors = sum(len(p.names) for p in self.parts)
        blocks = len(self.classes) + len(self.images) + len(self.tokens) + len(self.vectors)
        return RECORD_OVERHEAD_BYTES + TENSOR_HOST_BYTES * tensors + 100 * len(self.scalars) + 1024 * blocks

#: names -> {row: wire `t.sh` mark} for the rows that are shards of a parameter (producers/shards.py).
ShardMarks = Callable[[Sequence[str]], dict[int, tuple[int, int, int, int]]]


class RecordEncoder:
    """Encodes records to wire bytes, on the publisher thread (its state is touched only there).

    A tensor block's schema (names and collections) is sent in full the first time and then
    every `announce_every` records; the others carry its id (docs/wire-format.md).
    """

    def __init__(
        self,
        job: str,
        rank: int,
        world_size: int,
        announce_every: int,
        delta_tolerance: tuple[float, float],
    ) -> None:
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.announce_every = announce_every
        self.delta_tolerance = delta_tolerance
        self._announced: OrderedDict[int, int] = OrderedDict()
        self._schema_ids: dict[tuple[tuple[str, ...], tuple[str, ...]], int] = {}

    def encode(self, rec: Record, shard_marks: ShardMarks | None = None) -> bytes:
        """The wire bytes of `rec`; `shard_marks` marks the rows that are shards of a parameter."""
        block = None
        if rec.parts:
            names: list[str] = []
            colls: list[str] = []
            cols = []
            for part in rec.parts:
                names += part.names
                colls += part.collections
                cols.append(part.stats if isinstance(part.stats, Columns) else part.stats.finish())
            merged = Columns.concat(cols)
            names, colls, merged = dedupe(names, colls, merged)
            block = merged.to_block(names, colls, self.delta_tolerance)
            if shard_marks is not None:  # FSDP2 / DTensor shards (TorchHook, producers/shards.py)
                block.shards = shard_marks(names)
            if rec.weights_after is not None and (block.nan is not None or block.inf is not None):
                block.nonfinite_order = nonfinite_order(colls, block, rec.weights_after)
        announce = False
        sid = None
        if block is not None:
            key = (tuple(block.names), tuple(block.collections))
            sid = self._schema_ids.get(key)
            if sid is None:
                if len(self._schema_ids) >= 256:
                    self._schema_ids.clear()
                sid = self._schema_ids[key] = wire.schema_id(block.names, block.collections)
            last = self._announced.get(sid)
            announce = last is None or rec.seq - last >= self.announce_every
            if announce:
                self._announced[sid] = rec.seq
                self._announced.move_to_end(sid)
                while len(self._announced) > 256:
                    self._announced.popitem(last=False)
        return wire.encode(
            job=self.job,
            rank=self.rank,
            world=self.world_size,
            step=rec.step,
            mode=rec.mode,
            ts=rec.ts,
            seq=rec.seq,
            kind=rec.kind,
            scalars=rec.scalars,
            tensors=block,
            announce=announce,
            sid=sid,
            classes=rec.classes,
            images=rec.images,
            tokens=rec.tokens,
            vectors=rec.vectors,
            skipped=rec.skipped,
        )


#: Within one training step, when each collection's values come to be, for the order of its
#: non-finite tensors: weights as the forward pass used them, activations (forward order),
#: gradients (backward order), weights after the optimizer applied the gradients.
_PHASES = {"activations": 1, "activation_inputs": 1, "gradients": 2}
_WEIGHTS = ("weights", "biases")


def nonfinite_order(colls: list[str], block: wire.TensorBlock, weights_after: bool) -> list[int]:
    """Indices of the block's non-finite tensors in the order their values appeared (wire `t.nfo`).

    Why: a NaN spreads within one step (the forward pass into the later activations, the
    backward pass into every gradient, the optimizer's step into every weight), so the first in
    record order is often a tensor it spread to. Activations are in the order the forward pass
    produced them; gradients are taken last layer first, as autograd computes them in a model
    whose parameters are registered in forward order (an approximation: the hook does not watch
    the backward pass). Tensors of other collections are left out (they follow, in record order).
    Runs on the publisher thread, only for records that hold a non-finite value.
    """
    bad = np.zeros(len(colls), dtype=bool)
    for arr in (block.nan, block.inf):
        if arr is not None:
            bad |= np.asarray(arr) > 0
    weights = 3 if weights_after else 0
    keyed = []
    for i in np.flatnonzero(bad).tolist():
        coll = colls[i]
        phase = weights if coll in _WEIGHTS else _PHASES.get(coll)
        if phase is not None:
            keyed.append((phase, -i if phase == 2 else i, i))
    return [i for _, _, i in sorted(keyed)]


def dedupe(names: list[str], colls: list[str], cols: Columns) -> tuple[list[str], list[str], Columns]:
    """Keep the last row of each (collection, name): recording a name twice in a step overwrites it."""
    keys = list(zip(colls, names, strict=True))
    if len(set(keys)) == len(keys):
        return names, colls, cols
    last = {k: i for i, k in enumerate(keys)}
    keep = sorted(last.values())
    remap = {old: new for new, old in enumerate(keep)}
    out = Columns(
        cols.n[keep],
        cols.floats[keep],
        cols.zeros[keep],
        cols.nan[keep],
        cols.inf[keep],
        {remap[i]: v for i, v in cols.activity.items() if i in remap},
        {remap[i]: v for i, v in cols.quantiles.items() if i in remap},
        {remap[i]: v for i, v in cols.deltas.items() if i in remap},
        cols.finite,
    )
    return [names[i] for i in keep], [colls[i] for i in keep], out
