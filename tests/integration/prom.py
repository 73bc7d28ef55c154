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


def default_config(job_name: str, target: str, rule_files: list[Path]) -> dict[str, Any]:
    """A Prometheus config with the plainest scrape job any tutorial shows: a name and a static
    target, nothing else (no honor_labels, no relabelling), scraped every 1 s; the given rule files."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job_name, "static_configs": [{"targets": [target]}]}],
    }


def label_values(base: str, label: str, match: str) -> list[str]:
    """What Grafana's `label_values(match, label)` lists: values of `label` on series matching `match`."""
    return api(base, f"/api/v1/label/{urllib.parse.quote(label)}/values", **{"match[]": match})


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


def _substitute(text: str, values: Mapping[str, str], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise AssertionError(f"{where} uses an unknown variable ${name}")
        return values[name]

    return _VAR.sub(sub, text)


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
            out.append((where, _substitute(expr, values, where)))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\((.+),\s*(\w+)\s*\)\s*$")


def dashboard_variables(path: Path, variables: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(variable name, series selector, label) of every `label_values(selector, label)` query
    variable of a dashboard, other variables substituted; other variable types are skipped."""
    dash = json.loads(path.read_text())
    out = []
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or var.get("definition", ""))
        m = _LABEL_VALUES.match(text)
        if m is None:
            raise AssertionError(f"{path.name}: variable {var['name']!r} is not label_values(...): {text!r}")
        where = f"{path.name}: variable {var['name']!r}"
        out.append((var["name"], _substitute(m.group(1), variables, where), m.group(2)))
    return out


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # panels inside collapsed rows
