"""The README's rules file in a real `tensorpulse stream` process: a custom Python rule and a declarative one fire."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from tensorpulse import wire
from tensorpulse.events import AlertEvent
from tensorpulse.stream.process import worker_command
from tensorpulse.topics import ALERTS_TOPIC, reductions_topic

from .helpers import create_topic, read_topic, train_record, wait_for, worker_process

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RULES = EXAMPLES / "rules.yaml"

NAMES = ["fc1.weight", "gradient/fc1.weight", "gradient/fc1.bias"]
COLLS = ["weights", "gradients", "gradients"]
SPIKE_STEP = 30  # from here on the fc1.weight gradient's l2 is ~316 instead of ~0.95


def _record(job: str, step: int) -> bytes:
    k, n = len(NAMES), 1000
    grad_std = 10.0 if step >= SPIKE_STEP else 0.03
    #             mean   std                         min    max   abs_mean
    floats = np.array(
        [[0.0, 0.1, -0.3, 0.3, 0.08], [0.0, grad_std, -1.0, 1.0, 0.02], [0.0, 0.03, -0.1, 0.1, 0.02]],
        dtype=np.float32,
    )
    block = wire.TensorBlock(NAMES, COLLS, np.full(k, n), floats, np.zeros(k, dtype=np.int64))
    return train_record(
        job,
        step,
        seq=step,
        scalars={"loss": 1.0 / (1 + step)},
        tensors=block,
        announce=step == 0,
    )


def _worker_env(with_examples: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if with_examples:
        env["PYTHONPATH"] = str(EXAMPLES)
    return env


def test_readme_rules_fire_in_a_worker(
    kafka_bootstrap: str, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the README's rules file (PYTHONPATH=examples), GradNormSpike and BigGradients both alert."""
    readme = (ROOT / "README.md").read_text()
    assert f"```yaml\n{RULES.read_text()}```" in readme, "the README must show examples/rules.yaml"
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))  # what users do: the worker must import my_rules
    job = f"custom-{unique}"
    topic = reductions_topic(job)
    create_topic(kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    with worker_process(
        kafka_bootstrap, tmp_path, group=f"g-{unique}", rules=RULES, jobs_regex=f"^{job}$"
    ) as (
        proc,
        _,
    ):
        for step in range(40):
            producer.produce(topic, key=job.encode(), value=_record(job, step))
        producer.flush(10)

        def custom_alerts() -> list[AlertEvent] | None:
            evs = [
                AlertEvent.from_json(m.value()) for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1)
            ]
            evs = [e for e in evs if e.job == job and e.rule in ("GradNormSpike", "BigGradients")]
            return evs if len(evs) >= 3 else None

        events = wait_for(custom_alerts, 60, "GradNormSpike and BigGradients alerts")
        assert proc.poll() is None
    spike = [(e.status, e.step, e.tensors) for e in events if e.rule == "GradNormSpike"]
    # The moving average over 10 steps catches up with the new level in 3 steps.
    assert spike == [
        ("firing", SPIKE_STEP, ("gradient/fc1.weight",)),
        ("resolved", SPIKE_STEP + 3, ()),
    ]
    (big,) = [e for e in events if e.rule == "BigGradients"]
    assert (big.status, big.step, big.severity) == ("firing", SPIKE_STEP + 2, "critical")  # patience: 3
    assert big.tensors == ("gradient/fc1.weight",) and big.threshold == 100.0 and big.value > 300


def test_worker_without_the_module_fails_at_start_up(tmp_path: Path) -> None:
    """Without the module on PYTHONPATH the worker exits at once and says which PYTHONPATH to set."""
    cmd = worker_command("127.0.0.1:1", group="g", state_dir=tmp_path / "state", rules=RULES)
    done = subprocess.run(cmd, env=_worker_env(False), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"{RULES}: rules[0], line 4: rule 'my_rules:GradNormSpike': cannot import module" in done.stderr
    assert f"PYTHONPATH={EXAMPLES}" in done.stderr
