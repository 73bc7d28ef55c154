"""A worker that is never started, for tests that drive its record paths without a broker.

`process_one` (a job's own records) and `cross_one` (the crossrun stream) take a state store of
the test's choosing; the worker's settings point at an address nothing listens on, so anything
that would reach Kafka fails loudly instead of waiting.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.stream.settings import WorkerSettings
from tensorpulse.stream.worker import Worker


def offline_worker(tmp_path: Path, rules_yaml: str) -> Worker:
    """A never-started worker whose rules file is `rules_yaml`, with its own metrics registry."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_yaml)
    settings = WorkerSettings(bootstrap="127.0.0.1:1", metrics_port=None, state_dir=tmp_path, rules_file=rules)
    return Worker(settings, metrics=WorkerMetrics(CollectorRegistry()))
