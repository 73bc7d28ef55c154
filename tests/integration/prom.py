"""A real Prometheus server for tests, its HTTP API, and the PromQL of the shipped Grafana dashboards."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tensorpulse.broker import free_port

from .helpers import wait_for

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

#: Grafana's own variables, replaced by windows that suit a 1 s scrape interval and a short test.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1s", "__range": "5m"}

_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")


def api(base: str, path: str, **params: str) -> Any:
    """GET a Prometheus API path; returns its `data`, raising with Prometheus's error text."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 400 for a bad query: show Prometheus's message
        body = json.loads(exc.read() or b"{}")
        raise AssertionError(f"Prometheus {path} {params}: {body.get('error', exc)}") from exc
    if body.get("status") != "success":
        raise AssertionError(f"Prometheus {path} {params}: {body}")
    return body["data"]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """The result vector of an instant query (an empty list: no data)."""
    data = api(base, "/api/v1/query", query=expr)
    return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]


def scrape_config_for(shipped: Path, job_name: str, target: str, rule_files: list[Path]) -> dict[str, Any]:
    """The shipped Prometheus config with `job_name` pointed at one static target, scraped every 1 s.

    Everything else of that scrape job (honor_labels, paths) is kept, so the test checks the
    shipped settings; alerting is dropped (no Alertmanager here)."""
    conf = yaml.safe_load(shipped.read_text())
    jobs = [j for j in conf["scrape_configs"] if j["job_name"] == job_name]
    if not jobs:
        raise AssertionError(f"{shipped} has no scrape job {job_name!r}")
    job = dict(jobs[0])
    for key in [k for k in job if k.endswith("_sd_configs")]:
        del job[key]
    job.update(static_configs=[{"targets": [target]}], scrape_interval="1s", scrape_timeout="1s")
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [job],
    }


@contextlib.contextmanager
def prometheus_server(tmp: Path, config: Mapping[str, Any]) -> Iterator[str]:
    """The `prometheus` binary on a free loopback port with tmp storage; yields its base URL."""
    assert PROMETHEUS is not None
    conf_path = tmp / "prometheus.yml"
    conf_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={conf_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 20, "prometheus to be ready")
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def dashboard_queries(path: Path, variables: Mapping[str, str]) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every target of a Grafana dashboard, variables substituted.

    Raises when an expression uses a variable that is neither given nor a Grafana built-in, so a
    typo in a panel fails instead of being sent as literal text."""
    dash = json.loads(path.read_text())
    values = {**GRAFANA_BUILTINS, **variables}
    out = []
    for panel in _panels(dash.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            where = f"{path.name}: {panel.get('title')!r} {target.get('refId', '')}"

            def sub(m: re.Match[str], where: str = where) -> str:
                name = m.group(1) or m.group(2)
                if name not in values:
                    raise AssertionError(f"{where} uses an unknown variable ${name}")
                return values[name]

            out.append((where, _VAR.sub(sub, expr)))
    return out


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # panels inside collapsed rows
