"""Real XGBoost trainings with known faults, TensorpulseCallback -> broker -> `tensorpulse stream` -> alerts.

Three small regressions on synthetic data (well under a second each on one thread), through one
worker with the default rule set: one feature that carries almost all of the signal
(FeatureImportanceOverweight), trees deeper than TreeDepth's default depth 4 (TreeDepth), and a
healthy run that fires neither. Each fault run must also leave the other XGBoost rule quiet.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pytest

from tensorpulse.events import AlertEvent
from tensorpulse.producers.hook import Hook
from tensorpulse.topics import ALERTS_TOPIC

from .helpers import metric_value, read_topic, scrape, wait_for, worker_process

xgb = pytest.importorskip("xgboost")
from tensorpulse.producers.xgboost import TensorpulseCallback  # noqa: E402

pytestmark = pytest.mark.integration

FEATURES = 12
#: One feature with 20x the weight of each of the others: it carries ~97 % of the tree gain.
DOMINANT = (5.0,) + (0.25,) * (FEATURES - 1)
#: Every feature equally informative: the three largest gains stay well under 80 % of the total.
BALANCED = (1.0,) * FEATURES


@dataclass(frozen=True)
class XgbScenario:
    name: str
    weights: tuple[float, ...]
    max_depth: int
    expected: frozenset[str]  # rules that must fire
    quiet: frozenset[str]  # rules that must not


# max_depth 4 for the runs that must not fire TreeDepth: the deepest trees its default depth (4)
# accepts, so a full depth-4 tree is checked not to fire. (With max_depth 3, the first round's
# top-3 gain share of a balanced 12-feature set was 0.72-0.80 over five seeds: too close to
# FeatureImportanceOverweight's 0.8 for a healthy control; with max_depth 4, 0.56-0.64.)
SCENARIOS = [
    XgbScenario(
        "dominant", DOMINANT, 4, frozenset({"FeatureImportanceOverweight"}), frozenset({"TreeDepth"})
    ),
    XgbScenario("deep", BALANCED, 6, frozenset({"TreeDepth"}), frozenset({"FeatureImportanceOverweight"})),
    XgbScenario("healthy", BALANCED, 4, frozenset(), frozenset()),
]


def _data(weights: tuple[float, ...], n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(weights)))
    y = x @ np.asarray(weights) + 0.1 * rng.normal(size=n)
    return xgb.DMatrix(x, label=y, feature_names=[f"x{i}" for i in range(len(weights))])


def _train(sc: XgbScenario, hook: Hook) -> None:
    """30 boosting rounds on 2000 rows, one thread, with the callback publishing every round."""
    dtrain, dval = _data(sc.weights, 2000, 1), _data(sc.weights, 500, 2)
    params = {"max_depth": sc.max_depth, "eta": 0.3, "nthread": 1, "objective": "reg:squarederror"}
    callback = TensorpulseCallback(hook)
    xgb.train(
        params,
        dtrain,
        30,
        evals=[(dtrain, "train"), (dval, "eval")],
        callbacks=[callback],
        verbose_eval=False,
    )


@pytest.fixture(scope="module")
def alerts(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[AlertEvent]]:
    """Run every XGBoost scenario once through one worker; scenario name -> its alert events."""
    tag = uuid.uuid4().hex[:6]
    # Hooks first: every job's topic exists before the worker starts, so it discovers them at once.
    hooks = {sc.name: Hook(f"xgb-{tag}-{sc.name}", kafka_bootstrap) for sc in SCENARIOS}
    tmp = tmp_path_factory.mktemp("xgb-scenarios")
    with worker_process(kafka_bootstrap, tmp, group=f"g-xgb-{tag}", jobs_regex=f"^xgb-{tag}-") as (_, url):
        for sc in SCENARIOS:
            with hooks[sc.name] as hook:
                _train(sc, hook)
        wait_for(
            lambda: metric_value(scrape(url), "tensorpulse_jobs_finished_total") == len(SCENARIOS),
            60,
            "every XGBoost run's end record to be evaluated",
            interval=0.5,
        )
    out: dict[str, list[AlertEvent]] = defaultdict(list)
    for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1):
        ev = AlertEvent.from_json(m.value())
        if ev.job.startswith(f"xgb-{tag}-"):
            out[ev.job.rsplit("-", 1)[1]].append(ev)
    return out


def _firing(events: list[AlertEvent]) -> set[str]:
    return {e.rule for e in events if e.status == "firing"}


@pytest.mark.parametrize("scenario", [sc for sc in SCENARIOS if sc.expected], ids=lambda sc: sc.name)
def test_xgboost_fault_raises_its_rule(alerts: dict[str, list[AlertEvent]], scenario: XgbScenario) -> None:
    """Each XGBoost fault fires the rule built to catch it, and not the other XGBoost rule."""
    fired = _firing(alerts[scenario.name])
    assert scenario.expected <= fired, f"{scenario.name}: fired {sorted(fired)}"
    assert not scenario.quiet & fired, f"{scenario.name}: fired {sorted(fired)}"


def test_dominant_feature_is_named(alerts: dict[str, list[AlertEvent]]) -> None:
    """FeatureImportanceOverweight names the dominant feature first."""
    events = [
        e for e in alerts["dominant"] if e.rule == "FeatureImportanceOverweight" and e.status == "firing"
    ]
    assert events and events[0].tensors[0] == "x0", [e.tensors for e in events]


def test_healthy_xgboost_run_raises_nothing(alerts: dict[str, list[AlertEvent]]) -> None:
    """A healthy XGBoost run (balanced features, max_depth 4) raises no alert with the default rule set."""
    assert _firing(alerts["healthy"]) == set()
