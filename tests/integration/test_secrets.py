"""No secret reaches a log: the hook, a worker, `tensorpulse alerts` and `tensorpulse notify`, all at
DEBUG, with every Kafka and webhook credential set to one sentinel value.

The broker is plaintext, so librdkafka ignores the SASL and TLS settings (it warns about them,
by name): every client still runs its whole path, and every line it logs is searched.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sentinels import SECRET_ENV, SENTINEL

from tensorpulse.broker import free_port
from tensorpulse.topics import reductions_topic

from .helpers import create_topic, wait_for, worker_process

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "tensorpulse"]


def kafka_config() -> dict[str, str]:
    """SECRET_ENV as the hook's `kafka_config` argument."""
    return {k[len("TENSORPULSE_KAFKA_") :].lower().replace("_", "."): v for k, v in SECRET_ENV.items()}


def test_no_client_logs_a_secret(
    kafka_bootstrap: str, tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env = {**os.environ, **SECRET_ENV, "TP_HOOK_TOKEN": SENTINEL}
    job = f"secrets-{unique}"
    create_topic(kafka_bootstrap, reductions_topic(job))
    logs: dict[str, str] = {}
    with worker_process(
        kafka_bootstrap, tmp_path, group=f"g-{unique}", jobs_regex=f"^{job}$", env=SECRET_ENV,
        extra=["--log-level", "DEBUG"],
    ):  # fmt: skip
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hook = TorchHook(job, kafka_bootstrap, kafka_config=kafka_config()).attach(model, opt)
        for step in range(16):
            x = torch.randn(32, 8)
            if step == 10:
                x[0, 0] = float("nan")  # a fault, so that an alert goes all the way through
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (32,)))
            opt.zero_grad()
            loss.backward()
            hook.step(step, loss=loss)
            opt.step()
        hook.close()

        def alert() -> str | None:
            out = subprocess.run(
                [*CLI, "alerts", "--job", job, "--json", "--bootstrap", kafka_bootstrap],
                capture_output=True, text=True, timeout=60, env=env,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr[-2000:]
            events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
            if any(e["rule"] == "ExplodingTensor" for e in events):
                return out.stdout + out.stderr
            return None

        logs["alerts"] = wait_for(alert, 90, "an ExplodingTensor alert")

    # notify: a receiver with a token in its path and query, and an Authorization header from the
    # environment (a password in the URL as well is refused, as two credentials; the URL's own is
    # tested in tests/unit/test_redact.py); nothing listens, so every attempt fails and logs.
    closed = free_port()
    notify_log = tmp_path / "notify.log"
    with open(notify_log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "notify", "--bootstrap", kafka_bootstrap, "--job", f"^{job}$", "--group", f"n-{unique}",
             "--start", "earliest", "--lookback", "all", "--max-attempts", "2", "--timeout", "1",
             "--webhook", f"http://127.0.0.1:{closed}/hook/{SENTINEL}?token={SENTINEL}",
             "--header", "Authorization: Bearer ${TP_HOOK_TOKEN}", "--log-level", "DEBUG"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for(lambda: "delivery failed" in notify_log.read_text(errors="replace"), 60, "a failed delivery")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    logs["notify"] = notify_log.read_text(errors="replace")
    logs["worker"] = (tmp_path / f"worker-g-{unique}.log").read_text(errors="replace")
    logs["hook"] = caplog.text
    shown = subprocess.run([*CLI, "stream", "--show-config"], capture_output=True, text=True, env=env, timeout=60)
    logs["show-config"] = shown.stdout + shown.stderr

    assert "sasl.oauthbearer.config" in logs["show-config"] and "ExplodingTensor" in logs["alerts"]
    assert "worker starting" in logs["worker"] and "***" in logs["worker"]
    leaked = [name for name, text in logs.items() if SENTINEL in text]
    assert not leaked, {name: logs[name][logs[name].index(SENTINEL) - 300 :][:600] for name in leaked}
