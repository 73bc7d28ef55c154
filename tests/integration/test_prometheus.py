"""The shipped recording rules and Grafana dashboards against a real worker and a real Prometheus.

A `tensorpulse stream` worker evaluates a short PyTorch run (with an Inf injected, so rules fire
and a stop action is sent) and one undecodable record; the real `prometheus` binary scrapes the
worker with the plainest scrape config there is (a job name and a static target: no
honor_labels, no relabelling), so Prometheus adds its own `job` and `instance` labels. Every
PromQL expression of every shipped dashboard panel, and every dashboard variable, must then
return data for the live job: a panel with a wrong metric, label or variable fails, and so does
a label that clashes with Prometheus's own. Panels of event counters (decode errors, dead
letters, actions) must read 0 before their first event, and count that first event after it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from tensorpulse.errors import DECODE_REASONS
from tensorpulse.rules.config import load_rules
from tensorpulse.topics import reductions_topic

from .helpers import scrape, wait_for, worker_process
from .prom import (
    PROMETHEUS,
    PROMTOOL,
    api,
    dashboard_queries,
    dashboard_variables,
    default_config,
    label_values,
    prometheus_server,
    query,
)

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
SCRAPE_JOB = "tensorpulse"  # Prometheus's `job` label: the scrape job's name, as in any tutorial
STEPS = 60
FAULT_STEP = 40


#: Counters of events a healthy run does not have: their panels must read 0 until the first one.
EVENT_COUNTERS = (
    "tensorpulse_decode_errors_total",
    "tensorpulse_deadletter_total",
    "tensorpulse_actions_total",
)
#: A gauge with a series per (job, rule, rank) only once the rule has fired there.
RULE_FIRING = "tensorpulse_rule_firing"


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


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
            time.sleep(0.03)  # sleep-ok: the pace of the training run, spread over several scrapes; not a wait


@pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool not installed (apt-get install prometheus)",
)
def test_every_dashboard_panel_has_data_with_a_default_scrape_config(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """Every shipped dashboard panel returns data from a plainly configured Prometheus scraping a
    real worker; event panels read 0 before their first event and count it after."""
    job = f"prom-{unique}"
    specs = load_rules(DEPLOY / "rules.yaml")
    with worker_process(
        kafka_bootstrap, tmp_path, group=f"g-{unique}", rules=DEPLOY / "rules.yaml", jobs_regex=f"^{job}$"
    ) as (_proc, metrics_url):
        target = metrics_url.removeprefix("http://").removesuffix("/metrics")
        rule_files = [
            DEPLOY / "prometheus" / "recording.rules.yml",
            DEPLOY / "prometheus" / "alerts.rules.yml",
        ]
        with prometheus_server(tmp_path, default_config(SCRAPE_JOB, target, rule_files)) as prom:
            wait_for(lambda: query(prom, f'up{{job="{SCRAPE_JOB}"}} == 1'), 20, "the worker target to be up")

            # Before any record: every rejection reason and every configured rule has its counter, at 0.
            def by_label(metric: str, label: str) -> dict[str, float]:
                return {r["metric"][label]: float(r["value"][1]) for r in query(prom, metric)}

            assert by_label("tensorpulse_decode_errors_total", "reason") == dict.fromkeys(DECODE_REASONS, 0.0)
            assert by_label("tensorpulse_deadletter_total", "reason") == dict.fromkeys(DECODE_REASONS, 0.0)
            rule_names = {s.name for s in specs}
            assert by_label("tensorpulse_rule_errors_total", "rule") == dict.fromkeys(rule_names, 0.0)
            assert by_label("tensorpulse_state_too_large_total", "rule") == dict.fromkeys(rule_names, 0.0)

            run = _Run(job, kafka_bootstrap)
            try:
                # The job's first records; the rest (with the fault) once the quiet state is checked.
                wait_for(
                    lambda: "tensorpulse_jobs 1.0" in scrape(metrics_url), 30, "the worker to follow the job"
                )
                run.train(range(5))
                # Prometheus's `job` (the scrape job) and ours (`training_job`) side by side.
                wait_for(
                    lambda: query(
                        prom, f'tensorpulse_records_total{{job="{SCRAPE_JOB}", training_job="{job}"}}'
                    ),
                    30,
                    "the first records, labelled with both the scrape job and the training job",
                )
                assert query(prom, '{exported_job!=""}') == [], "a worker label clashed with Prometheus's job"

                panels = [q for path in DASHBOARDS for q in dashboard_queries(path, _variables(job))]
                assert len(panels) >= 20, f"expected the dashboards' panels, found {len(panels)}"
                # Which rules fire is up to the run; panels of firing rules have data once one fires
                # (or from the start, with a 0 fallback).
                quiet = [(w, e) for w, e in panels if RULE_FIRING not in e or "or vector(0)" in e]
                later = [expr for where, expr in panels if (where, expr) not in quiet]
                assert len(later) <= 2, later  # the per-rule views of the overview and the layers
                _wait_all_have_data(prom, quiet, "before any alert or bad record")

                # Event panels are there, at 0: no bad record and no action yet.
                events = [(where, expr) for where, expr in panels if any(c in expr for c in EVENT_COUNTERS)]
                assert len(events) >= 3, events
                for where, expr in events:
                    got = _values(query(prom, expr))
                    assert got and all(v == 0 for v in got), f"{where}: {expr} = {got} before any event"
                stop = query(prom, f'tensorpulse_actions_total{{training_job="{job}", action="stop"}}')
                assert _values(stop) == [0.0]
                fired = query(
                    prom, f'tensorpulse_alerts_total{{training_job="{job}", rule="ExplodingTensor"}}'
                )
                assert sorted(r["metric"]["status"] for r in fired) == ["firing", "resolved"]
                assert _values(fired) == [0.0, 0.0]

                # The layers dashboard's variables list the live job, its ranks and modes.
                variables = [v for path in DASHBOARDS for v in dashboard_variables(path, _variables(job))]
                assert sorted(name for name, _, _ in variables) == ["mode", "rank", "training_job"]
                for path in DASHBOARDS:
                    for name, match, label in dashboard_variables(path, _variables(job)):
                        values = label_values(prom, label, match)
                        assert values, f"{path.name}: variable {name} ({label} of {match}) lists nothing"
                        if name == "training_job":  # the job picker: lists the live job's id
                            assert job in values, f"{path.name}: variable {name} lists {values}"

                run.train(range(5, STEPS))
                producer = Producer({"bootstrap.servers": kafka_bootstrap})
                producer.produce(reductions_topic(job), key=job.encode(), value=b"\x93\x01")  # not a record
                producer.flush(10)

                def evaluated() -> bool:
                    got = query(prom, f'sum(tensorpulse_records_total{{training_job="{job}"}})')
                    return bool(got) and float(got[0]["value"][1]) == STEPS

                wait_for(evaluated, 30, f"Prometheus to see {STEPS} records of {job} evaluated")

                # The exposition passes Prometheus's own linter.
                text = scrape(metrics_url)
                lint = subprocess.run(
                    [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True
                )
                assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"

                _wait_all_have_data(prom, panels, "after the fault")

                # The first bad record and the first action are increases (the series were at 0),
                # so the event panels show them.
                def counted(expr: str) -> bool:
                    return any(v > 0 for v in _values(query(prom, expr)))

                wait_for(
                    lambda: counted(
                        'sum(increase(tensorpulse_decode_errors_total{reason="not_msgpack"}[5m]))'
                    ),
                    20,
                    "the first decode error to show in increase()",
                )
                wait_for(
                    lambda: counted(
                        f'sum(increase(tensorpulse_actions_total{{training_job="{job}", action="stop"}}[5m]))'
                    ),
                    20,
                    "the first stop action to show in increase()",
                )

                # Recording rules were loaded and evaluate without errors; recorded series exist.
                groups = api(prom, "/api/v1/rules")["groups"]
                rules = [r for g in groups for r in g["rules"]]
                assert {g["name"] for g in groups} == {"tensorpulse-recording", "tensorpulse-pipeline"}
                assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
                rate = query(prom, f'training_job:tensorpulse_records:rate1m{{training_job="{job}"}}')
                assert rate and float(rate[0]["value"][1]) > 0
                assert query(
                    prom,
                    f'training_job_rule:tensorpulse_rule_firing:max{{training_job="{job}", rule="ExplodingTensor"}}',
                )
                workers = query(prom, "tensorpulse:workers_up:count")
                assert workers and float(workers[0]["value"][1]) == 1
            finally:
                run.hook.close()


def _variables(job: str) -> dict[str, str]:
    """The dashboards' variables for one live job (all ranks, the train mode)."""
    return {"training_job": job, "rank": ".*", "mode": "train"}


def _wait_all_have_data(prom: str, panels: list[tuple[str, str]], when: str) -> None:
    missing: list[str] = []

    def all_have_data() -> bool:
        missing[:] = [f"{where}: {expr}" for where, expr in panels if not query(prom, expr)]
        return not missing

    try:
        wait_for(all_have_data, 30, f"every dashboard panel to return data {when}", interval=1.0)
    except AssertionError:
        pytest.fail(f"dashboard panels without data {when}:\n  " + "\n  ".join(missing))
