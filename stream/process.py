"""The command line that starts a worker as its own process (used by the demo, benchmarks and tests)."""

from __future__ import annotations

import sys
from pathlib import Path


def worker_command(
    bootstrap: str,
    *,
    group: str,
    state_dir: str | Path,
    metrics_port: int = -1,
    rules: str | Path | None = None,
    jobs_regex: str | None = None,
    guarantee: str | None = None,
    log_level: str = "WARNING",
    topic_prefix: str | None = None,
) -> list[str]:
    """argv for `tensorpulse stream` run by this interpreter (so it works inside any venv)."""
    cmd = [
        sys.executable,
        "-m",
        "tensorpulse",
        "stream",
        "--bootstrap",
        bootstrap,
        "--group",
        group,
        "--metrics-port",
        str(metrics_port),
        "--state-dir",
        str(state_dir),
        "--log-level",
        log_level,
    ]
    if rules is not None:
        cmd += ["--rules", str(rules)]
    if jobs_regex is not None:
        cmd += ["--jobs", jobs_regex]
    if guarantee is not None:
        cmd += ["--guarantee", guarantee]
    if topic_prefix is not None:
        cmd += ["--prefix", topic_prefix]
    return cmd
