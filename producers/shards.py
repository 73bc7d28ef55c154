"""Sharded parameters (FSDP2's `fully_shard`, DTensor): read each rank's own shard, say what it is.

Under FSDP2 a model's parameters and their gradients are DTensors: each rank holds one shard of
each, and any operation on the DTensor itself is dispatched as a distributed operation (reading
one as a whole would all-gather it, and `.numpy()` refuses it). A rank's hook therefore reduces
its local shard only, through the public DTensor API (`to_local()`, `placements`,
`device_mesh`), and marks the statistics as that shard of the parameter (wire `t.sh`:
`ShardMark`), so that the worker can combine a step's shards into the parameter's statistics
(stream/shards.py). Nothing here starts a collective: a hook must never make ranks wait for it.

Which shard: the parameter's mesh dimensions placed `Shard(d)` number the shards (row-major over
those dimensions); `Replicate()` dimensions hold copies of one shard, which share its index (HSDP),
so the worker counts each index once. A DTensor replicated on every mesh dimension is the whole
parameter on every rank, as under DDP, and is not marked. A `Partial()` placement (pending sums,
never a parameter's placement under FSDP2) cannot be read locally as a part of the parameter:
such a tensor is not marked either, and its local values are what the rank reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: (numel of the whole parameter, shard index, shard count, row-major offset or -1): wire `t.sh`.
ShardMark = tuple[int, int, int, int]

try:  # torch.distributed is optional in torch builds (and absent on some platforms)
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """True for a DTensor (a sharded or replicated parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def shard_mark(t: Any) -> ShardMark | None:
    """This rank's place in the whole of DTensor `t`, or None when it holds no shard of it.

    None for: a plain tensor; a DTensor replicated on every mesh dimension (each rank has the
    whole); a `Partial` placement; a rank outside the mesh. The offset is that of the shard's
    first element in the whole tensor flattened in row-major order when the shard is one
    contiguous block of it (one `Shard(d)` dimension and every dimension before d of size 1,
    e.g. FSDP2's `Shard(0)`); else -1. Chunks follow `torch.chunk`, as `Shard` splits: ceil(size /
    shards) elements each, the last ones shorter or empty.
    """
    if not is_dtensor(t):
        return None
    mesh, placements = t.device_mesh, t.placements
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    index, count = 0, 1
    sharded: list[int] = []  # mesh dimensions that shard t
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            return None  # Partial: pending sums, not a part of the parameter
        size = mesh.size(mesh_dim)
        index, count = index * size + coordinate[mesh_dim], count * size
        sharded.append(mesh_dim)
    if count == 1:
        return None
    numel = math.prod(t.shape)
    return (numel, index, count, _offset(t, sharded, coordinate, numel))


def _offset(t: Any, sharded: list[int], coordinate: Sequence[int], numel: int) -> int:
    """Row-major offset of this rank's shard when it is one contiguous block of `t`, else -1."""
    if len(sharded) != 1:
        return -1
    mesh_dim = sharded[0]
    placement = t.placements[mesh_dim]
    if type(placement) is not Shard:  # a subclass (strided sharding) lays elements out otherwise
        return -1
    shape = tuple(t.shape)
    dim = placement.dim % len(shape) if shape else 0
    if not shape or any(s != 1 for s in shape[:dim]):
        return -1
    chunk = -(-shape[dim] // t.device_mesh.size(mesh_dim))
    start = min(coordinate[mesh_dim] * chunk, shape[dim])
    offset = start * math.prod(shape[dim + 1 :])
    local = math.prod(t.to_local().shape)
    return offset if offset + local <= numel else -1


def local_tensors(tensors: Sequence[Any]) -> list[Any]:
    """Each DTensor replaced by this rank's local tensor (a view, no copy, no collective);
    plain tensors and None (a parameter without a gradient) as they are."""
    with torch.no_grad():
        return [t.to_local() if is_dtensor(t) else t for t in tensors]


class ShardedParams:
    """The shard marks of a model's parameters, by published name (the weight's and its gradient's).

    Built by `TorchHook.attach` when the model has DTensor parameters; `of` returns None when it
    has none, so an unsharded model pays nothing per step.
    """

    def __init__(self, marks: Mapping[str, ShardMark], has_dtensors: bool) -> None:
        self.marks = dict(marks)
        self.has_dtensors = has_dtensors

    @classmethod
    def of(
        cls,
        names: Sequence[str],
        params: Sequence[Any],
        grad_names: Sequence[str],
        grad_params: Sequence[Any],
    ) -> ShardedParams | None:
        """Marks of the weights `names` / `params` and of the gradients `grad_names` of
        `grad_params` (a gradient is sharded as its parameter is); None without any DTensor."""
        if not any(is_dtensor(p) for p in (*params, *grad_params)):
            return None
        marks: dict[str, ShardMark] = {}
        for name, p in (*zip(names, params, strict=True), *zip(grad_names, grad_params, strict=True)):
            mark = shard_mark(p)
            if mark is not None:
                marks[name] = mark
        return cls(marks, True)

    def rows(self, names: Sequence[str]) -> dict[int, ShardMark]:
        """Row index -> mark for the rows of a record's tensor block that are shards (`t.sh`)."""
        marks = self.marks
        return {i: marks[name] for i, name in enumerate(names) if name in marks}
