"""XGBoost integration: a training callback that publishes one record per boosting round.

Usage::

    from tensorpulse.producers.xgboost import TensorpulseCallback

    cb = TensorpulseCallback("my-xgb-job", "kafka:9092")
    xgboost.train(params, dtrain, 100, evals=[(dtrain, "train"), (dval, "eval")], callbacks=[cb])

Each saved round r (the hook's save schedule, every round by default) becomes one train-mode
record of step r with:

- scalars "<data>-<metric>" for every evaluation set and metric (e.g. "train-rmse",
  "eval-logloss"), and "loss": the first evaluation set's last metric, so that loss rules work;
- scalar "xgboost/max_node_id": the largest node id over all trees so far (TreeDepth). It is read
  from the JSON dump of the trees added since the last saved round only (a one-round slice of
  the booster), which stays cheap as the model grows; `trees_to_dataframe()` would re-parse every
  tree each round and needs pandas;
- vectors "feature_importance/<type>" for each importance type (weight, gain, cover,
  total_gain, total_cover), labelled by feature name: the raw values of
  `Booster.get_score(importance_type=...)` (not normalised; features the trees never split on
  are absent). FeatureImportanceOverweight uses top-n / total, which raw values give directly.

Publishing goes through the ordinary Hook (same topic, wire format, never blocks training). A
"stop" action from a rule ends training after the current round. xgboost is optional: importing
this module without it raises an ImportError that says what to install.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

try:
    import xgboost as xgb
    from xgboost.callback import TrainingCallback
except ImportError as exc:  # pragma: no cover - exercised only without xgboost
    raise ImportError(
        "tensorpulse.producers.xgboost needs the xgboost package: pip install 'tensorpulse[xgboost]' "
        "(or xgboost / xgboost-cpu)"
    ) from exc

from .hook import Hook

log = logging.getLogger("tensorpulse.producers")

IMPORTANCE_TYPES = ("weight", "gain", "cover", "total_gain", "total_cover")
_NODE_ID = re.compile(rb'"nodeid":\s*(\d+)')


def _last(values: Sequence[Any]) -> float | None:
    """The newest value of one metric's history (xgboost.cv logs (mean, std) pairs)."""
    if not values:
        return None
    v = values[-1]
    if isinstance(v, (tuple, list)):
        v = v[0]
    return float(v)


def eval_scalars(evals_log: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, float]:
    """Scalars "<data>-<metric>" from xgboost's evaluation log, plus "loss" (first set, last metric)."""
    out: dict[str, float] = {}
    loss = None
    for i, (data, metrics) in enumerate(evals_log.items()):
        for metric, values in metrics.items():
            v = _last(values)
            if v is None:
                continue
            out[f"{data}-{metric}"] = v
            if i == 0:
                loss = v  # the last metric of the first set wins
    if loss is not None:
        out["loss"] = loss
    return out


def max_node_id(booster: Any) -> int | None:
    """The largest node id in the JSON dump of `booster`'s trees (None without trees)."""
    best = None
    for tree in booster.get_dump(dump_format="json"):
        ids = _NODE_ID.findall(tree.encode())
        if ids:
            top = max(int(x) for x in ids)
            best = top if best is None else max(best, top)
    return best


class TensorpulseCallback(TrainingCallback):
    """Publishes evaluation metrics, the largest tree node id and feature importances per round.

    `hook`: a Hook to publish with (left open: its owner closes it), or a job id, for which the
    callback creates a Hook(job, bootstrap, **hook_kwargs) and closes it after training.
    `importance_every`: publish importances every n saved rounds (get_score walks every tree).
    """

    def __init__(
        self,
        hook: Hook | str,
        bootstrap: str | None = None,
        *,
        importance_types: Sequence[str] = IMPORTANCE_TYPES,
        importance_every: int = 1,
        **hook_kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = [t for t in importance_types if t not in IMPORTANCE_TYPES]
        if unknown:
            raise ValueError(f"unknown importance types {unknown}; expected some of {IMPORTANCE_TYPES}")
        if (
            isinstance(importance_every, bool)
            or not isinstance(importance_every, int)
            or importance_every < 1
        ):
            raise ValueError(
                f"Expected argument `importance_every` to be an integer >= 1 but got {importance_every!r}"
            )
        if isinstance(hook, Hook):
            if bootstrap is not None or hook_kwargs:
                raise ValueError("pass either a Hook, or a job id with bootstrap / hook options, not both")
            self.hook, self._owns_hook = hook, False
        else:
            self.hook, self._owns_hook = Hook(hook, bootstrap, **hook_kwargs), True
        self.importance_types = tuple(importance_types)
        self.importance_every = importance_every
        self._scanned = 0  # boosting rounds whose trees were scanned for node ids
        self._max_node: int | None = None
        self._saved = 0

    # ------------------------------------------------------------------ xgboost callback API
    def before_training(self, model: Any) -> Any:
        """Start a fresh scan (a callback object may be reused for another training)."""
        self._scanned, self._max_node, self._saved = 0, None, 0
        return model

    def after_iteration(self, model: Any, epoch: int, evals_log: Mapping[str, Any]) -> bool:
        """Publish round `epoch`; return True (stop training) when a rule asked this job to stop."""
        hook = self.hook
        if not hook.should_save(epoch, "train"):
            return hook.should_stop
        try:
            scalars = eval_scalars(evals_log)
            node = self._update_max_node(model)
            if node is not None:
                scalars["xgboost/max_node_id"] = float(node)
            hook.record_scalars(epoch, scalars)
            if self._saved % self.importance_every == 0:
                for kind in self.importance_types:
                    score = model.get_score(importance_type=kind)
                    # get_score leaves out features no tree splits on; send them as 0, so that a
                    # model leaning on 3 of 100 features shows 97 zeros, not 3 values.
                    names = self._feature_names(model, score)
                    hook.record_vector(
                        epoch,
                        f"feature_importance/{kind}",
                        [float(score.get(n, 0.0)) for n in names],
                        labels=names,
                    )
            self._saved += 1
            hook.publish(epoch, "train")
        except Exception as exc:  # noqa: BLE001 - never raise into training
            hook._note("xgboost callback", exc)
        return hook.should_stop

    @staticmethod
    def _feature_names(model: Any, score: dict[str, float]) -> list[str]:
        """Every feature of the model (XGBoost's names, else f0..f{n-1}); the scored ones if unknown."""
        names = getattr(model, "feature_names", None)
        if names:
            return list(names)
        try:
            n = int(model.num_features())
        except Exception:  # noqa: BLE001
            return list(score)
        return [f"f{i}" for i in range(n)] if n >= len(score) else list(score)

    def after_training(self, model: Any) -> Any:
        """Publish what is pending; close the hook if this callback created it."""
        if self._owns_hook:
            self.hook.close()
        else:
            self.hook.publish()
        return model

    # ------------------------------------------------------------------ internals
    def _update_max_node(self, model: Any) -> int | None:
        """Fold the trees added since the last call into the running largest node id."""
        rounds = model.num_boosted_rounds() if isinstance(model, xgb.Booster) else 0
        if rounds > self._scanned:
            got = max_node_id(model[self._scanned : rounds])
            self._scanned = rounds
            if got is not None:
                self._max_node = got if self._max_node is None else max(self._max_node, got)
        return self._max_node


__all__ = ["IMPORTANCE_TYPES", "TensorpulseCallback", "eval_scalars", "max_node_id"]
