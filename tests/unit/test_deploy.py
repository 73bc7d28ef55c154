"""deploy/: the compose file, Kubernetes manifests, Prometheus/Alertmanager configs and dashboards.

The configs are checked with the real tools where they are installed (promtool, amtool,
docker-compose; CI installs them) and structurally here, since kubectl and a Docker engine are not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorpulse import __version__ as VERSION
from tensorpulse.rules.config import load_rules

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
METRICS_PORT = 9464
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it with apt-get)")
    return path


def _run(*cmd: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _k8s_docs() -> list[dict[str, Any]]:
    return [d for f in K8S for d in yaml.safe_load_all(f.read_text()) if d]


def _assert_pinned(image: str, where: str) -> None:
    """name:tag with a version-like tag (a digit in it), never `latest` and never untagged."""
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{where}: image {image!r} has no tag"
    assert tag != "latest" and re.search(r"\d", tag), f"{where}: image {image!r} is not pinned to a version"


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


# ----------------------------------------------------------------------------- docker-compose
def test_compose_config_is_valid() -> None:
    """`docker-compose config` accepts the file (no engine needed); a shell's bootstrap stays out."""
    env = {**os.environ, "TENSORPULSE_BOOTSTRAP": "127.0.0.1:9092"}
    env.pop("TENSORPULSE_STACK_BOOTSTRAP", None)
    out = _run(_tool("docker-compose"), "-f", str(DEPLOY / "docker-compose.yml"), "config", env=env)
    services = yaml.safe_load(out)["services"]
    assert {"kafka", "worker", "notify", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert services["worker"]["scale"] == 2
    for name in ("worker", "notify"):
        assert services[name]["environment"]["TENSORPULSE_BOOTSTRAP"] == "kafka:19092"


def test_compose_images_are_pinned() -> None:
    """Every service names a versioned image; the tensorpulse image is tagged with the package version."""
    services = _compose()["services"]
    for name, svc in services.items():
        assert "image" in svc, f"service {name} has no image"
        _assert_pinned(svc["image"], f"docker-compose service {name}")
    assert services["kafka"]["image"].startswith("apache/kafka:")
    for name in ("worker", "notify"):
        assert services[name]["image"] == f"tensorpulse/tensorpulse:{VERSION}"
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_dockerfile_base_image_is_pinned() -> None:
    """The worker image's base is a versioned Python image and it installs the stream extra."""
    text = (DEPLOY / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases, "no FROM in deploy/Dockerfile"
    for base in bases:
        _assert_pinned(base, "deploy/Dockerfile")
    assert "'.[stream]'" in text


def test_compose_bind_mounts_exist_and_wiring_matches() -> None:
    """Bind-mounted files exist; the worker serves metrics where Prometheus scrapes them."""
    services = _compose()["services"]
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"service {name} mounts missing {src}"
    worker = services["worker"]
    assert f"--metrics-port={METRICS_PORT}" in worker["command"]
    assert "--metrics-addr=0.0.0.0" in worker["command"]
    env = worker["environment"]
    assert env["TENSORPULSE_RULES"] == "/etc/tensorpulse/rules.yaml"
    assert "./rules.yaml:/etc/tensorpulse/rules.yaml:ro" in worker["volumes"]
    # TLS/SASL pass-through: set in the shell, absent (not empty) in the container otherwise.
    assert env["TENSORPULSE_KAFKA_SECURITY_PROTOCOL"] is None


def test_rules_file_loads() -> None:
    """deploy/rules.yaml is a valid rules file with ExplodingTensor asking jobs to stop."""
    specs = load_rules(DEPLOY / "rules.yaml")
    assert any(s.name == "ExplodingTensor" and s.action == "stop" for s in specs)


# ----------------------------------------------------------------------------- Prometheus
def test_promtool_check_config() -> None:
    """promtool accepts the Prometheus config (and the rule files it names)."""
    out = _run(_tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert "2 rule files found" in out


def test_promtool_check_rules() -> None:
    """promtool accepts the recording and alerting rules."""
    _run(_tool("promtool"), "check", "rules", *map(str, sorted(PROM.glob("*.rules.yml"))))


def test_promtool_test_rules() -> None:
    """The alerting rules' unit tests pass (promtool test rules)."""
    out = _run(_tool("promtool"), "test", "rules", "alerts.test.yml", cwd=PROM)
    assert "SUCCESS" in out


def test_scrape_job_is_a_plain_one() -> None:
    """The worker scrape job needs no honor_labels or relabelling (the training job is the
    metrics' own `training_job` label, not Prometheus's `job`) and targets the compose service."""
    conf = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "tensorpulse-workers")
    assert not {"honor_labels", "relabel_configs", "metric_relabel_configs"} & set(job), job
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["port"] == METRICS_PORT
    k8s = (DEPLOY / "k8s" / "service.yaml").read_text()
    assert "honor_labels: true" not in k8s


#: `job` as a label name in PromQL or a label list (not `training_job`, not a recording rule's
#: `job:` level prefix), and as a label in a template, legend, Grafana field or link variable.
_JOB_LABEL = re.compile(r"(?<![\w:.$])job(?=\s*(?:=|!=|=~|!~|[,)\]]))")
_JOB_TEMPLATE = re.compile(r"\$labels\.job\b|\{\{\s*job\s*\}\}|fields\.job\b|var-job\b")
_FREE_TEXT = {"description", "title", "summary"}


def _job_labels(value: Any, key: str = "") -> list[str]:
    """Every string in a parsed config that uses `job` as a label name."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _job_labels(v, str(k))]
    if isinstance(value, list):
        return [hit for v in value for hit in _job_labels(v, key)]
    if not isinstance(value, str):
        return []
    if value == "job" or _JOB_TEMPLATE.search(value) or (key not in _FREE_TEXT and _JOB_LABEL.search(value)):
        return [value]
    return []


def test_the_training_job_is_never_the_label_job() -> None:
    """Dashboards, recording and alerting rules and Alertmanager routes name the training job
    `training_job`; `job` appears only where it means Prometheus's scrape job (up{job=...})."""
    configs = {p.name: json.loads(p.read_text()) for p in DASHBOARDS}
    configs |= {p.name: yaml.safe_load(p.read_text()) for p in PROM.glob("*.rules.yml")}
    alertmanager = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    configs["alertmanager.yml"] = alertmanager
    found = {name: _job_labels(conf) for name, conf in configs.items()}
    assert found.pop("alerts.rules.yml") == ['up{job="tensorpulse-workers"} == 0']
    assert all(not hits for hits in found.values()), found
    assert alertmanager["route"]["group_by"] == ["training_job"]
    assert all("training_job" in r.get("equal", ["training_job"]) for r in alertmanager["inhibit_rules"])
    # The check itself finds the old label.
    old = {"expr": 'sum by (job) (x{job="a"})', "legendFormat": "{{job}}", "group_by": ["job"]}
    assert len(_job_labels(old)) == 3
    assert not _job_labels({"expr": 'sum by (training_job) (job:x:rate1m{training_job="a"})'})


def test_alertmanager_config() -> None:
    """amtool accepts the Alertmanager config."""
    _run(_tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))


# ----------------------------------------------------------------------------- Grafana
def test_dashboards_are_provisioned() -> None:
    """Both dashboards exist with unique uids and panel ids, and the provider points at their mount."""
    assert [p.name for p in DASHBOARDS] == ["tensorpulse-layers.json", "tensorpulse-overview.json"]
    dashboards = [json.loads(p.read_text()) for p in DASHBOARDS]
    assert len({d["uid"] for d in dashboards}) == 2
    for d in dashboards:
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{d['uid']}: duplicate panel ids"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tensorpulse.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in _compose()["services"]["grafana"]["volumes"]
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_layers_dashboard_has_a_training_job_variable() -> None:
    """The per-job dashboard is templated on the training job and filters every panel by it; the
    links to it (the overview's job table, notify's generator URL in compose) set that variable."""
    d = json.loads((DEPLOY / "grafana/dashboards/tensorpulse-layers.json").read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert "label_values(tensorpulse_last_step, training_job)" in variables["training_job"]["definition"]
    for title, expr in _exprs(d):
        assert 'training_job="$training_job"' in expr, f"panel {title!r} is not filtered by $training_job"
    links = re.findall(
        r"/d/tensorpulse-layers/[\w-]+\?([^\s\"&]+)",
        (DEPLOY / "grafana/dashboards/tensorpulse-overview.json").read_text()
        + (DEPLOY / "docker-compose.yml").read_text(),
    )
    assert len(links) == 2, links
    for link in links:
        name = link.partition("=")[0].removeprefix("var-")
        assert name in variables, f"a link to the layers dashboard sets an unknown variable: {link}"


def test_dashboard_queries_use_known_metrics_and_variables() -> None:
    """Every panel names an exported metric (docs/metrics.md) or a recorded series, and known variables."""
    documented = set(re.findall(r"^\| `(tensorpulse_\w+)`", (ROOT / "docs/metrics.md").read_text(), re.M))
    recorded = {
        r["record"]
        for g in yaml.safe_load((PROM / "recording.rules.yml").read_text())["groups"]
        for r in g["rules"]
    }
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        variables = {v["name"] for v in d["templating"]["list"]} | GRAFANA_BUILTINS
        for title, expr in _exprs(d):
            for rec in re.findall(r"\w*:\w+:\w+", expr):
                assert rec in recorded, f"{path.name} {title!r}: {rec} is not a recording rule"
                expr = expr.replace(rec, "")
            for name in re.findall(r"\btensorpulse_\w+", expr):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert base in documented, f"{path.name} {title!r}: unknown metric {name}"
            for var in re.findall(r"\$\{?(\w+)", expr):
                assert var in variables, f"{path.name} {title!r}: unknown variable ${var}"


# ----------------------------------------------------------------------------- Kubernetes
def test_k8s_manifests_parse_and_images_are_pinned() -> None:
    """Every manifest is YAML with apiVersion/kind/name; every container image is pinned."""
    docs = _k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Deployment", "Service"} <= kinds
    for d in docs:
        assert d.get("apiVersion") and d.get("kind"), d
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"]
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            _assert_pinned(c["image"], f"{d['kind']}/{d['metadata']['name']}")
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S if p.name != "kustomization.yaml")


def test_k8s_worker_probes_resources_and_rules() -> None:
    """Workers: probes on the metrics port, requests and limits, the rules ConfigMap = deploy/rules.yaml."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_docs() if d["kind"] != "Kustomization"}
    dep = docs[("Deployment", "tensorpulse-worker")]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["image"] == f"tensorpulse/tensorpulse:{VERSION}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == METRICS_PORT
    assert f"--metrics-port={METRICS_PORT}" in c["args"] and "--metrics-addr=0.0.0.0" in c["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    state = next(m for m in c["volumeMounts"] if m["name"] == "state")
    assert f"--state-dir={state['mountPath']}" in c["args"]

    cm = docs[("ConfigMap", "tensorpulse-rules")]
    assert cm["data"]["rules.yaml"] == (DEPLOY / "rules.yaml").read_text()
    rules_mount = next(m for m in c["volumeMounts"] if m["name"] == "rules")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TENSORPULSE_RULES"] == f"{rules_mount['mountPath']}/rules.yaml"

    svc = docs[("Service", "tensorpulse-worker")]
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(METRICS_PORT)
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
