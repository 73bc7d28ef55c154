"""The worker's /metrics endpoint against hostile requests (docs/security.md, threat model).

Whoever reaches the port can send anything; the endpoint must keep answering the scraper, read
nothing but the request, and never serve anything but the metrics. The server is the worker's
own (`WorkerMetrics.serve`, prometheus_client's threaded WSGI server) on a free loopback port.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.error
import urllib.request

import pytest

from tensorpulse.sinks.prometheus import WorkerMetrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint() -> str:
    metrics = WorkerMetrics()
    port = _free_port()
    metrics.serve(port)
    return f"127.0.0.1:{port}"


def _get(endpoint: str, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{endpoint}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", errors="replace")


def _raw(endpoint: str, payload: bytes) -> bytes:
    """Send `payload` on a fresh connection; what came back before the server closed it (or b'')."""
    host, port = endpoint.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        with contextlib.suppress(OSError):
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                got += chunk
        return got


HOSTILE = {
    "garbage request line": b"\x00\xff\xfe junk \r\n\r\n",
    "request line of 200 KB": b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n",
    "10,000 headers": b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(10_000)) + b"\r\n",
    "POST with a body": b"POST /metrics HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello=world",
    "a body longer than it says": b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\n" + b"z" * 100_000,
    "HTTP/0.9": b"GET /metrics\r\n",
    "a half-sent request": b"GET /met",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_request_leaves_the_endpoint_answering(endpoint: str, case: str) -> None:
    """Each request gets an HTTP answer, a closed connection, or, for a request line without a
    version (HTTP/0.9, which has no status line or headers), the bare body: a 400 page or the
    metrics themselves. The next scrape is served as usual."""
    answer = _raw(endpoint, HOSTILE[case])
    bare = b"Error code: 400" in answer or answer.startswith(b"# HELP tensorpulse_")
    assert answer == b"" or answer.startswith(b"HTTP/") or bare, answer[:300]
    status, body = _get(endpoint)
    assert status == 200 and "tensorpulse_records_total" in body


def test_a_silent_connection_does_not_hold_up_the_scraper(endpoint: str) -> None:
    """A client that connects and says nothing (slowloris) keeps one thread busy, not the server."""
    host, port = endpoint.split(":")
    with socket.create_connection((host, int(port)), timeout=10):
        status, body = _get(endpoint)
    assert status == 200 and "tensorpulse_records_total" in body


@pytest.mark.parametrize("path", ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/hostname", "/metrics?name[]=x"])
def test_no_path_serves_anything_but_metrics(endpoint: str, path: str) -> None:
    """Paths are not files: whatever the path, the body is the metrics exposition (or nothing)."""
    status, body = _get(endpoint, path)
    assert status == 200
    assert "root:" not in body and socket.gethostname() not in body
    assert all(line.startswith("#") or line.startswith("tensorpulse_") or line.startswith("python_")
               or line.startswith("process_") or not line for line in body.splitlines())
