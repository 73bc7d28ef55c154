"""Settings enter at the edge: argument > TENSORPULSE_* environment > settings file > default,
for the hook and the worker; every variable named in one place; `--show-config` and
`tensorpulse hook-config` say where each value came from and print no secret."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tensorpulse.cli import main
from tensorpulse.errors import ConfigError
from tensorpulse.producers.hook import Hook
from tensorpulse.producers.settings import HookSettings
from tensorpulse.redact import MASK
from tensorpulse.settings import ENV_PREFIX, env_names
from tensorpulse.stream.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-sentinel"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TENSORPULSE_* (or torchrun's RANK/WORLD_SIZE) from the shell that runs the tests."""
    for name in list(env_names()) + ["TENSORPULSE_CONFIG", "TENSORPULSE_WORKER_CONFIG"]:
        monkeypatch.delenv(name, raising=False)


def test_hook_precedence_argument_env_file_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each hook setting takes the first of: argument, environment variable, settings file, default."""
    path = tmp_path / "hook.yaml"
    path.write_text("job: from-file\nbootstrap: file:9092\nsave_interval: 7\nquantile_steps: 3\n")
    monkeypatch.setenv("TENSORPULSE_CONFIG", str(path))
    monkeypatch.setenv("TENSORPULSE_BOOTSTRAP", "env:9092")
    monkeypatch.setenv("TENSORPULSE_SAVE_INTERVAL", "5")
    s = HookSettings.resolve(save_interval=2)
    assert (s.job, s.bootstrap, s.save_interval, s.quantile_steps, s.delta_every) == (
        "from-file",
        "env:9092",
        2,
        3,
        10,
    )
    assert s.origins["save_interval"] == "argument save_interval"
    assert s.origins["bootstrap"] == "environment variable TENSORPULSE_BOOTSTRAP"
    assert s.origins["job"] == f"settings file {path}"
    assert s.origins["delta_every"] == "default"


def test_hook_settings_file_in_toml(tmp_path: Path) -> None:
    """A `.toml` settings file is read as TOML, with the same keys."""
    path = tmp_path / "hook.toml"
    path.write_text('job = "toml-job"\nenabled = false\n')
    s = HookSettings.resolve(path)
    assert s.job == "toml-job" and s.enabled is False


def test_torch_hook_follows_the_environment_when_no_argument_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TENSORPULSE_JOB, TENSORPULSE_SAVE_INTERVAL and TENSORPULSE_ENABLED=0 reach TorchHook(); arguments win."""
    from tensorpulse.producers.torch import TorchHook

    monkeypatch.setenv("TENSORPULSE_JOB", "env-job")
    monkeypatch.setenv("TENSORPULSE_SAVE_INTERVAL", "4")
    monkeypatch.setenv("TENSORPULSE_ENABLED", "0")
    hook = TorchHook()
    assert (hook.job, hook.save_config.save_interval, hook.enabled) == ("env-job", 4, False)
    assert not hook.should_save(0)
    hook = TorchHook("arg-job", save_interval=3, enabled=False)
    assert (hook.job, hook.save_config.save_interval) == ("arg-job", 3)


def test_hook_without_a_job_says_how_to_give_one() -> None:
    """No job argument, variable or file: the error names all three ways."""
    with pytest.raises(ConfigError, match="TENSORPULSE_JOB"):
        Hook(enabled=False)


@pytest.mark.parametrize(
    ("env", "args", "pattern"),
    [
        (
            {"TENSORPULSE_SAVE_INTERVAL": "often"},
            {},
            r"save_interval: .*valid integer.*'often', from environment variable TENSORPULSE_SAVE_INTERVAL",
        ),
        ({}, {"save_interval": 0}, r"save_interval: .*greater than or equal to 1 .*from argument save_interval"),
        ({}, {"save_interval": True}, r"save_interval: .*not a boolean"),
        ({"TENSORPULSE_DELTA_METHOD": "full"}, {}, r"delta_method: .*'sketch' or 'exact'"),
        ({"RANK": "x"}, {}, r"rank: .*from environment variable RANK"),
    ],
)
def test_a_bad_value_names_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: dict[str, object], pattern: str
) -> None:
    """A value that does not fit its type is a ConfigError naming the setting, the value and its source."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=pattern):
        Hook("j", enabled=False, **args)  # type: ignore[arg-type]


def test_worker_precedence_flag_env_file_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker setting takes the first of: flag, environment variable, settings file, default."""
    path = tmp_path / "worker.toml"
    path.write_text('group = "from-file"\nmetrics_port = 9000\nmax_jobs = 5\n[kafka_config]\n"client.id" = "w1"\n')
    monkeypatch.setenv("TENSORPULSE_WORKER_CONFIG", str(path))
    monkeypatch.setenv("TENSORPULSE_GROUP", "from-env")
    monkeypatch.setenv("TENSORPULSE_MAX_JOBS", "6")
    s = WorkerSettings.resolve(max_jobs=7, metrics_port=None)
    assert (s.max_jobs, s.group, s.metrics_port, s.partitions) == (7, "from-env", 9000, 12)
    assert s.kafka_config == {"client.id": "w1"}
    assert s.origins["max_jobs"] == "argument max_jobs"
    assert s.origins["group"] == "environment variable TENSORPULSE_GROUP"
    assert s.origins["metrics_port"] == f"settings file {path}"
    assert s.origins["partitions"] == "default"


def test_worker_reads_no_settings_file_of_the_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$TENSORPULSE_CONFIG is the hook's file: a worker started in the same shell does not read it."""
    path = tmp_path / "hook.yaml"
    path.write_text("job: j\n")
    monkeypatch.setenv("TENSORPULSE_CONFIG", str(path))
    assert WorkerSettings.resolve().group == "tensorpulse-workers"


def test_a_missing_settings_file_is_an_error(tmp_path: Path) -> None:
    """A named settings file that does not exist is not silently skipped."""
    with pytest.raises(ConfigError, match=r"no such worker settings file"):
        WorkerSettings.resolve(tmp_path / "nope.yaml")


def test_state_goes_under_the_users_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's state defaults to $XDG_STATE_HOME/tensorpulse, else ~/.local/state/tensorpulse."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert WorkerSettings.resolve().state_dir == tmp_path / "home" / ".local" / "state" / "tensorpulse"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    s = WorkerSettings.resolve()
    assert s.state_dir == tmp_path / "xdg" / "tensorpulse" and s.origins["state_dir"] == "default"
    monkeypatch.setenv("TENSORPULSE_STATE_DIR", str(tmp_path / "mine"))
    assert WorkerSettings.resolve().state_dir == tmp_path / "mine"


def test_show_config_says_where_and_hides_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`stream --show-config` and `hook-config` comment each value with its source; secrets are ***."""
    monkeypatch.setenv("TENSORPULSE_BOOTSTRAP", f"SASL_SSL://tp:{SECRET}@kafka:9093")
    monkeypatch.setenv("TENSORPULSE_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("TENSORPULSE_JOB", "env-job")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    runner = CliRunner()
    worker = runner.invoke(main, ["stream", "--show-config", "--group", "g1"])
    hook = runner.invoke(main, ["hook-config"])
    for result in (worker, hook):
        assert result.exit_code == 0, result.output
        assert SECRET not in result.output
        shown = yaml.safe_load(result.stdout)
        assert shown["bootstrap"] == f"SASL_SSL://tp:{MASK}@kafka:9093"
        assert shown["kafka"]["sasl.password"] == MASK
        assert re.search(r"^bootstrap: .*  # environment variable TENSORPULSE_BOOTSTRAP$", result.stdout, re.M)
    assert re.search(r"^group: g1  # argument group$", worker.stdout, re.M)
    assert re.search(rf"^state_dir: {re.escape(str(tmp_path))}/tensorpulse  # default$", worker.stdout, re.M)
    assert re.search(r"^job: env-job  # environment variable TENSORPULSE_JOB$", hook.stdout, re.M)


def test_env_names_are_listed_once_and_documented() -> None:
    """env_names() holds every TENSORPULSE_* variable the package names, and docs/configuration.md
    lists every one of them."""
    names = env_names()
    for expected in ("TENSORPULSE_BOOTSTRAP", "TENSORPULSE_JOB", "TENSORPULSE_SAVE_INTERVAL", "TENSORPULSE_ENABLED"):
        assert expected in names
    assert "hook bootstrap" in names["TENSORPULSE_BOOTSTRAP"] and "worker bootstrap" in names["TENSORPULSE_BOOTSTRAP"]
    families = [n.split("<")[0] for n in names if "<" in n]
    used: set[str] = set()
    for package in ("tensorpulse", "producers", "stream", "sinks", "rules"):
        for path in (ROOT / package).glob("*.py"):
            used |= set(re.findall(r"\bTENSORPULSE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    unknown = sorted(
        n for n in used if n not in names and not any(n.startswith(f) for f in families) and n != ENV_PREFIX
    )
    assert unknown == [], f"variables named in the code but not in tensorpulse.settings: {unknown}"
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert [n for n in names if f"`{n}`" not in doc] == []
