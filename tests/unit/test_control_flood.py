"""A flood on the control topic: a few log lines per interval, repeated actions coalesced, the listener's
CPU paced to its share, and a genuine stop still honoured (no broker: messages handed in directly)."""

from __future__ import annotations

import logging
import statistics

import pytest

from tensorpulse.actions import encode_action
from tensorpulse.producers.control import (
    ACTION_INTERVAL_S,
    FLOOD_LOG_INTERVAL_S,
    ControlListener,
    WorkBudget,
)

UNREACHABLE = "127.0.0.1:1"
START = 1000.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def listener(clock: Clock) -> ControlListener:
    return ControlListener("job-a", bootstrap=UNREACHABLE, start_ts=START, clock=clock)


JUNK = [
    b"[" * 60_000,
    b"{not json",
    b'{"action":"stop","job":"job-a","ts":' + b"9" * 400 + b"}",
    b'{"action":["stop"],"job":"job-a","ts":1}',
    b"\xff\xfe",
]


def test_a_flood_of_malformed_messages_logs_two_lines_and_a_stop_after_it_is_honoured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """20,000 malformed messages: one line for the first, one summary with the count; then a stop works."""
    caplog.set_level(logging.INFO, logger="tensorpulse.producers")
    clock = Clock()
    ctl = listener(clock)
    got: list[dict] = []
    ctl.on_action(got.append)
    for i in range(20_000):
        assert ctl.handle(JUNK[i % len(JUNK)]) is None
        clock.now += 0.0001  # 20,000 messages in 2 s: all within one interval
    assert len(caplog.records) == 1 and "ignoring a malformed control message" in caplog.text
    clock.now += FLOOD_LOG_INTERVAL_S
    assert ctl.handle(encode_action("stop", "job-a", ts=START + 1, rule="R")) is not None
    assert ctl.stop_requested.is_set() and [a["action"] for a in got] == ["stop"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "19999 more message(s) ignored" in lines[1] and "malformed (not_json)" in lines[1]
    assert "stop requested for job job-a" in lines[2]
    assert ctl.counts["malformed"] == 20_000 and ctl.counts["accepted"] == 1


def test_a_stop_inside_a_flood_of_valid_actions_is_honoured_and_callbacks_run_once() -> None:
    """Thousands of checkpoints and stops (valid, for this job): one callback per kind per interval."""
    clock = Clock()
    ctl = listener(clock)
    got: list[str] = []
    ctl.on_action(lambda a: got.append(a["action"]))
    for i in range(5_000):
        ctl.handle(encode_action("checkpoint", "job-a", ts=START + 1))
        if i == 2_500:
            ctl.handle(encode_action("stop", "job-a", ts=START + 1))
        ctl.handle(encode_action("stop", "job-b", ts=START + 1))  # another job's: ignored
        ctl.handle(encode_action("stop", "job-a", ts=START - 60))  # an earlier run's: ignored
    assert ctl.stop_requested.is_set()
    assert got == ["checkpoint", "stop"]
    assert ctl.counts["coalesced"] == 4_999 and ctl.counts["other_job"] == ctl.counts["stale"] == 5_000
    clock.now += ACTION_INTERVAL_S
    ctl.handle(encode_action("checkpoint", "job-a", ts=START + 2))
    assert got == ["checkpoint", "stop", "checkpoint"]


def test_work_budget_holds_the_share_over_a_long_flood() -> None:
    """Paced work of 1 ms pieces uses at most `share` of the wall clock, plus one burst."""
    share, burst = 0.02, 0.05
    budget = WorkBudget(share, burst, now=0.0)
    now, cpu = 0.0, 0.0
    for _ in range(10_000):
        now += 0.001  # the work itself
        cpu += 0.001
        now += budget.spend(0.001, now)
    assert cpu <= share * now + burst
    assert cpu >= share * now * 0.95  # and it does not wait more than it must


@pytest.mark.parametrize("resume", [0.0, 0.01])
def test_work_budget_holds_the_share_whatever_its_resume_level(resume: float) -> None:
    """Pieces of 1 ms: the share holds with or without a resume level."""
    budget = WorkBudget(0.02, 0.05, now=0.0, resume_s=resume)
    now = cpu = 0.0
    for _ in range(5_000):
        now += 0.001
        cpu += 0.001
        now += budget.spend(0.001, now)
    assert 0.02 * now * 0.95 <= cpu <= 0.02 * now + 0.05


def test_work_budget_resumes_in_pieces_of_its_resume_level() -> None:
    """Once dry, the bucket waits until it owes `resume_s` again: with 0.1 ms pieces and a 10 ms
    resume level, about 100 pieces run between two waits (without it, one)."""

    def runs_between_waits(resume: float) -> float:
        budget = WorkBudget(0.02, 0.05, now=0.0, resume_s=resume)
        now, runs, current = 0.0, [], 0
        for _ in range(20_000):
            now += 0.0001
            wait = budget.spend(0.0001, now)
            current += 1
            if wait > 0:
                runs.append(current)
                current, now = 0, now + wait
        return statistics.median(runs[1:])  # the first run spends the initial burst

    assert runs_between_waits(0.01) >= 90
    assert runs_between_waits(0.0) <= 2


def test_work_budget_lets_a_trickle_through_without_waiting() -> None:
    """Ordinary traffic (a message now and then) is never delayed."""
    budget = WorkBudget(0.02, 0.05, now=0.0)
    assert all(budget.spend(0.0005, now=float(t)) == 0.0 for t in range(1, 1000))


@pytest.mark.parametrize(("share", "burst"), [(0.0, 0.05), (1.5, 0.05), (0.02, 0.0)])
def test_work_budget_rejects_nonsense(share: float, burst: float) -> None:
    """A share outside (0, 1] or a burst that is not positive is refused with the argument's name."""
    with pytest.raises(ValueError, match="Expected `(share|burst_s)`"):
        WorkBudget(share, burst, now=0.0)


class Msg:
    """A consumed Kafka message as `ControlListener.take` reads it: `error()` and `value()`."""

    def __init__(self, value: bytes) -> None:
        self.payload = value

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self.payload


def flood_batches(n: int, batch: int, stop_at: int | None = None) -> list[list[Msg]]:
    """`n` junk messages in batches of `batch`, a genuine stop for job-a at index `stop_at`."""
    msgs = [Msg(JUNK[i % len(JUNK)]) for i in range(n)]
    if stop_at is not None:
        msgs[stop_at] = Msg(encode_action("stop", "job-a", ts=START + 1, rule="R"))
    return [msgs[i : i + batch] for i in range(0, n, batch)]


def paced_listener(clock: Clock, cpu: Clock, share: float = 0.005) -> ControlListener:
    return ControlListener(
        "job-a",
        bootstrap=UNREACHABLE,
        start_ts=START,
        clock=clock,
        cpu_clock=cpu,
        max_busy_share=share,
        burst_s=0.02,
        resume_s=0.0025,
    )


def test_batches_are_paced_by_the_threads_cpu_time_to_the_share_of_wall_time() -> None:
    """100,000 junk messages in batches of 256 at 8 us each (the consume call included): the
    listener's CPU time stays within 0.5 % of the wall clock plus its burst, it waits in a couple of
    pieces a second (not once per batch), and every message is counted."""
    clock, cpu = Clock(), Clock()
    ctl = paced_listener(clock, cpu)
    waits = []
    for batch in flood_batches(100_000, 256):
        before = cpu.now
        cpu.now += 8e-6 * len(batch)  # consume and handle: the thread's CPU clock moves
        clock.now += 8e-6 * len(batch)
        wait = ctl.take(batch, before)
        if wait > 0:
            waits.append(wait)
            clock.now += wait
    assert sum(ctl.counts.values()) == ctl.counts["malformed"] == 100_000
    assert ctl.cpu_s == pytest.approx(cpu.now)
    assert 0.005 * clock.now * 0.95 <= ctl.cpu_s <= 0.005 * clock.now + 0.02
    assert ctl.paced_s == pytest.approx(sum(waits)) and ctl.paced_s > 0
    assert statistics.median(waits) >= 0.0025 / 0.005 * 0.9  # about every 0.5 s, not every batch
    assert len(waits) <= clock.now / (0.0025 / 0.005) + 2


def test_a_stop_inside_a_paced_batch_is_honoured_before_the_wait() -> None:
    """The budget long spent, a batch holding a genuine stop: the stop is set when `take` returns,
    though it asks the listener to wait, and the rest of the batch is still counted."""
    clock, cpu = Clock(), Clock()
    ctl = paced_listener(clock, cpu)
    batches = flood_batches(20 * 256, 256, stop_at=19 * 256 + 100)
    for batch in batches[:-1]:
        before = cpu.now
        cpu.now += 0.002  # 2 ms a batch: the 20 ms burst is gone after ten
        wait = ctl.take(batch, before)
        assert not ctl.stop_requested.is_set()
        clock.now += wait
    before = cpu.now
    cpu.now += 0.05  # a costly batch: far beyond the budget
    assert ctl.take(batches[-1], before) > 0
    assert ctl.stop_requested.is_set() and [a["rule"] for a in ctl.actions] == ["R"]
    assert ctl.counts["accepted"] == 1 and ctl.counts["malformed"] == 20 * 256 - 1


def test_an_idle_listener_never_waits() -> None:
    """Empty polls and a message now and then (the CPU of each poll charged) never make it wait."""
    clock, cpu = Clock(), Clock()
    ctl = paced_listener(clock, cpu)
    for i in range(10_000):  # 500 s of polls every 50 ms, 30 us each, a checkpoint every 5 s
        before = cpu.now
        cpu.now += 30e-6
        clock.now += 0.05
        batch = [Msg(encode_action("checkpoint", "job-a", ts=START + 1))] if i % 100 == 0 else []
        assert ctl.take(batch, before) == 0.0
    assert ctl.paced_s == 0.0 and ctl.counts["accepted"] + ctl.counts["coalesced"] == 100


class SlowClock(Clock):
    """A clock that moves `step` seconds each time it is read: handling that takes wall time."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_batch_handled_slowly_in_wall_time_is_charged_its_wall_time() -> None:
    """A descheduled thread holds the GIL for longer than its CPU time: a batch of 0.2 ms of CPU
    that takes 10 ms of wall is charged 10 ms, so the listener waits about fifty times longer."""

    def paced(step: float) -> float:
        clock, cpu = SlowClock(step), Clock()
        ctl = paced_listener(clock, cpu)
        for batch in flood_batches(200 * 256, 256):
            before = cpu.now
            cpu.now += 0.0002
            clock.now += ctl.take(batch, before)
        assert sum(ctl.counts.values()) == 200 * 256
        return ctl.paced_s

    fast, slow = paced(0.0), paced(0.005)  # two readings a batch: 10 ms of wall each
    assert slow > 40 * fast > 0
