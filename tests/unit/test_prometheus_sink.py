"""The worker's Prometheus metrics: values, the cardinality bound, no step labels, job removal."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from tensorpulse.sinks.prometheus import EXPORTED_STATS, WorkerMetrics
from tensorpulse.wire import StepRecord, TensorStats


def _record(job: str = "j", step: int = 5, k: int = 3) -> StepRecord:
    tensors = tuple(TensorStats(f"t{i}", "weights", 10, 0.5, 1.0, -1.0, 2.0, 0.7, 2) for i in range(k))
    return StepRecord(job, 0, 1, step, "train", 100.0, scalars={"loss": 0.3}, tensors=tensors)


def test_tensor_statistics_and_scalars_are_exported() -> None:
    """The latest record's statistics appear as labelled gauges."""
    m = WorkerMetrics(CollectorRegistry())
    m.observe(_record(), now=100.25)
    r = m.registry
    lab = {"job": "j", "rank": "0", "mode": "train", "collection": "weights", "tensor": "t1"}
    assert r.get_sample_value("tensorpulse_tensor_stat", {**lab, "stat": "mean"}) == 0.5
    assert r.get_sample_value("tensorpulse_tensor_stat", {**lab, "stat": "zero_frac"}) == 0.2
    assert (
        r.get_sample_value("tensorpulse_scalar", {"job": "j", "rank": "0", "mode": "train", "name": "loss"})
        == 0.3
    )
    assert r.get_sample_value("tensorpulse_last_step", {"job": "j", "rank": "0", "mode": "train"}) == 5
    assert r.get_sample_value("tensorpulse_records_total", {"job": "j", "mode": "train"}) == 1
    assert r.get_sample_value("tensorpulse_publish_to_eval_seconds_bucket", {"job": "j", "le": "0.25"}) == 1


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
    assert m.registry.get_sample_value("tensorpulse_tensor_series_over_limit", {"job": "j"}) == 3
    generate_latest(m.registry)  # a second scrape reports the same, not a sum
    assert m.registry.get_sample_value("tensorpulse_tensor_series_over_limit", {"job": "j"}) == 3


def test_finished_job_series_are_removed() -> None:
    """remove_job clears every series of that job and keeps the others."""
    m = WorkerMetrics(CollectorRegistry())
    m.observe(_record("a"), now=100.0)
    m.observe(_record("b"), now=100.0)
    m.alert("a", "VanishingGradient", "warning", "firing", 0)
    m.remove_job("a")
    text = generate_latest(m.registry).decode()
    assert 'job="a"' not in text and 'job="b"' in text
