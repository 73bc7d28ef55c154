#!/usr/bin/env python
"""Training step time while the hook's control listener reads a flood of 10,000 control messages,
beside the same training with no flood, in one run.

Each arm trains the benchmark MLP on the CPU with a TorchHook publishing to a real broker and a
control listener on the job's control topic (the hook's own class; built here so that its pacing
can be switched off for the third arm). The flood: malformed messages (deep nesting, 400-digit
numbers, not JSON, wrong types), valid checkpoints and stops for other jobs, and stale stops.

Flood and steps are made to overlap, whatever the machine's speed: the warm-up steps run first,
then the listener starts and reads its (nearly empty) topic, then the 10,000 messages are sent and
the measured steps begin. A step counts only if the listener still had flood messages to read
when it ended (it was reading all through it: the messages were there from its start); when the
listener has read everything sent so far, another 10,000 are sent between two steps (not timed:
the cost of sending falls on no measured step), until `--steps` steps are measured. Without this
the unpaced listener read the whole flood during the warm-up on a quiet machine, and the run
stopped with "0 steps fell inside the flood".

Arms, interleaved in every repeat: `none` (no flood), `flood` (the listener as shipped:
paced to MAX_BUSY_SHARE of a core, resuming with RESUME_S of CPU time owed), `flood-r0` (the
same pacing resuming as soon as anything is owed: one message per wake), `unpaced` (the same with no pacing: what a flood cost
before). Ratios are per repeat against that repeat's `none`. The arms take turns at going first
(repeat r starts with arm r mod 4): the first arm of a repeat ran slower on a quiet machine, which
in a fixed order flattered every arm against `none`.

    python bench/control_flood.py --repeats 3 --steps 200

Arms one after another cannot show a 2 % effect on a shared machine: `none` alone moved 5.5-9.2 ms
a step between repeats. `--blocks N` pairs blocks instead, in ONE training process (one model, one
hook): a block with a fresh listener on a pre-filled flood topic and a block whose listener reads a
topic holding one harmless message (`none`) make a pair, in ABBA order (flood-none, none-flood,
...), N pairs per flood arm (`--arms`), so that the machine's drift falls on both blocks of a pair
alike. Each block's listener starts before the block, which begins once the listener is reading
(its `counts`). The first `--skip` steps are not timed, nor, for a paced listener on a flood, any
step until its start burst (BURST_S) is spent: its `paced_s` turns positive (it has waited for its
budget once; BURST_WAIT_S at most, since a listener whose bounded prefetch queue feeds it slower than its
budget may never wait). Once paced it wakes about every 0.5 s (RESUME_S of CPU time at MAX_BUSY_SHARE), and a
block timed from that moment would start with a wait, so every block then runs a random 0-0.5 s
more untimed (seeded), and a block is `--block-steps` steps (default 150: a few wakes), not the
40-60 that would fit inside one wait. A block's figure is its timed steps' wall time over their
number (the mean step: the listener's pieces of 10 ms hit a step now and then, which a median
step would not see), and the process's CPU time over the same steps (all its threads: training,
listener, librdkafka), which other agents' load barely moves. Each flood topic is topped up
before a block to twice the most any block read from it plus one flood, so no listener runs dry
within a block (one that did is run again, topped up, and counted as `dry`). Per pair the ratio
flood/none; per arm the median and the mean ratio with bootstrap 95 % intervals (pairs resampled,
fixed seed), and the mean step by fifth of the block (a start cost left in the timed steps would
show in the first fifth).

Every block, flood or none, also runs `--settle` seconds untimed (default 1) once its listener
reads: a new listener's start (librdkafka's threads, connections, first fetches) slowed the first
half second of training, and before this only the `none` blocks, timed a few steps in, paid for it
(which flattered the flood arms). The per-pair ratios are also given for the training thread's
CPU time (`train`), and the listener's own CPU share. The last lines give the verdict on issue
18's target ("training step time", i.e. wall time, within 2 % of no flood): shown only when the
upper end of the 95 % interval of the mean wall ratio is at most 1.02, over 20 pairs or more;
"refuted" when its lower end is above. An arm `NAME@REV` is the listener of producers/control.py
at git revision REV with that revision's defaults, loaded beside the working tree's, so that a
change is measured against the listener before it in the same run:

    python bench/control_flood.py --blocks 60
    python bench/control_flood.py --blocks 30 --arms flood,before@HEAD
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from common import make_batches, make_model, open_broker
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from torch import nn

from tensorpulse.actions import encode_action
from tensorpulse.producers.control import MAX_BUSY_SHARE, PREFETCH_KB, RESUME_S, ControlListener
from tensorpulse.producers.torch import TorchHook
from tensorpulse.topics import control_topic

FLOOD = 10_000
#: A paced listener, its burst spent, wakes about once per RESUME_S / MAX_BUSY_SHARE (0.5 s): a block
#: timed from the end of the burst would start where its first wait starts, and miss a wake in a
#: short block. Every block is timed from a random moment (uniform, this long) after its skip instead.
PERIOD_S = RESUME_S / MAX_BUSY_SHARE
#: The most a block waits, untimed, for a paced listener's start burst to be spent.
BURST_WAIT_S = 5.0
#: The target of issue 18: training step time under the flood within 2 % of no flood.
TARGET = 1.02
ROOT = Path(__file__).resolve().parents[1]


def flood_messages(job: str) -> list[bytes]:
    """FLOOD messages, none of which may stop `job` or reach its callbacks more than once."""
    kinds = [
        b"[" * 5_000,  # RecursionError inside the JSON parser: the costliest kind
        b'{"action":"stop","job":"' + job.encode() + b'","ts":' + b"9" * 400 + b"}",
        b"not json at all",
        b'{"action":["stop"],"job":"x","ts":1}',
        encode_action("stop", "some-other-job"),
        encode_action("stop", job, ts=1.0),  # years before this run: stale
        encode_action("checkpoint", "some-other-job"),
    ]
    return [kinds[i % len(kinds)] for i in range(FLOOD)]


def create(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(30)


def send(producer: Producer, topic: str, messages: list[bytes]) -> int:
    """Produce `messages` to `topic` and wait until the broker has them; returns how many."""
    key = topic.rsplit(".", 1)[-1].encode()
    for m in messages:
        while True:
            try:
                producer.produce(topic, m, key)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0, "flood not delivered"
    return len(messages)


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def arm(
    bootstrap: str,
    flood: bool,
    share: float,
    resume: float,
    steps: int,
    warmup: int,
    prefetch_kb: int | None = PREFETCH_KB,
) -> tuple[float, int, int]:
    """Median step time (ms) over `steps` measured steps that each ended with flood messages still
    unread (every step without a flood); the flood messages read, and the floods sent."""
    job = f"flood-{uuid.uuid4().hex[:8]}"
    topic = control_topic(job)
    create(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "message.max.bytes": 1_000_000})
    send(producer, topic, [encode_action("stop", "some-other-job")])  # one message to see it reading
    torch.manual_seed(0)
    model, batches = make_model("mlp"), make_batches("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hook = TorchHook(job, bootstrap, listen_for_actions=False).attach(model, opt)

    def train(step: int) -> float:
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        hook.step(step, loss=loss)
        return time.perf_counter() - t0

    for step in range(warmup):  # before the listener: the flood cannot be read during these
        train(step)
    listener = ControlListener(
        job, bootstrap=bootstrap, max_busy_share=share, resume_s=resume, prefetch_kb=prefetch_kb
    ).start()
    try:
        _wait(lambda: sum(listener.counts.values()) >= 1, "the listener to read its topic")
        base = sum(listener.counts.values())
        sent = floods = 0
        if flood:
            sent += send(producer, topic, flood_messages(job))
            floods += 1
        times: list[float] = []
        step = warmup
        while len(times) < steps:
            took = train(step)
            step += 1
            if not flood or sum(listener.counts.values()) - base < sent:  # still reading at its end
                times.append(took)
            else:  # all read: another flood, between two steps
                sent += send(producer, topic, flood_messages(job))
                floods += 1
        read = sum(listener.counts.values()) - base
        assert not listener.stop_requested.is_set(), "the flood stopped the job"
    finally:
        listener.close(5)
        hook.close(10)
    return statistics.median(times) * 1e3, read, floods


class Trainer:
    """The benchmark MLP with a TorchHook, trained one step at a time: one for the whole run, so that
    every block of a pair trains the same model in the same process."""

    def __init__(self, bootstrap: str) -> None:
        torch.manual_seed(0)
        self.model, self.batches = make_model("mlp"), make_batches("mlp")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.hook = TorchHook(f"train-{uuid.uuid4().hex[:8]}", bootstrap, listen_for_actions=False)
        self.hook.attach(self.model, self.opt)
        self.n = 0

    def step(self) -> None:
        x, y = self.batches[self.n % len(self.batches)]
        self.opt.zero_grad()
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.hook.step(self.n, loss=loss)
        self.n += 1


class Topic:
    """A control topic for block listeners: `size` messages on it, every block's listener reads it
    from the beginning."""

    def __init__(self, bootstrap: str, producer: Producer, flood: bool) -> None:
        self.job = f"flood-{uuid.uuid4().hex[:8]}"
        self.name = control_topic(self.job)
        self.producer, self.flood = producer, flood
        create(bootstrap, self.name)
        self.size = send(producer, self.name, [encode_action("stop", "some-other-job")])
        self.most_read = 0

    def top_up(self) -> None:
        """Enough flood that no listener runs dry within a block: twice the most read, plus one flood."""
        while self.flood and self.size < 2 * self.most_read + FLOOD:
            self.size += send(self.producer, self.name, flood_messages(self.job))


@dataclass
class Block:
    """What one block measured."""

    ms: float  #: wall time of its timed steps over their number
    cpu_ms: float  #: the process's CPU time (all its threads) over the same steps, per step
    skipped: int  #: untimed steps at its start
    read: int  #: messages its listener read
    reading: bool  #: the listener still had messages to read at its end (always, without a flood)
    each: list[float]  #: every timed step (ms)
    #: the broker's CPU time over the timed steps, per step (if its pid is known)
    broker_ms: float = float("nan")
    train_ms: float = float("nan")  #: the training thread's CPU time over the timed steps, per step
    listener_ms: float = float("nan")  #: the listener thread's CPU time over them, per step


Make = Callable[[str, str], Any]  # (job, bootstrap) -> a started-to-be ControlListener


def block(
    trainer: Trainer,
    bootstrap: str,
    topic: Topic,
    make: Make,
    paced: bool,
    steps: int,
    skip: int,
    phase_s: float,
    broker_pid: int | None = None,
    settle_s: float = 0.0,
) -> Block:
    """One block: a fresh listener (`make`) on `topic`, `skip` steps and `settle_s` seconds or more
    untimed (and, for a `paced` listener on a flood, until its start burst is spent), then more for
    `phase_s` seconds, then `steps` timed."""
    topic.top_up()
    listener = make(topic.job, bootstrap).start()
    try:
        _wait(lambda: sum(listener.counts.values()) >= 1, "the listener to read its topic")
        # A paced listener on a flood spends its burst first; one whose fetching is slower than its
        # budget (a bounded prefetch queue) may never wait: BURST_WAIT_S at most.
        start = time.perf_counter()
        burst_until = start + BURST_WAIT_S if topic.flood and paced else 0.0
        skipped = 0
        while (
            skipped < skip
            or time.perf_counter() < start + settle_s
            or (listener.paced_s == 0 and time.perf_counter() < burst_until)
        ):
            trainer.step()
            skipped += 1
        until = time.perf_counter() + phase_s
        while time.perf_counter() < until:
            trainer.step()
            skipped += 1
        each = []
        broker0 = _ticks(broker_pid)
        lis_clock = _thread_clock(f"tensorpulse-control-{topic.job}")
        lis0 = time.clock_gettime(lis_clock)
        train0, cpu0, t0 = time.thread_time(), time.process_time(), time.perf_counter()
        last = t0
        for _ in range(steps):
            trainer.step()
            now = time.perf_counter()
            each.append((now - last) * 1e3)
            last = now
        cpu, train = time.process_time() - cpu0, time.thread_time() - train0
        lis = time.clock_gettime(lis_clock) - lis0
        broker = (_ticks(broker_pid) - broker0) / TICKS_PER_S
        read = sum(listener.counts.values())
        assert not listener.stop_requested.is_set(), "the flood stopped the job"
    finally:
        listener.close(5)
    topic.most_read = max(topic.most_read, read)
    return Block(
        (last - t0) / steps * 1e3,
        cpu / steps * 1e3,
        skipped,
        read,
        read < topic.size or not topic.flood,
        each,
        broker / steps * 1e3,
        train / steps * 1e3,
        lis / steps * 1e3,
    )


def _thread_clock(name: str) -> int:
    """The CPU-time clock of this process's thread called `name` (a listener's, whatever its revision)."""
    thread = next(t for t in threading.enumerate() if t.name == name)
    assert thread.ident is not None
    return time.pthread_getcpuclockid(thread.ident)


def control_at(rev: str) -> ModuleType:
    """producers/control.py as it was at git revision `rev`, loaded beside today's (its own
    constants and listener; the decoder and the rest of the package are the working tree's), so
    that a change to the listener is measured against the one before it in the same run."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{sha}:producers/control.py"], capture_output=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="tp-control-")) / f"control_{sha}.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location(f"tensorpulse.producers._control_at_{sha}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _ticks(pid: int | None) -> float:
    """CPU ticks (user + system) of process `pid` so far; nan without one."""
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return float(int(fields[11]) + int(fields[12]))


def interval(
    ratios: list[float], stat=np.median, seed: int = 0, resamples: int = 10_000
) -> tuple[float, float, float]:
    """`stat` (median or mean) of `ratios` and a bootstrap 95 % interval for it (pairs resampled with
    a fixed seed)."""
    a = np.asarray(ratios)
    rng = np.random.default_rng(seed)
    boot = stat(a[rng.integers(0, len(a), size=(resamples, len(a)))], axis=1)
    return float(stat(a)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


#: Fewer pairs than this give no verdict: a bootstrap over a handful of pairs is far too narrow.
MIN_PAIRS = 20


def within(ratios: list[float], target: float = TARGET) -> str:
    """The verdict on "within 2 %" from per-pair wall ratios: shown only when the upper end of the
    mean ratio's 95 % interval is at most `target` (a point estimate under it is not enough), over
    at least MIN_PAIRS pairs."""
    mid, lo, hi = interval(ratios, np.mean)
    verdict = "shown" if hi <= target else ("refuted" if lo > target else "not shown")
    few = ""
    if len(ratios) < MIN_PAIRS:
        verdict, few = "not shown", f"too few pairs for a verdict, {len(ratios)} < {MIN_PAIRS}; "
    return (
        f"within {100 * (target - 1):.0f} %: {verdict} ({few}mean wall ratio {mid:.3f}x [{lo:.3f}-{hi:.3f}],"
        f" {len(ratios)} pairs)"
    )


def _span(values: list[float], stat=np.median) -> str:
    mid, lo, hi = interval(values, stat)
    return f"{mid:.3f}x [{lo:.3f}-{hi:.3f}]"


def wait_for_load(max_load: float, trainer: Trainer) -> float:
    """Wait until the 1-minute load average is at most `max_load` (idle: the load is other work, this
    job's own not counted), then train 100 steps untimed to warm up again; the seconds waited. The
    choice of pairs depends on the load before them, never on what they measure."""
    t0 = time.perf_counter()
    if os.getloadavg()[0] <= max_load:
        return 0.0
    while os.getloadavg()[0] > max_load:
        time.sleep(5.0)
    for _ in range(100):
        trainer.step()
    return time.perf_counter() - t0


def paired_blocks(
    bootstrap: str,
    names: list[str],
    pairs: int,
    steps: int,
    skip: int,
    warmup: int,
    broker_pid: int | None = None,
    settle: float = 0.0,
    max_load: float | None = None,
) -> None:
    """`pairs` ABBA pairs (arm, none) per arm in `names`, in one training process; prints each pair
    and, per arm, the median and mean ratio arm/none with bootstrap intervals (and the same for the
    process's CPU time per step), and the mean step by position in the block (a start cost not
    skipped would show in the first fifth)."""
    logging.getLogger("tensorpulse.producers").setLevel(logging.ERROR)  # a flood summary per block
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "message.max.bytes": 1_000_000})
    none = Topic(bootstrap, producer, flood=False)
    topics = {name: Topic(bootstrap, producer, flood=True) for name in names}
    trainer = Trainer(bootstrap)
    rng = random.Random(0)
    for _ in range(warmup):
        trainer.step()
    got: dict[str, list[tuple[Block, Block]]] = {a: [] for a in names}  # (arm, none) per pair
    dry: dict[str, int] = dict.fromkeys(names, 0)
    try:
        for i in range(pairs):
            for name in names:
                if max_load is not None:
                    waited = wait_for_load(max_load, trainer)
                    if waited:
                        print(
                            f"  (waited {waited:.0f} s for the load average to fall to {max_load})",
                            flush=True,
                        )
                order = [name, "none"] if i % 2 == 0 else ["none", name]
                for _attempt in range(3):  # a listener that ran dry: topped up (to twice its read), again
                    pair = {}
                    for a in order:
                        t = none if a == "none" else topics[name]
                        make, paced = maker(a)
                        phase = rng.uniform(0, PERIOD_S)
                        pair[a] = block(
                            trainer, bootstrap, t, make, paced, steps, skip, phase, broker_pid, settle
                        )
                    if pair[name].reading:
                        break
                    dry[name] += 1
                    print(
                        f"  pair {i + 1} {name}: the listener ran dry ({pair[name].read:,}); again",
                        flush=True,
                    )
                else:
                    raise SystemExit(f"{name}: the listener ran dry three times in a row")
                b, b0 = pair[name], pair["none"]
                got[name].append((b, b0))
                print(
                    f"  pair {i + 1} {name} ({order[0]} first): {name} {b.ms:.2f} ms, none {b0.ms:.2f} ms,"
                    f" ratio {b.ms / b0.ms:.3f} (cpu {b.cpu_ms / b0.cpu_ms:.3f},"
                    f" train {b.train_ms / b0.train_ms:.3f}), skipped {b.skipped}/{b0.skipped},"
                    f" read {b.read:,}, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        trainer.hook.close(10)
    print(
        f"blocks of {steps} timed steps, ABBA pairs; ratio = the arm's mean step / the paired none block's,"
        " median and mean over pairs [95% bootstrap interval]; cpu = the same for the process's CPU time,"
        " train = for the training thread's CPU time"
        f"\n{'arm':<10} {'pairs':>5} {'arm ms':>7} {'none ms':>7} {'ratio: median [95%]':>24}"
        f" {'ratio: mean [95%]':>24} {'min-max':>13} {'cpu: median [95%]':>24} {'train: mean [95%]':>24}"
        f" {'skipped':>8} {'read per block':>16} {'dry':>4}"
    )
    verdicts = []
    for name in names:
        if not got[name]:
            print(f"{name:<10} {0:>5} no pair measured")
            continue
        rs = [b.ms / b0.ms for b, b0 in got[name]]
        cpu = [b.cpu_ms / b0.cpu_ms for b, b0 in got[name]]
        train = [b.train_ms / b0.train_ms for b, b0 in got[name]]
        reads = [b.read for b, _ in got[name]]
        print(
            f"{name:<10} {len(rs):>5} {statistics.median(b.ms for b, _ in got[name]):>7.2f}"
            f" {statistics.median(b0.ms for _, b0 in got[name]):>7.2f} {_span(rs):>24} {_span(rs, np.mean):>24}"
            f" {f'{min(rs):.3f}-{max(rs):.3f}':>13} {_span(cpu):>24} {_span(train, np.mean):>24}"
            f" {statistics.median(b.skipped for b, _ in got[name]):>8.0f}"
            f" {f'{min(reads):,}-{max(reads):,}':>16} {dry[name]:>4}"
        )
        lis = [b.listener_ms / b.ms for b, _ in got[name]]
        lis0 = [b0.listener_ms / b0.ms for _, b0 in got[name]]
        verdicts.append(
            f"  {name}: the listener's thread used {100 * statistics.median(lis):.2f} % of wall time"
            f" (median of blocks; {100 * min(lis):.2f}-{100 * max(lis):.2f}; none's"
            f" {100 * statistics.median(lis0):.2f} %)"
        )
        verdicts.append(f"  {name}: {within(rs)}")
    print(
        f"within {100 * (TARGET - 1):.0f} % (issue 18: training step time = wall): shown when the upper end of"
        " the 95 % interval of the mean wall ratio is at most "
        f"{TARGET}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"
    )
    print("\n".join(verdicts))
    if broker_pid is not None:
        print(
            "broker CPU ms per timed step (median of blocks): "
            + ", ".join(
                f"{name} {statistics.median(b.broker_ms for b, _ in got[name]):.2f}"
                f" (none {statistics.median(b0.broker_ms for _, b0 in got[name]):.2f})"
                for name in names
                if got[name]
            )
        )
    nones = [b0 for name in names for _, b0 in got[name]]
    if nones:
        print(f"none: median {statistics.median(b0.skipped for b0 in nones):.0f} steps skipped per block")
    print("mean step (ms) by fifth of the block's timed steps, over all its blocks:")
    for a, blocks in [*((name, [b for b, _ in got[name]]) for name in names), ("none", nones)]:
        if blocks:
            fifths = np.array_split(np.asarray([b.each for b in blocks]), 5, axis=1)
            print(f"  {a:<10} " + " ".join(f"{f.mean():7.2f}" for f in fifths))


#: librdkafka's prefetch queue per arm (kilobytes; None: its defaults), where not the listener's default:
#: `unpaced` is the listener before pacing, which also let librdkafka prefetch 64 MB (a bounded queue
#: alone, fetching 1 MB a second once full, throttles even an unpaced listener to ~1.02-1.06x).
PREFETCH: dict[str, int | None] = {"unpaced": None}
#: Arms `NAME@REV`: the listener of producers/control.py at git revision REV, with that revision's defaults.
REVS: dict[str, ModuleType] = {}
ARMS = {
    "none": (False, MAX_BUSY_SHARE, RESUME_S),
    "flood": (True, MAX_BUSY_SHARE, RESUME_S),
    "flood-r0": (True, MAX_BUSY_SHARE, 0.0),
    "unpaced": (True, 1.0, 0.0),
}


def maker(name: str) -> tuple[Make, bool]:
    """How arm `name` builds a block's listener, and whether that listener is paced. `none` is
    today's listener as shipped (on a topic with one harmless message)."""
    if name in REVS:
        module = REVS[name]
        return (lambda job, bootstrap: module.ControlListener(job, bootstrap=bootstrap)), True
    _, share, resume = ARMS[name]
    pf = PREFETCH.get(name, PREFETCH_KB)

    def make(job: str, bootstrap: str) -> ControlListener:
        return ControlListener(
            job, bootstrap=bootstrap, max_busy_share=share, resume_s=resume, prefetch_kb=pf
        )

    return make, share < 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="measured steps per arm")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; with --blocks 100)")
    parser.add_argument("--blocks", type=int, default=0, help="paired blocks mode: ABBA pairs per flood arm")
    parser.add_argument(
        "--block-steps", type=int, default=150, help="timed steps per block (a few of the listener's wakes)"
    )
    parser.add_argument("--skip", type=int, default=5, help="untimed steps at least at a block's start")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="untimed seconds at least at every block's start, flood or none: a new listener's start"
        " (librdkafka's threads, connections, first fetches) slowed the first ~0.5 s of training, and"
        " only the none blocks, timed from a few steps in, paid for it",
    )
    parser.add_argument(
        "--arms",
        default="flood,unpaced",
        help="flood arms of the blocks mode: flood, flood-r0, unpaced, NAME=SHARE/RESUME_S/PREFETCH_KB"
        " (a pacing to try; PREFETCH_KB 0: librdkafka's default queue), or NAME@REV (the listener of"
        " producers/control.py at git revision REV, with its defaults)",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        help="before each pair, wait (idle) until the 1-minute load average is at most this: on a"
        " shared machine, pairs from its quieter spells only",
    )
    parser.add_argument("--broker", choices=["kafka", "tansu"], default="kafka")
    parser.add_argument("--bootstrap", help="an existing cluster instead of starting one")
    parser.add_argument(
        "--broker-pid", type=int, help="the given cluster's broker process: its CPU per block"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # the listener and training compete for the same core, as on a busy node

    if args.blocks:
        names = []
        for a in filter(None, args.arms.split(",")):
            if "@" in a:  # e.g. before@HEAD: the listener as committed, beside the working tree's
                REVS[a] = control_at(a.partition("@")[2])
                names.append(a)
                continue
            name, _, pacing = a.partition("=")
            if pacing:  # e.g. half=0.01/0.01/1024: 1 % of a core, resuming at 10 ms owed, 1 MB prefetched
                share, resume, prefetch = ([*pacing.split("/"), "", ""])[:3]
                ARMS[name] = (True, float(share), float(resume or RESUME_S))
                PREFETCH[name] = (int(prefetch) or None) if prefetch else PREFETCH_KB  # 0: librdkafka's
            if name not in ARMS or name == "none":
                parser.error(f"--arms: {name!r} is none of {', '.join(a for a in ARMS if a != 'none')}")
            names.append(name)
        if not names:
            parser.error("--arms: at least one")
        with open_broker(args.bootstrap, args.broker) as broker:
            print(f"broker: {broker.what}; flood topics of {FLOOD:,} messages or more; MLP, 1 torch thread")
            warmup = 100 if args.warmup is None else args.warmup
            pid = args.broker_pid or (broker.pids[0] if broker.pids else None)
            paired_blocks(
                broker.bootstrap,
                names,
                args.blocks,
                args.block_steps,
                args.skip,
                warmup,
                pid,
                args.settle,
                args.max_load,
            )
        return
    arms = ARMS
    args.warmup = 5 if args.warmup is None else args.warmup
    with open_broker(args.bootstrap, args.broker) as broker:
        print(f"broker: {broker.what}; {FLOOD:,} control messages per flood arm; MLP, 1 torch thread")
        ms: dict[str, list[float]] = {a: [] for a in arms}
        read: dict[str, list[int]] = {a: [] for a in arms}
        floods: dict[str, list[int]] = {a: [] for a in arms}
        ratios: dict[str, list[float]] = {a: [] for a in arms}
        for r in range(args.repeats):
            names = list(arms)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                flood, share, resume = arms[name]
                pf = PREFETCH.get(name, PREFETCH_KB)
                m, n, f = arm(broker.bootstrap, flood, share, resume, args.steps, args.warmup, pf)
                ms[name].append(m)
                read[name].append(n)
                floods[name].append(f)
            for name in arms:
                ratios[name].append(ms[name][-1] / ms["none"][-1])
            print(f"  repeat {r + 1}: " + ", ".join(f"{a} {ms[a][-1]:.2f} ms" for a in arms), flush=True)
    print(
        f"{'arm':<10} {'step ms (median of repeats)':>28} {'vs none: median (min-max)':>28}"
        f" {'flood read':>16} {'floods sent':>12}"
    )
    for name in arms:
        rs = ratios[name]
        spread = f"{statistics.median(rs):.3f}x ({min(rs):.3f}-{max(rs):.3f})"
        got = f"{min(read[name]):,}-{max(read[name]):,}" if arms[name][0] else "-"
        sent = f"{min(floods[name])}-{max(floods[name])}" if arms[name][0] else "-"
        print(f"{name:<10} {statistics.median(ms[name]):>28.2f} {spread:>28} {got:>16} {sent:>12}")


if __name__ == "__main__":
    main()
