"""TreeDepth: the XGBoost model has trees deeper than `depth` (judged from the largest node id)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, NoState, Rule, RuleKind, RuleParams, State

#: The scalar the XGBoost callback sends: the largest node id over the model's trees so far.
MAX_NODE_ID = "xgboost/max_node_id"


class TreeDepthParams(RuleParams):
    depth: int = Field(4, ge=0, description="largest tree depth that does not fire (root alone: 0)")


class TreeDepth(Rule):
    """Fires while ⌊log2(largest node id + 1)⌋ > `depth`: some tree is certainly deeper than `depth`.

    Our definition of SageMaker's "log2 of the largest node id": the depth estimate is
    D = ⌊log2(m + 1)⌋ for the largest node id m (scalar "xgboost/max_node_id" of a train record,
    over all trees so far). In heap order (children of node i are 2i+1 and 2i+2), D is exactly the
    depth of node m. XGBoost numbers the nodes of each tree 0..n−1 in the order they are created,
    so m + 1 is the node count of its largest tree; a full tree of depth d has ids 0..2^(d+1)−2
    (depth 4: 0..30, D = 4), and a tree of depth d never has more than 2^(d+1)−1 nodes, so D is a
    lower bound on the depth of that tree. The rule fires when D > depth, that is when m >=
    2^(depth+1)−1: the largest tree has more nodes than any tree of depth `depth` can hold. It never
    fires for a model whose trees are at most `depth` deep (not even full ones: the literal
    log2(30) = 4.9 > 4 would fire on a full depth-4 tree), and it misses a deeper tree that is
    sparse (a depth-6 tree of 20 nodes gives D = 4). Measured here: XGBoost 3 with max_depth=6 grew
    trees of 71-111 nodes (D = 6), with max_depth=4 trees of 29-31 nodes (D = 4).
    value: D; threshold: depth; tensors: ("xgboost/max_node_id",) when firing. The scalar only
    grows during a training, so once firing the rule stays firing. It returns None on records
    without the scalar or with a negative or non-finite one. Stateless.
    The hook must send scalar "xgboost/max_node_id" (the XGBoost callback does on every saved round).
    """

    name: ClassVar[str] = "TreeDepth"
    kind: ClassVar[RuleKind] = RuleKind.SCALAR
    Params: ClassVar[type[RuleParams]] = TreeDepthParams
    #: Judges each record on its own: keeps nothing.
    State = NoState
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "info"
    needs: ClassVar[str] = 'scalar "xgboost/max_node_id" (tensorpulse.producers.xgboost callback)'

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        m = record.scalars.get(MAX_NODE_ID)
        if m is None or not math.isfinite(m) or m < 0:
            return state, None
        depth = self.params.depth
        d = F.depth_from_node_id(int(m))
        if d <= depth:
            return state, Finding(False, value=float(d), threshold=float(depth))
        return state, Finding(
            True,
            value=float(d),
            threshold=float(depth),
            tensors=(MAX_NODE_ID,),
            message=(
                f"largest tree node id {int(m)} at round {record.step}: a tree has more than "
                f"2^({depth}+1)-1 = {2 ** (depth + 1) - 1} nodes, so its depth is at least {d} (> {depth})"
            ),
        )

    def batch_reference(self, records: Sequence[StepRecord]) -> list[Finding | None]:
        """Each record on its own: D is the bit length of m + 1, less one (⌊log2(m + 1)⌋ in integers)."""
        depth = self.params.depth
        out: list[Finding | None] = []
        for r in records:
            m = r.scalars.get(MAX_NODE_ID)
            if m is None or not math.isfinite(m) or m < 0:
                out.append(None)
                continue
            d = (int(m) + 1).bit_length() - 1
            out.append(Finding(d > depth, float(d), float(depth), (MAX_NODE_ID,) if d > depth else ()))
        return out
