"""`tensorpulse rules --check FILE --against JOB` on a real broker: the job's topic read, misses named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from tensorpulse import wire
from tensorpulse.topics import reductions_topic

from .helpers import create_topic, train_record

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "tensorpulse"]
#: What a hooked nn.Sequential sends: gradients named gradient/<param>.
NAMES = ["0.weight", "gradient/0.weight", "gradient/0.bias", "1/relu_output"]
COLLS = ["weights", "gradients", "gradients", "activations"]

RULES = """\
defaults: true
rules:
  - rule: Threshold
    name: BigGradients
    params: {collection_names: [gradients], tensor_regex: "fc\\\\d\\\\.weight", statistic: l2, op: ">", value: 100}
  - rule: Threshold
    name: BigWeightGradients
    params: {collection_names: [gradients], tensor_regex: "\\\\.weight$", statistic: l2, op: ">", value: 100}
"""


def _publish(bootstrap: str, job: str, steps: int) -> None:
    k = len(NAMES)
    floats = np.tile(np.array([0.0, 0.1, -0.3, 0.3, 0.08], dtype=np.float32), (k, 1))
    block = wire.TensorBlock(NAMES, COLLS, np.full(k, 100), floats, np.zeros(k, dtype=np.int64))
    topic = reductions_topic(job)
    create_topic(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap})
    for step in range(steps):
        value = train_record(job, step, seq=step, scalars={"loss": 1.0}, tensors=block, announce=step == 0)
        producer.produce(topic, key=job.encode(), value=value)
    assert producer.flush(10) == 0


def test_rules_against_a_job_names_the_regex_that_matches_nothing(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """The old BigGradients regex is a warning (exit 1) naming the job's gradients; the fixed one passes."""
    job = f"against-{unique}"
    _publish(kafka_bootstrap, job, 5)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    cmd = [*CLI, "rules", "--check", str(rules), "--against", job, "--bootstrap", kafka_bootstrap]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: BigGradients: tensor_regex 'fc\\\\d\\\\.weight' matches nothing job {job!r} publishes "
        "(it publishes e.g. gradient/0.bias, gradient/0.weight)"
    ]
    assert f"{reductions_topic(job)}: 5 record(s), 4 tensor(s), 1 scalar(s)" in out.stderr
    assert "1 with a selection of the rules file that matches nothing" in out.stderr
    assert "BigWeightGradients" in out.stdout  # the rules the job gets, as --check lists them

    rules.write_text(RULES.replace("fc\\\\d\\\\.weight", "^gradient/"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warning:" not in out.stderr


def test_rules_against_a_job_without_records_says_so(kafka_bootstrap: str, unique: str) -> None:
    """A job with no topic is an error that lists the jobs there are, not an empty pass."""
    out = subprocess.run(
        [*CLI, "rules", "--against", f"nothing-{unique}", "--bootstrap", kafka_bootstrap],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert f"no topic 'tensorpulse.reductions.nothing-{unique}'" in out.stderr
