"""The worker's Prometheus metrics: values, the cardinality bound, no step labels, job removal,
the training job's own label, and event counters that exist at 0 before their first event."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tensorpulse.actions import ACTIONS
from tensorpulse.errors import DECODE_REASONS
from tensorpulse.events import STATUSES
from tensorpulse.rules.config import default_specs, spec_for
from tensorpulse.sinks.prometheus import EXPORTED_STATS, JOB_LABEL, WorkerMetrics
from tensorpulse.wire import StepRecord, TensorStats

ROOT = Path(__file__).resolve().parents[2]


def _record(job: str = "j", step: int = 5, k: int = 3) -> StepRecord:
    tensors = tuple(TensorStats(f"t{i}", "weights", 10, 0.5, 1.0, -1.0, 2.0, 0.7, 2) for i in range(k))
    return StepRecord(job, 0, 1, step, "train", 100.0, scalars={"loss": 0.3}, tensors=tensors)


def test_tensor_statistics_and_scalars_are_exported() -> None:
    """The latest record's statistics appear as labelled gauges."""
    m = WorkerMetrics(CollectorRegistry())
    m.observe(_record(), now=100.25)
    r = m.registry
    lab = {"training_job": "j", "rank": "0", "mode": "train", "collection": "weights", "tensor": "t1"}
    assert r.get_sample_value("tensorpulse_tensor_stat", {**lab, "stat": "mean"}) == 0.5
    assert r.get_sample_value("tensorpulse_tensor_stat", {**lab, "stat": "zero_frac"}) == 0.2
    assert (
        r.get_sample_value(
            "tensorpulse_scalar", {"training_job": "j", "rank": "0", "mode": "train", "name": "loss"}
        )
        == 0.3
    )
    assert (
        r.get_sample_value("tensorpulse_last_step", {"training_job": "j", "rank": "0", "mode": "train"}) == 5
    )
    assert r.get_sample_value("tensorpulse_records_total", {"training_job": "j", "mode": "train"}) == 1
    assert (
        r.get_sample_value("tensorpulse_publish_to_eval_seconds_bucket", {"training_job": "j", "le": "0.25"})
        == 1
    )


def test_no_label_carries_a_step_number() -> None:
    """Steps are values, never labels (each step would be a new series)."""
    m = WorkerMetrics(CollectorRegistry())
    for step in (1, 2, 3):
        m.observe(_record(step=step), now=100.0)
    text = generate_latest(m.registry).decode()
    assert 'step="' not in text
    assert text.count("tensorpulse_tensor_stat{") == 3 * len(EXPORTED_STATS)


def test_tensor_series_are_bounded_per_job() -> None:
    """Beyond the bound, tensors are not exported and the overflow is counted."""
    m = WorkerMetrics(CollectorRegistry(), max_tensors_per_job=2)
    m.observe(_record(k=5), now=100.0)
    text = generate_latest(m.registry).decode()
    assert text.count('stat="mean"') == 2
    assert m.registry.get_sample_value("tensorpulse_tensor_series_over_limit", {"training_job": "j"}) == 3
    generate_latest(m.registry)  # a second scrape reports the same, not a sum
    assert m.registry.get_sample_value("tensorpulse_tensor_series_over_limit", {"training_job": "j"}) == 3


def test_finished_job_series_are_removed() -> None:
    """remove_job clears every series of that job and keeps the others."""
    m = WorkerMetrics(CollectorRegistry())
    m.observe(_record("a"), now=100.0)
    m.observe(_record("b"), now=100.0)
    m.alert("a", "VanishingGradient", "warning", "firing", 0)
    m.remove_job("a")
    text = generate_latest(m.registry).decode()
    assert 'training_job="a"' not in text and 'training_job="b"' in text


def _samples(m: WorkerMetrics) -> list[tuple[str, dict[str, str], float]]:
    text = generate_latest(m.registry).decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def test_the_training_job_is_never_the_label_job() -> None:
    """Every per-job series names the job in `training_job`; no series has a `job` label, which
    is Prometheus's target label (a scrape would rename ours to exported_job)."""
    assert JOB_LABEL == "training_job"
    m = WorkerMetrics(CollectorRegistry(), max_tensors_per_job=1)
    m.init_rules(default_specs())
    m.observe(_record("resnet-42", k=2), now=100.0)
    m.alert("resnet-42", "ExplodingTensor", "critical", "firing", 0)
    m.actions.labels("resnet-42", "stop").inc()
    m.lag.labels("resnet-42").set(3)
    samples = _samples(m)
    assert not [s for s in samples if "job" in s[1]], [s for s in samples if "job" in s[1]][:3]
    per_job = {name for name, labels, _ in samples if labels.get("training_job") == "resnet-42"}
    assert {
        "tensorpulse_tensor_stat",
        "tensorpulse_tensor_series_over_limit",
        "tensorpulse_scalar",
        "tensorpulse_last_step",
        "tensorpulse_records_total",
        "tensorpulse_publish_to_eval_seconds_bucket",
        "tensorpulse_rule_firing",
        "tensorpulse_alerts_total",
        "tensorpulse_actions_total",
        "tensorpulse_consumer_lag",
    } <= per_job


def test_decode_error_and_dead_letter_counters_are_zero_for_every_reason_before_any_record() -> None:
    """A fresh worker's exposition has both counters at 0 for each known reason; one rejection
    moves its own reason only."""
    m = WorkerMetrics(CollectorRegistry())
    r = m.registry
    assert len(DECODE_REASONS) == len(set(DECODE_REASONS)) >= 14
    for reason in DECODE_REASONS:
        assert r.get_sample_value("tensorpulse_decode_errors_total", {"reason": reason}) == 0.0, reason
        assert r.get_sample_value("tensorpulse_deadletter_total", {"reason": reason}) == 0.0, reason
    m.decode_errors.labels("not_msgpack").inc()
    assert r.get_sample_value("tensorpulse_decode_errors_total", {"reason": "not_msgpack"}) == 1.0
    assert r.get_sample_value("tensorpulse_decode_errors_total", {"reason": "too_large"}) == 0.0


def test_rule_counters_are_zero_for_every_configured_rule() -> None:
    """init_rules (the worker calls it with its rules) creates rule errors and state_too_large at 0."""
    m = WorkerMetrics(CollectorRegistry())
    r = m.registry
    raised = {"rule": "ExplodingTensor", "reason": "raised"}
    assert r.get_sample_value("tensorpulse_rule_errors_total", raised) is None
    specs = default_specs()
    m.init_rules(specs)
    assert len(specs) > 10
    for spec in specs:
        for reason in ("raised", "stored_state"):
            labels = {"rule": spec.name, "reason": reason}
            assert r.get_sample_value("tensorpulse_rule_errors_total", labels) == 0.0, labels
        assert r.get_sample_value("tensorpulse_state_too_large_total", {"rule": spec.name}) == 0.0, spec.name


def test_a_jobs_event_counters_appear_at_zero_with_its_first_record_and_go_with_it() -> None:
    """Actions per action and alert transitions per applicable rule and status: 0 from the job's
    first record (not from its first event), removed when the job ends, back with its next record."""
    m = WorkerMetrics(CollectorRegistry())
    r = m.registry
    rules = {s.name: s.rule for s in default_specs()}
    mine = spec_for(rules["ExplodingTensor"], severity="critical", action="stop")
    other = spec_for(rules["DeadRelu"], name="OnlyBert", jobs=re.compile("^bert-"))
    m.init_rules([mine, other])

    def actions(job: str, action: str) -> float | None:
        return r.get_sample_value("tensorpulse_actions_total", {"training_job": job, "action": action})

    def alerts(job: str, rule: str, severity: str, status: str) -> float | None:
        labels = {"training_job": job, "rule": rule, "severity": severity, "status": status}
        return r.get_sample_value("tensorpulse_alerts_total", labels)

    assert actions("j", "stop") is None  # no series for a job not seen yet
    m.observe(_record("j"), now=100.0)
    for action in ACTIONS:
        assert actions("j", action) == 0.0, action
    for status in STATUSES:
        assert alerts("j", "ExplodingTensor", "critical", status) == 0.0, status
    assert alerts("j", "OnlyBert", "warning", "firing") is None  # the rule does not run for j

    m.observe(_record("j", step=6), now=100.0)  # a later record leaves the counts alone
    m.alert("j", "ExplodingTensor", "critical", "firing", 0)
    m.actions.labels("j", "stop").inc()
    assert alerts("j", "ExplodingTensor", "critical", "firing") == 1.0
    assert alerts("j", "ExplodingTensor", "critical", "resolved") == 0.0
    assert actions("j", "stop") == 1.0 and actions("j", "checkpoint") == 0.0

    m.remove_job("j")
    assert actions("j", "stop") is None and actions("j", "checkpoint") is None
    assert alerts("j", "ExplodingTensor", "critical", "resolved") is None
    m.observe(_record("j", step=7), now=100.0)  # the same id again: a new run, from 0
    assert actions("j", "stop") == 0.0
    records = r.get_sample_value("tensorpulse_records_total", {"training_job": "j", "mode": _record("j").mode})
    latencies = r.get_sample_value("tensorpulse_publish_to_eval_seconds_count", {"training_job": "j"})
    assert (records, latencies) == (1.0, 1.0)  # counted in new series, not in the removed ones


def _reasons_in(path: Path) -> set[str]:
    """Literal reasons in a module: DecodeError("r", ...), [_]count_reject("r"), _on_reject("r"), reason="r"."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        args = node.args[:1] if name in ("DecodeError", "_count_reject", "count_reject", "_on_reject") else []
        args += [k.value for k in node.keywords if k.arg == "reason"]
        found |= {a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return found


def test_every_reason_a_worker_counts_is_in_the_one_list() -> None:
    """The reasons raised by the record decoder, the worker and its intake are all in
    DECODE_REASONS (a new one without an entry would have no series until it happens), and the
    wire-format doc names each."""
    sources = [ROOT / "tensorpulse" / f for f in ("wire.py", "wire_checks.py", "wire_extensions.py")]
    sources += sorted((ROOT / "stream").glob("*.py"))  # the worker, its intake and their helpers
    raised = set().union(*map(_reasons_in, sources))
    assert {"not_msgpack", "too_large", "wrong_key", "bad_tick", "processing_error"} <= raised
    assert raised <= set(DECODE_REASONS), raised - set(DECODE_REASONS)
    doc = (ROOT / "docs/wire-format.md").read_text()
    assert [r for r in DECODE_REASONS if f"`{r}`" not in doc] == []
