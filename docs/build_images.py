#!/usr/bin/env python
"""Regenerate the pictures in docs/img from a real run: the docs build's image step.

The run is `tensorpulse demo`'s exploding-gradient job (tensorpulse.demo.train: the same model,
data, seeds, fault and 400 steps), instrumented with the real TorchHook. Its records go to a list
(the hook's `produce_fn`) instead of Kafka, and each one is fed at once to the worker's own
evaluator (tensorpulse.replay.Replay) with the demo's rules, so the run stops where the demo's
worker asks it to (ExplodingTensor's stop action; without the network's latency, a few steps
earlier than the live demo). `tensorpulse report` then draws the same records. One CPU thread and
fixed seeds make the run, and so the picture, the same on every build.

Each PNG carries, in its `Description` text chunk, the run's alerts and panels (`describe`):
tests/unit/test_report_docs.py compares them with a fresh run, so a change to the demo, the
rules or the report that would change the picture fails until this script is run again:

    python docs/build_images.py            # writes docs/img/report.png
    python docs/build_images.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tensorpulse.report import JobData
    from tensorpulse.rules.config import RuleSpec

DOCS_IMG = Path(__file__).resolve().parent / "img"
JOB = "demo-exploding"
FAULT = "exploding"
STEPS = 400
#: Steps the run goes on after the alert that stops it (the live demo: the control topic's round trip).
STOP_AFTER = 2


def demo_run(job: str = JOB, fault: str = FAULT, steps: int = STEPS) -> list[bytes]:
    """The wire payloads the demo's training publishes, stopped by the demo's rules as the worker would.

    The hook hands records to `produce_fn` on its publisher thread, so when an alert is seen
    depends on thread timing. To draw the same run every time, the loop stops STOP_AFTER steps
    after the step whose record raised the stop action, and records of later steps (published
    while the alert was on its way) are dropped.
    """
    import torch

    from tensorpulse import wire
    from tensorpulse.demo import train
    from tensorpulse.producers.torch import TorchHook
    from tensorpulse.replay import Replay

    payloads: list[bytes] = []
    evaluator = Replay(job, parse_demo_rules())
    stop_at: list[int] = []  # the step whose record raised the stop action
    step = -1

    def sink(topic: str, value: bytes, key: bytes) -> None:
        payloads.append(value)
        _record, events = evaluator.feed(value)
        stop_at.extend(e.step for e in events if e.status == "firing" and e.action == "stop")

    def should_stop() -> bool:
        nonlocal step
        step += 1
        return bool(stop_at) and step >= stop_at[0] + STOP_AFTER

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on every machine
    try:
        hook = TorchHook(job, produce_fn=sink, offload=False, save_interval=1)
        train(hook, fault, steps, should_stop=should_stop, pace_s=0.0, say=lambda _msg: None)
        hook.close()
    finally:
        torch.set_num_threads(threads)
    if not stop_at:
        return payloads
    cache = wire.SchemaCache()
    last = stop_at[0] + STOP_AFTER
    return [p for p in payloads if wire.decode(p, cache).step <= last]


def parse_demo_rules() -> list[RuleSpec]:
    """`tensorpulse demo`'s rules: the default set, ExplodingTensor stops the job."""
    from tensorpulse.demo import DEMO_RULES
    from tensorpulse.rules.config import parse_rules

    return parse_rules(DEMO_RULES, "tensorpulse demo's rules")


def collect(payloads: list[bytes], job: str = JOB) -> JobData:
    """The report's series and the alerts replayed with the demo's rules (what the demo's worker raises)."""
    from tensorpulse.report import collect_job

    return collect_job(payloads, job, parse_demo_rules())


def describe(fig: Figure, job: JobData) -> dict[str, Any]:
    """What the picture shows, in words: the run's alerts and the panels' titles."""
    from tensorpulse.report.axes import PANEL

    return {
        "job": job.job,
        "steps": job.summary.last_step if job.summary is not None else None,
        "alerts": [f"{a.rule}@{a.step}" for a in job.firing()],
        "panels": [ax.get_title(loc="left") for ax in fig.axes if ax.get_label() == PANEL],
    }


def build(out: Path = DOCS_IMG, job: JobData | None = None) -> list[Path]:
    """Train, replay and draw (`job`: the collected run, when the caller has it); write
    out/report.png. Returns the files written."""
    from tensorpulse.report.layout import png_bytes, report_figure

    job = collect(demo_run()) if job is None else job
    fig = report_figure([job])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.png"
    meta = {"Description": json.dumps(describe(fig, job), sort_keys=True), "Software": "tensorpulse report"}
    path.write_bytes(png_bytes(fig, metadata=meta))
    return [path]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--out", type=Path, default=DOCS_IMG, help=f"folder to write into (default {DOCS_IMG})")
    args = ap.parse_args(argv)
    for path in build(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
