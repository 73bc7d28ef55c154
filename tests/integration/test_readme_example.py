"""The README's hook example runs as written against a real broker and publishes its steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorpulse import wire
from tensorpulse.topics import reductions_topic

from .helpers import read_topic

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_readme_hook_example(kafka_bootstrap: str, unique: str) -> None:
    """Executing the README's Python block publishes 200 decodable steps and an end record."""
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    job = f"readme-{unique}"
    code = code.replace('"my-first-job"', repr(job)).replace('"127.0.0.1:9092"', repr(kafka_bootstrap))
    exec(compile(code, "README.md", "exec"), {})
    cache = wire.SchemaCache()
    records = [wire.decode(m.value(), cache) for m in read_topic(kafka_bootstrap, reductions_topic(job))]
    steps = [r.step for r in records if r.kind == "step"]
    assert steps == list(range(200))
    assert records[-1].kind == "end"
    assert {"weights", "biases", "gradients", "activations"} <= {t.collection for t in records[5].tensors}


def test_readme_xgboost_example(kafka_bootstrap: str, unique: str) -> None:
    """The README's XGBoost block trains, and its records carry what TreeDepth and
    FeatureImportanceOverweight read; both rules fire on them."""
    pytest.importorskip("xgboost")
    from tensorpulse.rules import FeatureImportanceOverweight, TreeDepth, run_rule

    text = (ROOT / "README.md").read_text()
    code = next(b.split("```", 1)[0] for b in text.split("```python\n")[1:] if "TensorpulseCallback" in b)
    job = f"readme-xgb-{unique}"
    code = code.replace('"my-xgboost-job"', repr(job)).replace('"127.0.0.1:9092"', repr(kafka_bootstrap))
    exec(compile(code, "README.md", "exec"), {})
    cache = wire.SchemaCache()
    records = [wire.decode(m.value(), cache) for m in read_topic(kafka_bootstrap, reductions_topic(job))]
    steps = [r for r in records if r.kind == "step"]
    assert [r.step for r in steps] == list(range(30))
    assert "eval-rmse" in steps[-1].scalars and "feature_importance/gain" in steps[-1].vectors
    for rule in (TreeDepth(), FeatureImportanceOverweight()):
        assert any(f.firing for _, f in run_rule(rule, steps)), rule.name
