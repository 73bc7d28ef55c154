"""`tensorpulse top --once` against a real broker and worker: a hooked run's step, lag and firing rule, then its end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC

from .helpers import metric_value, read_topic, scrape, wait_for, worker_process

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "tensorpulse"]
STEPS, NAN_STEP = 20, 12


def _events(bootstrap: str, job: str, status: str) -> list[AlertEvent]:
    evs = [AlertEvent.from_json(m.value()) for m in read_topic(bootstrap, ALERTS_TOPIC, timeout=1)]
    return [e for e in evs if e.job == job and e.rule == "ExplodingTensor" and e.status == status]


def _top(bootstrap: str, job: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [*CLI, "top", "--bootstrap", bootstrap, "--job", f"^{job}$", "--metrics-url", url, "--once", *extra],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_top_once_shows_the_job_its_step_lag_and_firing_rule(kafka_bootstrap: str, unique: str, tmp_path: Path):
    """A hooked MLP with a NaN weight from step 12: top shows step 19, the worker's lag and ExplodingTensor
    firing; once the hook closes and the worker resolves the alert, top shows the job ended with nothing firing."""
    job = f"top-{unique}"
    with worker_process(kafka_bootstrap, tmp_path, group=f"g-{unique}", jobs_regex=f"^{job}$") as (_, url):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        hook = TorchHook(job, kafka_bootstrap).attach(model, opt)
        try:
            for step in range(STEPS):
                if step == NAN_STEP:
                    with torch.no_grad():
                        model[0].weight[0, 0] = float("nan")
                loss = nn.functional.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 2, (32,)))
                opt.zero_grad()
                loss.backward()
                hook.step(step, loss=loss)
                opt.step()
            hook.flush()
            wait_for(lambda: _events(kafka_bootstrap, job, "firing"), 60, "ExplodingTensor firing")
            wait_for(
                lambda: metric_value(scrape(url), "tensorpulse_consumer_lag", training_job=job) is not None,
                30,
                "the worker's lag gauge for the job",
            )

            plain = _top(kafka_bootstrap, job, url)
            (line,) = [ln for ln in plain.stdout.splitlines() if ln.startswith(job)]
            cells = line.split()
            assert cells[:3] == [job, "live", str(STEPS - 1)], line
            assert "ExplodingTensor" in cells, line

            doc = json.loads(_top(kafka_bootstrap, job, url, "--json", "--layers").stdout)
            (row,) = doc["jobs"]
            assert doc["complete"] and (row["job"], row["step"], row["ranks"], row["world"]) == (job, STEPS - 1, 1, 1)
            assert isinstance(row["lag"], int) and row["age_s"] < 60
            # The most severe first (the NaN also kills ReLUs: DeadRelu may fire beside it).
            assert [f["rule"] for f in row["firing"]][0] == "ExplodingTensor"
            series = {s["name"]: s for s in doc["series"][job]}
            grad = series["gradient/0.weight"]
            assert grad["steps"][-1] == STEPS - 1 and "!" in grad["sparkline"]  # the NaN shows in the line
            assert "loss" in series
        finally:
            hook.close()
        wait_for(lambda: _events(kafka_bootstrap, job, "resolved"), 60, "ExplodingTensor resolved at the job's end")
        (row,) = json.loads(_top(kafka_bootstrap, job, url, "--json").stdout)["jobs"]
        assert (row["state"], row["firing"]) == ("ended", [])
