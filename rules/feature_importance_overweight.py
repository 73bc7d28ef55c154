"""FeatureImportanceOverweight: a few features carry almost all of the model's feature importance."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from tensorpulse.wire import StepRecord

from . import functional as F
from .base import Finding, NoState, Regex, Rule, RuleKind, RuleParams, State, compile_regex


class FeatureImportanceOverweightParams(RuleParams):
    threshold: float = Field(0.8, ge=0.0, le=1.0, description="share of the total importance")
    nfeatures: int = Field(3, ge=1, description="how many of the largest importances to add up")
    tensor_regex: str | None = Field("feature_importance/gain", description="names of the importance vectors")


class FeatureImportanceOverweight(Rule):
    """Fires while the `nfeatures` largest importances make up more than `threshold` of the total.

    Our definition: importances arrive as named vectors (StepRecord.vectors) labelled by feature
    name; the XGBoost callback sends "feature_importance/<type>" with the raw values of
    Booster.get_score for each round. At each train record, every vector whose name matches
    `tensor_regex` (re.search; default "feature_importance/gain"; None: every vector) is judged:
    share = (sum of its nfeatures largest values) / (sum of all its values), over its finite,
    non-negative values. The rule fires when any judged vector's share > threshold.
    A vector with at most `nfeatures` usable values (or a zero total) is not judged: its share is
    1 by construction. Note that get_score leaves out features the trees never split on, so early
    rounds, or a model that uses only nfeatures features of many, are not judged either; the
    callback would have to send zeros for unused features for those to count.
    value: the largest share; threshold: threshold; tensors: the labels of the nfeatures largest
    features of the vector with that share, largest first ("f<index>" where the vector has no
    labels; ties by position). It resolves at the next judged record where no vector is over, and
    returns None when no matching vector can be judged. Stateless.
    The hook must send the importances as a labelled vector (record_vector; the XGBoost callback does).
    """

    name: ClassVar[str] = "FeatureImportanceOverweight"
    kind: ClassVar[RuleKind] = RuleKind.PER_TENSOR
    Params: ClassVar[type[RuleParams]] = FeatureImportanceOverweightParams
    #: Judges each record on its own: keeps nothing.
    State = NoState
    modes: ClassVar[frozenset[str]] = frozenset({"train"})
    severity: ClassVar[str] = "info"
    needs: ClassVar[str] = 'labelled importance vector "feature_importance/gain" (XGBoost callback)'

    def _check(self) -> None:
        self._regex: Regex | None = compile_regex(self.params.tensor_regex, "tensor_regex")

    def update(self, state: State, record: StepRecord) -> tuple[State, Finding | None]:
        p = self.params
        best: tuple[float, str, tuple[str, ...]] | None = None  # (share, vector, top features)
        over = 0
        for name, vec in record.vectors.items():
            if self._regex is not None and not self._regex.search(name):
                continue
            got = F.top_share(vec.values, p.nfeatures)
            if got is None:
                continue
            share, top = got
            labels = tuple(vec.labels[i] if vec.labels is not None else f"f{i}" for i in top)
            over += share > p.threshold
            if best is None or share > best[0]:
                best = (share, name, labels)
        if best is None:
            return state, None
        share, name, labels = best
        if not over:
            return state, Finding(False, value=share, threshold=p.threshold)
        return state, Finding(
            True,
            value=share,
            threshold=p.threshold,
            tensors=labels,
            message=(
                f"{name} at step {record.step}: the top {len(labels)} features ({', '.join(labels)}) hold "
                f"{share:.1%} of the total importance (> {p.threshold:.0%})"
            ),
        )
