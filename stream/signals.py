"""SIGTERM and SIGINT stop a worker, whoever holds the signal handlers at the time.

Quix Streams installs handlers that stop the running application while `app.run()` runs, and they
stay installed after it returns: a signal during a restart's backoff would be lost, and with the
broker away a signal reached only the application, which the worker then restarted. So the
worker keeps its own handlers installed between application runs, and a wake-up fd
(`signal.set_wakeup_fd`: Python writes each signal's number to it whoever handles the signal)
wakes a thread that stops the worker, and exits the process if the stop has not finished after
SHUTDOWN_S seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("tensorpulse.stream")

#: Seconds from SIGTERM/SIGINT to the worker's exit at the latest. A stop normally takes well under
#: a second (the application commits its last checkpoint); with the broker away that commit cannot
#: finish (Quix Streams waits for it without a bound), and the worker then exits without it, as
#: after a crash: the next worker resumes from the last committed transaction, nothing is lost.
SHUTDOWN_S = 9.0


class StopSignals:
    """Calls `stop()` on SIGTERM/SIGINT; exits the process SHUTDOWN_S later unless `stopped` is set."""

    def __init__(self, stop: Callable[[], None], stopping: threading.Event, stopped: threading.Event) -> None:
        self._stop = stop
        self._stopping = stopping  # set at once on a signal (what the worker's loops wait on)
        self._stopped = stopped  # set by the worker once it has stopped
        self._signals: socket.socket | None = None  # read end of the wake-up pipe
        self._wake: socket.socket | None = None  # its write end, kept open for the process's life

    def install(self) -> None:
        """(Re)install the handlers; call again after every application run (Quix replaced them)."""
        if threading.current_thread() is not threading.main_thread():
            return  # embedded in another program's thread: its owner calls stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop())
        if self._signals is None:
            self._signals, wake = socket.socketpair()
            wake.setblocking(False)
            signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
            self._wake = wake
            threading.Thread(target=self._watch, name="tensorpulse-signals", daemon=True).start()

    def _watch(self) -> None:
        assert self._signals is not None
        wanted = {int(signal.SIGTERM), int(signal.SIGINT)}
        while not wanted.intersection(self._signals.recv(64)):
            pass
        self._stopping.set()
        if self._stopped.wait(SHUTDOWN_S):
            return
        log.error(
            "the worker did not stop within %.0f s of the signal (the broker is away, so the last "
            "checkpoint cannot be committed); exiting without it: the next worker resumes from the "
            "last committed one",
            SHUTDOWN_S,
        )
        logging.shutdown()
        os._exit(0)
