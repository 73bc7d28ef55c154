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
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import torch
from common import make_batches, make_model, open_broker
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from torch import nn

from tensorpulse.actions import encode_action
from tensorpulse.producers.control import MAX_BUSY_SHARE, RESUME_S, ControlListener
from tensorpulse.producers.torch import TorchHook
from tensorpulse.topics import control_topic

FLOOD = 10_000


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
    bootstrap: str, flood: bool, share: float, resume: float, steps: int, warmup: int
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
    listener = ControlListener(job, bootstrap=bootstrap, max_busy_share=share, resume_s=resume).start()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="measured steps per arm")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--broker", choices=["kafka", "tansu"], default="kafka")
    parser.add_argument("--bootstrap", help="an existing cluster instead of starting one")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the listener and training compete for the same core, as on a busy node

    arms = {
        "none": (False, MAX_BUSY_SHARE, RESUME_S),
        "flood": (True, MAX_BUSY_SHARE, RESUME_S),
        "flood-r0": (True, MAX_BUSY_SHARE, 0.0),
        "unpaced": (True, 1.0, 0.0),
    }
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
                m, n, f = arm(broker.bootstrap, flood, share, resume, args.steps, args.warmup)
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
