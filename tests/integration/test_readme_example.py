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
