"""The shipped Prometheus config, recording rules and Grafana dashboards against a real worker.

A `tensorpulse stream` worker evaluates a short PyTorch run (with a NaN injected, so rules fire
and actions are sent) and one undecodable record; the real `prometheus` binary scrapes the
worker with the shipped scrape settings and rule files. Every PromQL expression of every shipped
dashboard panel must then return data: a panel with a wrong metric, label or variable fails.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tensorpulse.topics import reductions_topic

from .helpers import scrape, wait_for, worker_process
from .prom import PROMETHEUS, PROMTOOL, api, dashboard_queries, prometheus_server, query, scrape_config_for

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRAPE_JOB = "tensorpulse-workers"
STEPS = 60
FAULT_STEP = 40


class _Run:
    """A tiny MLP trained through a TorchHook; the input holds an Inf at FAULT_STEP (rules fire)."""

    def __init__(self, job: str, bootstrap: str) -> None:
        from tensorpulse.producers.torch import TorchHook

        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.hook = TorchHook(job, bootstrap, save_interval=1)  # creates the job's topic
        self.hook.attach(self.model, self.opt)

    def train(self, steps: range) -> None:
        for step in steps:
            x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
            if step == FAULT_STEP:
                x[0, 0] = float("inf")
            self.opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
            self.hook.step(step, loss=loss)
            time.sleep(0.03)  # spread the run over a few scrapes


@pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool not installed (apt-get install prometheus)",
)
def test_dashboards_and_recording_rules_on_a_real_worker(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """Every shipped dashboard panel returns data from a real Prometheus scraping a real worker."""
    job = f"prom-{unique}"
    with worker_process(
        kafka_bootstrap, tmp_path, group=f"g-{unique}", rules=DEPLOY / "rules.yaml", jobs_regex=f"^{job}$"
    ) as (_proc, metrics_url):
        target = metrics_url.removeprefix("http://").removesuffix("/metrics")
        rule_files = [
            DEPLOY / "prometheus" / "recording.rules.yml",
            DEPLOY / "prometheus" / "alerts.rules.yml",
        ]
        config = scrape_config_for(DEPLOY / "prometheus" / "prometheus.yml", SCRAPE_JOB, target, rule_files)
        with prometheus_server(tmp_path, config) as prom:
            wait_for(lambda: query(prom, f'up{{job="{SCRAPE_JOB}"}} == 1'), 20, "the worker target to be up")

            run = _Run(job, kafka_bootstrap)
            try:
                # The job's first records, then the rest once Prometheus has seen the counter:
                # it then grows between scrapes, so rates are positive.
                wait_for(
                    lambda: "tensorpulse_jobs 1.0" in scrape(metrics_url), 30, "the worker to follow the job"
                )
                run.train(range(5))
                wait_for(
                    lambda: query(prom, f'tensorpulse_records_total{{job="{job}"}}'), 30, "the first records"
                )
                run.train(range(5, STEPS))
                producer = Producer({"bootstrap.servers": kafka_bootstrap})
                producer.produce(reductions_topic(job), key=job.encode(), value=b"\x93\x01")  # not a record
                producer.flush(10)

                def evaluated() -> bool:
                    got = query(prom, f'sum(tensorpulse_records_total{{job="{job}"}})')
                    return bool(got) and float(got[0]["value"][1]) == STEPS

                wait_for(evaluated, 30, f"Prometheus to see {STEPS} records of {job} evaluated")

                # The exposition passes Prometheus's own linter.
                text = scrape(metrics_url)
                lint = subprocess.run(
                    [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True
                )
                assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"

                panels = []
                for name in ("tensorpulse-overview.json", "tensorpulse-layers.json"):
                    panels += dashboard_queries(
                        DEPLOY / "grafana" / "dashboards" / name, {"job": job, "rank": ".*", "mode": "train"}
                    )
                assert len(panels) >= 20, f"expected the dashboards' panels, found {len(panels)}"

                def empty_panels() -> list[str]:
                    return [f"{where}: {expr}" for where, expr in panels if not query(prom, expr)]

                missing: list[str] = []

                def all_have_data() -> bool:
                    missing[:] = empty_panels()
                    return not missing

                try:
                    wait_for(all_have_data, 20, "every dashboard panel to return data", interval=1.0)
                except AssertionError:
                    pytest.fail("dashboard panels without data:\n  " + "\n  ".join(missing))

                # Recording rules were loaded and evaluate without errors; recorded series exist.
                groups = api(prom, "/api/v1/rules")["groups"]
                rules = [r for g in groups for r in g["rules"]]
                assert {g["name"] for g in groups} == {"tensorpulse-recording", "tensorpulse-pipeline"}
                assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
                rate = query(prom, f'job:tensorpulse_records:rate1m{{job="{job}"}}')
                assert rate and float(rate[0]["value"][1]) > 0
                assert query(
                    prom, f'job_rule:tensorpulse_rule_firing:max{{job="{job}", rule="ExplodingTensor"}}'
                )
                workers = query(prom, "tensorpulse:workers_up:count")
                assert workers and float(workers[0]["value"][1]) == 1
            finally:
                run.hook.close()
