"""Every client over TLS: the hook, a worker process and the alerts CLI against a TLS-only broker.

The broker's listener only speaks TLS (Tansu behind tensorpulse's TLS relay); the clients get
their TLS settings only through TENSORPULSE_KAFKA_* environment variables or `kafka_config`,
as an operator would pass them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tensorpulse.broker import EmbeddedBroker
from tensorpulse.topics import reductions_topic

from .helpers import create_topic_with, wait_for, worker_process

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-never-logged"


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_hook_worker_and_cli_over_tls(tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = _self_signed(tmp_path)
    tls = {"security.protocol": "SSL", "ssl.ca.location": str(cert)}
    with EmbeddedBroker(cert=cert, key=key, log_path=tmp_path / "broker.log") as broker:
        bootstrap = broker.bootstrap
        # Plaintext is refused: the listener really is TLS-only.
        with pytest.raises(Exception, match="(?i)transport|timed out|disconnect"):
            AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=3)

        monkeypatch.setenv("TENSORPULSE_KAFKA_SECURITY_PROTOCOL", "SSL")
        monkeypatch.setenv("TENSORPULSE_KAFKA_SSL_CA_LOCATION", str(cert))
        # A credential-looking setting must never reach a log line (librdkafka ignores it with SSL).
        monkeypatch.setenv("TENSORPULSE_KAFKA_SSL_KEY_PASSWORD", SECRET)

        job = f"tls-{unique}"
        create_topic_with(bootstrap, reductions_topic(job), tls)
        with worker_process(bootstrap, tmp_path, group=f"g-{unique}", jobs_regex=f"^{job}$"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            hook = TorchHook(job, bootstrap).attach(model, opt)  # TLS from the environment
            for step in range(20):
                x = torch.randn(32, 8)
                if step == 12:
                    x[0, 0] = float("nan")  # the fault ExplodingTensor is for
                loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (32,)))
                opt.zero_grad()
                loss.backward()
                hook.step(step, loss=loss)
                opt.step()
            hook.close()
            stats = hook.stats()
            assert stats["dropped"] == 0 and stats["sent"] >= 20 and stats["errors"] == 0, stats

            def exploding() -> list[dict] | None:
                out = subprocess.run(
                    [sys.executable, "-m", "tensorpulse", "alerts", "--job", job, "--json",
                     "--bootstrap", bootstrap],
                    capture_output=True, text=True, timeout=60, env=dict(os.environ),
                )  # fmt: skip
                assert out.returncode == 0, out.stderr[-2000:]
                events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
                hits = [e for e in events if e["rule"] == "ExplodingTensor" and e["status"] == "firing"]
                return hits or None

            hits = wait_for(exploding, 90, "an ExplodingTensor alert read over TLS", interval=1.0)
            assert hits[0]["step"] == 12
        log_text = (tmp_path / f"worker-g-{unique}.log").read_text(errors="replace")
        assert SECRET not in log_text
        assert "ssl" in log_text.lower() or "SSL" in log_text  # the redacted config is logged at start
