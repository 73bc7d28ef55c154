"""Drawing `tensorpulse top`: the jobs table and a job's sparklines with rich, keys from the terminal.

Only draws what `TopState` (tensorpulse/top.py) computes. The live view is a rich `Live` on the
terminal's alternate screen, redrawn every `refresh` seconds and at each key; it needs nothing
but a terminal that understands ANSI escapes, so it works over SSH. Keys are read in cbreak mode
(no echo, no Enter; Ctrl-C still interrupts) where stdin is a terminal, and not at all elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .errors import TensorpulseError
from .top import ENDED, LIVE, SILENT, Firing, JobRow, Series, TopState, sparkline
from .top_feed import TopFeed, scrape_lag

_STATE_STYLE = {LIVE: "green", SILENT: "yellow", ENDED: "dim"}
_SEVERITY_STYLE = {"critical": "bold red", "error": "red", "warning": "yellow"}
KEYS_HELP = "↑/↓ or k/j: select a job   q: quit"


def format_age(seconds: float | None) -> str:
    """0.4s, 12s, 3m05s, 2h10m: short enough for a column, precise where it matters (the first seconds)."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"


def format_firing(firing: Sequence[Firing]) -> Text:
    """Rule names, the most severe first, each with its ranks when it fires on ranks other than 0."""
    text = Text()
    for i, f in enumerate(firing):
        if i:
            text.append(" ")
        ranks = "" if f.ranks == (0,) else "[r" + ",".join(map(str, f.ranks)) + "]"
        text.append(f.rule + ranks, style=_SEVERITY_STYLE.get(f.severity, ""))
    return text if firing else Text("-", style="dim")


def format_value(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def jobs_table(rows: Sequence[JobRow], selected: str | None = None) -> Table:
    """The jobs table; `selected` is shown reversed (the job whose series are drawn below it)."""
    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for name, justify in (
        ("JOB", "left"),
        ("STATE", "left"),
        ("STEP", "right"),
        ("STEPS/S", "right"),
        ("RANKS", "right"),
        ("AGE", "right"),
        ("LAG", "right"),
        ("FIRING", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "FIRING")
    for row in rows:
        step = "-" if row.step is None else str(row.step)
        if row.mode not in (None, "train"):
            step += f" {row.mode}"
        ranks = f"{row.ranks}/{row.world}" if row.world is not None else str(row.ranks)
        table.add_row(
            row.job,
            Text(row.state, style=_STATE_STYLE.get(row.state, "")),
            step,
            format_rate(row.steps_per_s),
            ranks,
            format_age(row.age_s),
            "-" if row.lag is None else str(row.lag),
            format_firing(row.firing),
            style="reverse" if row.job == selected else None,
        )
    return table


def series_table(job: str, series: Sequence[Series], *, limit: int | None = None) -> Table:
    """A job's series as sparklines, one per line (`limit` lines at most, then a count of the rest)."""
    steps = [s for ser in series for s in (ser.steps[0], ser.steps[-1])]
    span = f"steps {min(steps)}-{max(steps)}" if steps else "no step yet"
    table = Table(title=f"{job}: {span}", title_justify="left", box=None, header_style="bold", pad_edge=False)
    for name, justify in (("SERIES", "left"), ("", "left"), ("LAST", "right"), ("MIN", "right"), ("MAX", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    shown = series if limit is None else series[: max(limit, 0)]
    for ser in shown:
        line, log = sparkline(ser.values)
        finite = [v for v in ser.values if math.isfinite(v)]
        table.add_row(
            ser.name if len(ser.name) <= 48 else "…" + ser.name[-47:],
            Text(line + (" log" if log else ""), style="cyan"),
            format_value(ser.last),
            format_value(min(finite)) if finite else "-",
            format_value(max(finite)) if finite else "-",
        )
    if len(shown) < len(series):
        table.add_row(Text(f"… {len(series) - len(shown)} more (a taller terminal shows them)", style="dim"))
    if not series:
        table.add_row(Text("no scalar or gradient recorded yet", style="dim"))
    return table


def screen(
    state: TopState,
    now: float,
    *,
    selected: str | None,
    header: str,
    notes: Sequence[str] = (),
    height: int | None = None,
) -> RenderableType:
    """Everything one frame shows: a header, the jobs table, the selected job's sparklines, notes."""
    rows = state.rows(now)
    live = sum(r.state == LIVE for r in rows)
    parts: list[RenderableType] = [
        Text(f"{header}   {len(rows)} job(s), {live} live   {time.strftime('%H:%M:%S', time.localtime(now))}",
             style="bold"),
        jobs_table(rows, selected) if rows else Text("no job has published in the time shown", style="dim"),
        Text(""),
    ]
    if selected is not None:
        room = None if height is None else height - len(rows) - len(notes) - 8
        parts.append(series_table(selected, state.series(selected), limit=room))
    parts += [Text(n, style="dim") for n in notes]
    return Group(*parts)


class Keys:
    """Single key presses from stdin in cbreak mode, restored on exit; none when stdin is no terminal."""

    _NAMES = {"\x1b[A": "up", "\x1b[B": "down", "k": "up", "j": "down", "q": "quit", "Q": "quit"}

    def __init__(self) -> None:
        self._fd: int | None = None
        self._saved: Any = None

    def __enter__(self) -> Keys:
        if sys.stdin.isatty():
            import termios
            import tty

            self._fd = sys.stdin.fileno()
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def read(self) -> list[str]:
        """The keys pressed since the last call (names of _NAMES; others are ignored), without waiting."""
        if self._fd is None or not select.select([self._fd], [], [], 0)[0]:
            return []
        data = os.read(self._fd, 64).decode(errors="ignore")
        out, i = [], 0
        while i < len(data):
            seq = data[i : i + 3] if data[i] == "\x1b" else data[i]
            if seq in self._NAMES:
                out.append(self._NAMES[seq])
            i += len(seq)
        return out


class LagPoller:
    """Scrapes the workers' /metrics every `interval` seconds on a thread of its own, so a slow or
    dead URL never holds up the screen; `latest()` is the last answer."""

    def __init__(self, urls: Sequence[str], interval: float = 2.0) -> None:
        self.urls = list(urls)
        self.interval = interval
        self._lock = threading.Lock()
        self._result: tuple[dict[str, int], list[str]] = ({}, [])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tensorpulse-top-lag", daemon=True)

    def start(self) -> LagPoller:
        if self.urls:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            result = scrape_lag(self.urls)
            with self._lock:
                self._result = result
            self._stop.wait(self.interval)

    def latest(self) -> tuple[dict[str, int], list[str]]:
        with self._lock:
            return self._result

    def stop(self) -> None:
        self._stop.set()


class ScreenLog(logging.Handler):
    """Log records (warnings and up) while the screen is up, kept to be shown under the table: a
    line written to the terminal would tear the frame (librdkafka's connection warnings come
    through the `tensorpulse.kafka` logger)."""

    def __init__(self, keep: int = 3) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        self.lines.append(f"{when} {record.levelname.lower()}: {record.getMessage()}"[:300])


@contextlib.contextmanager
def _logs_on_screen(handler: ScreenLog) -> Iterator[None]:
    """tensorpulse's loggers write to `handler` instead of the terminal, for the duration."""
    logger = logging.getLogger("tensorpulse")
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def run_live(
    feed: TopFeed,
    lag: LagPoller,
    *,
    refresh: float = 0.5,
    header: str,
    notes: Callable[[], list[str]],
    console: Console | None = None,
) -> None:
    """The live view until q or Ctrl-C: discover new jobs every second, fold records as they
    come, redraw every `refresh` seconds and at each key. Kafka being out of reach is said under
    the table, and tried again every second."""
    console = console or Console()
    selected: str | None = None
    next_discover = next_draw = 0.0
    unreachable: list[str] = []
    logs = ScreenLog()
    with Keys() as keys, _logs_on_screen(logs), Live(console=console, screen=True, auto_refresh=False) as live:
        live.update(Text(f"{header}   connecting to {feed.bootstrap} ..."), refresh=True)
        while True:
            if time.monotonic() >= next_discover:
                try:
                    feed.discover(timeout=2.0)
                    unreachable = []
                except TensorpulseError as exc:
                    unreachable = [f"{exc}; trying again"]
                next_discover = time.monotonic() + 1.0
            feed.poll(timeout=0.05)
            pressed = keys.read()
            if "quit" in pressed:
                return
            jobs = [r.job for r in feed.state.rows(time.time())]
            for key in pressed:
                if jobs:
                    i = jobs.index(selected) if selected in jobs else -1
                    i = max(i - 1, 0) if key == "up" else min(i + 1, len(jobs) - 1)
                    selected = jobs[i]
            if selected not in jobs:
                selected = jobs[0] if jobs else None
            if pressed or time.monotonic() >= next_draw:
                lags, problems = lag.latest()
                feed.state.set_lag(lags)
                frame = screen(
                    feed.state,
                    time.time(),
                    selected=selected,
                    header=header,
                    notes=[KEYS_HELP, *unreachable, *problems, *notes(), *logs.lines],
                    height=console.size.height,
                )
                live.update(frame, refresh=True)
                next_draw = time.monotonic() + refresh


def read_to_end(feed: TopFeed, *, timeout: float) -> bool:
    """Discover the jobs and read every assigned partition to the end it had; False when that took
    longer than `timeout` seconds (what was read is shown all the same)."""
    deadline = time.monotonic() + timeout
    feed.discover()
    while not feed.caught_up and time.monotonic() < deadline:
        feed.poll(timeout=0.2)
    return feed.caught_up


def print_snapshot(
    feed: TopFeed,
    *,
    metrics_urls: Sequence[str],
    header: str,
    notes: Callable[[], list[str]],
    as_json: bool = False,
    layers: bool = False,
    timeout: float = 30.0,
    console: Console | None = None,
) -> bool:
    """`--once`: read to the end, scrape the lag once, print the table (and with `layers` every
    job's sparklines) or one JSON document on stdout, notes on stderr; returns whether the read
    reached the end."""
    complete = read_to_end(feed, timeout=timeout)
    lags, problems = scrape_lag(metrics_urls)
    feed.state.set_lag(lags)
    now = time.time()
    rows = feed.state.rows(now)
    said = [*problems, *notes()]
    if not complete:
        said.append(f"not every topic was read to its end within {timeout:g}s: the figures may lag behind")
    if as_json:
        import json

        doc: dict[str, Any] = {"time": now, "complete": complete, "jobs": [r.to_dict() for r in rows],
                               "notes": said}
        if layers:
            doc["series"] = {r.job: [s.to_dict() for s in feed.state.series(r.job)] for r in rows}
        print(json.dumps(doc))
        return complete
    # Not a terminal (a pipe, a file): wide enough that no column is cut.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    console.print(screen(feed.state, now, selected=None, header=header))
    if layers:
        for row in rows:
            console.print(series_table(row.job, feed.state.series(row.job)))
            console.print("")
    for note in said:  # what the command says about itself goes to stderr, as every command's does
        print(note, file=sys.stderr)
    return complete
