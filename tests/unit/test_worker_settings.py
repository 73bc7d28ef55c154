"""Worker settings come from flags, then the environment, then a settings file, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.stream.settings import WorkerSettings


def test_precedence_flags_env_file_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("group: from-file\nmetrics_port: 9000\nstate_dir: /var/lib/tp\nreplication_factor: 3\n")
    monkeypatch.setenv("TENSORPULSE_GROUP", "from-env")
    monkeypatch.delenv("TENSORPULSE_METRICS_PORT", raising=False)
    s = WorkerSettings.from_env(config_file=path, metrics_port=None, state_dir=Path("/flag"))
    assert s.group == "from-env"  # environment beats the file
    assert s.metrics_port == 9000  # the file beats the default
    assert s.state_dir == Path("/flag")  # a flag beats everything
    assert s.replication_factor == 3 and s.guarantee == "exactly-once"


def test_unknown_setting_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("grup: x\n")
    with pytest.raises(ConfigError, match=r"worker.yaml: unknown worker setting\(s\) grup"):
        WorkerSettings.from_env(config_file=path)


def test_transactional_id_is_stable_per_worker(tmp_path: Path) -> None:
    a = WorkerSettings(group="g", state_dir=tmp_path / "a")
    assert a.transactional_id() == WorkerSettings(group="g", state_dir=tmp_path / "a").transactional_id()
    assert a.transactional_id() != WorkerSettings(group="g", state_dir=tmp_path / "b").transactional_id()
    assert WorkerSettings(group="g", worker_id="pod-0").transactional_id() == "tensorpulse-g-pod-0"
