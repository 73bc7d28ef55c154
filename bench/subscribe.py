#!/usr/bin/env python
"""How soon does a consumer get the first record of a topic that did not exist when it started?

The design question of the stream layer (docs/architecture.md): a job's topic appears, its first
record is published; how long until a consumer that follows every job topic has it? Three ways,
each a plain confluent-kafka consumer in this process, side by side on one broker, new topics
created one at a time (`--topics`, `--gap-s` apart, a record produced right after each):

  pattern-classic  subscribe(["^prefix.*"]) by --members consumers in one group, classic
                   group protocol, cooperative-sticky,
                   topic.metadata.refresh.interval.ms = --refresh-ms: the client matches the
                   pattern on its metadata, then the group rebalances to assign the new partition
  pattern-848      the same pattern with group.protocol=consumer (KIP-848, Apache Kafka 4): the
                   broker matches the pattern and assigns incrementally
  assign           what the intake does: list topics through the consumer itself every
                   --list-ms, incremental_assign() each new partition, no group membership

Reported per way: seconds from producing the record to consuming it (p50 / max) and misses.

    python bench/subscribe.py --broker kafka --topics 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common import open_broker, percentile
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

RESULTS = Path(__file__).resolve().parent / "results"
FAST = {"fetch.wait.max.ms": 10, "fetch.error.backoff.ms": 10, "topic.metadata.refresh.fast.interval.ms": 10}


class Follower(threading.Thread):
    """One way of following every topic under a prefix; records when each topic's first record came."""

    def __init__(self, way: str, bootstrap: str, prefix: str, a: argparse.Namespace, group: str) -> None:
        super().__init__(name=way, daemon=True)
        self.way, self.prefix, self.a = way, prefix, a
        self.got: dict[str, float] = {}
        self.error: str | None = None
        self.stop_event = threading.Event()
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **FAST,
        }
        if way == "pattern-classic":
            conf.update(
                {
                    "partition.assignment.strategy": "cooperative-sticky",
                    "topic.metadata.refresh.interval.ms": a.refresh_ms,
                    "session.timeout.ms": 6000,
                    "heartbeat.interval.ms": 1000,
                }
            )
        elif way == "pattern-848":
            conf.update({"group.protocol": "consumer", "topic.metadata.refresh.interval.ms": a.refresh_ms})
        self.consumer = Consumer(conf)

    def run(self) -> None:
        c = self.consumer
        try:
            if self.way == "assign":
                self._assign_loop(c)
            else:
                c.subscribe([f"^{self.prefix}.*"])
                while not self.stop_event.is_set():
                    self._take(c.consume(100, 0.05))
        except KafkaException as exc:
            self.error = str(exc)
        finally:
            c.close()

    def _assign_loop(self, c: Consumer) -> None:
        owned: set[str] = set()
        next_list = 0.0
        while not self.stop_event.is_set():
            if time.monotonic() >= next_list:
                next_list = time.monotonic() + self.a.list_ms / 1000
                new = [
                    t for t in c.list_topics(timeout=5).topics if t.startswith(self.prefix) and t not in owned
                ]
                if new:
                    c.incremental_assign([TopicPartition(t, 0) for t in new])
                    owned.update(new)
            if owned:
                self._take(c.consume(100, 0.05))
            else:
                self.stop_event.wait(0.02)

    def _take(self, msgs: list[Any]) -> None:
        now = time.time()
        for m in msgs:
            if m.error() is None:
                self.got.setdefault(m.topic(), now)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ways", nargs="+", default=["pattern-classic", "pattern-848", "assign"])
    ap.add_argument("--topics", type=int, default=8, help="new topics, one at a time")
    ap.add_argument("--gap-s", type=float, default=2.0, help="seconds between new topics")
    ap.add_argument("--members", type=int, default=1, help="consumers in each pattern way's group")
    ap.add_argument("--refresh-ms", type=int, default=200, help="metadata refresh of the pattern consumers")
    ap.add_argument("--list-ms", type=int, default=100, help="topic listing period of `assign`")
    ap.add_argument(
        "--wait-s", type=float, default=20.0, help="how long a record may take before it counts as missed"
    )
    ap.add_argument("--broker", choices=["tansu", "kafka"], default="kafka")
    ap.add_argument("--bootstrap")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    prefix = f"sub-{uuid.uuid4().hex[:6]}-"
    with open_broker(a.bootstrap, a.broker) as broker:
        bs = broker.bootstrap
        admin = AdminClient({"bootstrap.servers": bs})
        producer = Producer({"bootstrap.servers": bs, "linger.ms": 0})
        followers = []
        for way in a.ways:  # the pattern ways with --members consumers in one group (the workers)
            group = f"sub-{way}-{uuid.uuid4().hex[:6]}"
            n = 1 if way == "assign" else a.members
            followers += [Follower(way, bs, prefix, a, group) for _ in range(n)]
        for f in followers:
            f.start()
        time.sleep(3.0)  # every group formed (on an empty pattern) before the first topic appears
        sent: dict[str, float] = {}
        for i in range(a.topics):
            topic = f"{prefix}{i}"
            admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
            sent[topic] = time.time()
            producer.produce(topic, value=b"first record")
            producer.flush(10)
            time.sleep(a.gap_s)
        end = time.monotonic() + a.wait_s
        while time.monotonic() < end and not all(
            sum(t in f.got for f in followers if f.way == w for t in sent) >= len(sent) for w in a.ways
        ):
            time.sleep(0.1)
        for f in followers:
            f.stop_event.set()
            f.join(15)
        what = broker.what
    rows = []
    for way in a.ways:
        members = [f for f in followers if f.way == way]
        got = {
            t: min(f.got[t] for f in members if t in f.got) for t in sent if any(t in f.got for f in members)
        }
        lat = [got[t] - ts for t, ts in sent.items() if t in got]
        error = next((f.error for f in members if f.error), None)
        rows.append(
            {
                "way": way,
                "members": len(members),
                "p50_s": round(percentile(lat, 50), 3) if lat else None,
                "max_s": round(max(lat), 3) if lat else None,
                "missed": len(sent) - len(lat),
                "each_s": [round(x, 3) for x in lat],
                "error": error,
            }
        )
    print(f"broker: {what}; {a.topics} new topics, {a.gap_s:g} s apart; load {os.getloadavg()[0]:.1f}")
    print("\n| way | consumers | first record p50 | max | missed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['way']} | {r['members']} | {r['p50_s']} s | {r['max_s']} s | {r['missed']}{' (' + r['error'] + ')' if r['error'] else ''} |"
        )
    out = a.out or RESULTS / f"subscribe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=2))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
