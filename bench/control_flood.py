#!/usr/bin/env python
"""Training step time while the hook's control listener reads a flood of 10,000 control messages,
beside the same training with no flood, in one run.

Each arm trains the benchmark MLP on the CPU with a TorchHook publishing to a real broker and a
control listener on the job's control topic (the hook's own class; built here so that its pacing
can be switched off for the third arm). Before a flood arm starts, 10,000 messages wait on its
control topic: malformed ones (deep nesting, 400-digit numbers, not JSON, wrong types), valid
checkpoints and stops for other jobs, and stale stops. The listener reads them from the start
while the job trains; the steps measured all fall while it is still working through them.

Only steps that end while the listener is still reading the flood count (all steps without one):
the unpaced listener gets through the flood in about a second, the paced one takes far longer.

Arms, interleaved in every repeat: `none` (no flood), `flood` (the listener as shipped:
paced to MAX_BUSY_SHARE of a core), `unpaced` (the same with no pacing: what a flood cost
before). Ratios are per repeat against that repeat's `none`.

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
from tensorpulse.producers.control import MAX_BUSY_SHARE, ControlListener
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


def fill(bootstrap: str, topic: str, messages: list[bytes]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(30)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "message.max.bytes": 1_000_000})
    key = topic.rsplit(".", 1)[-1].encode()
    for m in messages:
        while True:
            try:
                p.produce(topic, m, key)
                break
            except BufferError:
                p.poll(0.1)
    assert p.flush(60) == 0, "flood not delivered"


def arm(bootstrap: str, flood: bool, share: float, steps: int, warmup: int) -> tuple[float, int]:
    """Median step time (ms) over the measured steps that fell while the flood was being read (all of
    them without a flood), and how many flood messages the listener had read by the end."""
    job = f"flood-{uuid.uuid4().hex[:8]}"
    topic = control_topic(job)
    fill(bootstrap, topic, flood_messages(job) if flood else [encode_action("stop", "some-other-job")])
    torch.manual_seed(0)
    model, batches = make_model("mlp"), make_batches("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hook = TorchHook(job, bootstrap, listen_for_actions=False).attach(model, opt)
    listener = ControlListener(job, bootstrap=bootstrap, max_busy_share=share).start()
    try:
        deadline = time.monotonic() + 30
        while not listener.assigned and time.monotonic() < deadline:
            time.sleep(0.01)
        times = []
        for step in range(warmup + steps):
            x, y = batches[step % len(batches)]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            hook.step(step, loss=loss)
            busy = sum(listener.counts.values()) < FLOOD  # the flood is still being read
            if step >= warmup and (busy or not flood):
                times.append(time.perf_counter() - t0)
        read = sum(listener.counts.values())
        if len(times) < 10:
            raise SystemExit(f"only {len(times)} steps fell inside the flood: use fewer --warmup steps")
        assert not listener.stop_requested.is_set(), "the flood stopped the job"
    finally:
        listener.close(5)
        hook.close(10)
    return statistics.median(times) * 1e3, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="measured steps per arm")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--broker", choices=["kafka", "tansu"], default="kafka")
    parser.add_argument("--bootstrap", help="an existing cluster instead of starting one")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the listener and training compete for the same core, as on a busy node

    arms = {"none": (False, MAX_BUSY_SHARE), "flood": (True, MAX_BUSY_SHARE), "unpaced": (True, 1.0)}
    with open_broker(args.bootstrap, args.broker) as broker:
        print(f"broker: {broker.what}; {FLOOD:,} control messages per flood arm; MLP, 1 torch thread")
        ms: dict[str, list[float]] = {a: [] for a in arms}
        read: dict[str, list[int]] = {a: [] for a in arms}
        ratios: dict[str, list[float]] = {a: [] for a in arms}
        for r in range(args.repeats):
            for name, (flood, share) in arms.items():
                m, n = arm(broker.bootstrap, flood, share, args.steps, args.warmup)
                ms[name].append(m)
                read[name].append(n)
            for name in arms:
                ratios[name].append(ms[name][-1] / ms["none"][-1])
            print(f"  repeat {r + 1}: " + ", ".join(f"{a} {ms[a][-1]:.2f} ms" for a in arms), flush=True)
    print(f"{'arm':<10} {'step ms (median of repeats)':>28} {'vs none: median (min-max)':>28} {'flood read':>12}")
    for name in arms:
        rs = ratios[name]
        spread = f"{statistics.median(rs):.3f}x ({min(rs):.3f}-{max(rs):.3f})"
        got = f"{min(read[name]):,}-{max(read[name]):,}" if arms[name][0] else "-"
        print(f"{name:<10} {statistics.median(ms[name]):>28.2f} {spread:>28} {got:>12}")


if __name__ == "__main__":
    main()
