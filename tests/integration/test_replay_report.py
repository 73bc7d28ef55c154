"""`tensorpulse replay` and `tensorpulse report` against a run published through the real broker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensorpulse.producers import Hook

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "tensorpulse"]
STEPS = 30
DEAD_FROM = 12  # from this step 13 of 16 ReLU units never fire (81 % > DeadRelu's 50 %)
NAN_AT = 20  # the loss is NaN at this step only
RAISED = """\
defaults: true
rules:
  - rule: DeadRelu
    params: {threshold_layer: 95}
"""


def publish_run(job: str, bootstrap: str) -> None:
    """A short numpy run with the real publisher: weights, a ReLU output and the loss per step."""
    rng = np.random.default_rng(0)
    hook = Hook(job, bootstrap, listen_for_actions=False)
    for step in range(STEPS):
        act = np.maximum(rng.standard_normal((64, 16)), 0.0)
        if step >= DEAD_FROM:
            act[:, :13] = 0.0
        hook.record(step, {"0.weight": rng.standard_normal((16, 8)) * 0.1}, collection="weights")
        hook.record(step, {"1/relu_output": act}, collection="activations")
        hook.record_scalars(step, {"loss": float("nan") if step == NAN_AT else 1.0 / (step + 1)})
        hook.publish(step)
    assert hook.flush(30) == 0
    hook.close(10)
    assert hook.stats()["dropped"] == 0


def replay_json(job: str, bootstrap: str, *extra: str) -> dict:
    out = subprocess.run(
        [*CLI, "replay", "--job", job, "--bootstrap", bootstrap, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def firing(doc: dict) -> set[tuple[str, int]]:
    return {(t["rule"], t["step"]) for t in doc["transitions"] if t["status"] == "firing"}


@pytest.fixture(scope="module")
def published(kafka_bootstrap: str) -> str:
    import uuid

    job = f"replay-it-{uuid.uuid4().hex[:8]}"
    publish_run(job, kafka_bootstrap)
    return job


def test_replay_finds_the_fault_at_its_step(published: str, kafka_bootstrap: str) -> None:
    """With the default rules, DeadRelu fires at the step the units die and ExplodingTensor at the NaN."""
    doc = replay_json(published, kafka_bootstrap)
    assert doc["complete"] is True
    s = doc["summary"]
    assert s["records_read"] == STEPS + 1 and s["end_records"] == 1 and s["decode_errors"] == {}
    assert (s["first_step"], s["last_step"]) == (0, STEPS - 1)
    assert ("DeadRelu", DEAD_FROM) in firing(doc)
    assert ("ExplodingTensor", NAN_AT) in firing(doc)
    resolved = {(t["rule"], t["step"]) for t in doc["transitions"] if t["status"] == "resolved"}
    assert ("ExplodingTensor", NAN_AT + 1) in resolved
    assert s["alerts"]["DeadRelu"]["firing"] == 1


def test_replay_with_a_raised_threshold_does_not_fire(
    published: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A rules file raising DeadRelu's threshold_layer above 81 % silences it; ExplodingTensor still fires."""
    rules = tmp_path / "raised.yaml"
    rules.write_text(RAISED)
    doc = replay_json(published, kafka_bootstrap, "--rules", str(rules))
    assert not any(t["rule"] == "DeadRelu" for t in doc["transitions"])
    assert ("ExplodingTensor", NAN_AT) in firing(doc)


def test_replay_text_and_unknown_job(published: str, kafka_bootstrap: str) -> None:
    """The text output shows the transition and summary; an unknown job is an error naming known jobs."""
    out = subprocess.run(
        [*CLI, "replay", "--job", published, "--bootstrap", kafka_bootstrap],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"step {DEAD_FROM:>6}  rank 0  train  FIRING" in out.stdout and "summary" in out.stdout
    bad = subprocess.run(
        [*CLI, "replay", "--job", "no-such-job-x", "--bootstrap", kafka_bootstrap],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "no-such-job-x" in bad.stderr
    # It lists the first 20 jobs by name and counts the rest: on the session's shared broker other
    # tests' jobs may fill the list before ours, and then ours is among those counted.
    listed = bad.stderr.split("jobs with retained records: ", 1)[-1]
    assert published in listed or re.search(r"\(\+\d+ more\)", listed), bad.stderr


def test_report_writes_html_and_png(published: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    """`tensorpulse report` writes a page with images and the DeadRelu alert, and a PNG."""
    pytest.importorskip("matplotlib")
    for name in ("report.html", "report.png"):
        out = subprocess.run(
            [
                *CLI,
                "report",
                "--job",
                published,
                "--bootstrap",
                kafka_bootstrap,
                "--out",
                str(tmp_path / name),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    page = (tmp_path / "report.html").read_text()
    assert page.count("<img data-section=") >= 4 and "<td>DeadRelu</td>" in page
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
