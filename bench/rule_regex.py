#!/usr/bin/env python
"""Evaluation time per record when tensor names are hostile, beside the same record with normal names.

A rules file whose regexes are catastrophic for a backtracking engine (`^(a+)+$` and friends)
runs against two records of the same shape, decoded from wire bytes as a worker decodes them: one
with ordinary names (`layer3.fc.weight`), one whose every tensor and scalar name is `aaa...a!` at
the decoder's length limit (512 characters). Both go through the worker's own evaluator with
the default rule set plus those rules, in one process, interleaved, so the ratio compares like
with like. A last table times Python's `re` on the same pattern for short hostile names: what one
record cost before rule regexes ran on RE2 (it doubles with every character).

    python bench/rule_regex.py --records 300 --repeats 5
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import numpy as np

from tensorpulse import wire
from tensorpulse.rules.config import parse_rules
from tensorpulse.stream.evaluator import JobEvaluator

#: Exponential for a backtracking engine on `a...a!`; each rule below gets one.
CATASTROPHIC = ("^(a+)+$", "^(a|aa)+$", "^(a|a?)+$")

RULES = f"""
defaults: true
rules:
  - rule: Threshold
    name: nested-plus
    params: {{tensor_regex: '{CATASTROPHIC[0]}', statistic: max, op: '>', value: 1.0e9}}
  - rule: Threshold
    name: alternation
    params: {{tensor_regex: '{CATASTROPHIC[1]}', statistic: l2, op: '>', value: 1.0e9}}
  - rule: TensorVariance
    params: {{tensor_regex: '{CATASTROPHIC[2]}', max_threshold: 1.0e9}}
  - rule: LossNotDecreasing
    params: {{tensor_regex: '{CATASTROPHIC[0]}'}}
  - rule: AllZero
    params: {{tensor_regex: '{CATASTROPHIC[1]}'}}
"""

COLLECTIONS = ("weights", "gradients", "biases", "activations")


def record_bytes(names: list[str], scalar: str, step: int) -> bytes:
    """One step record with these tensor names (collections cycled) and one scalar."""
    k = len(names)
    rng = np.random.default_rng(step)
    floats = rng.normal(size=(k, len(wire.FLOAT_COLUMNS))).astype(np.float32)
    block = wire.TensorBlock(
        names,
        [COLLECTIONS[i % len(COLLECTIONS)] for i in range(k)],
        np.full(k, 4096),
        floats,
        np.zeros(k, dtype=np.int64),
    )
    return wire.encode(
        job="bench-regex", rank=0, world=1, step=step, mode="train", ts=float(step), seq=step,
        scalars={scalar: 1.0 / (step + 1)}, tensors=block, announce=True,
    )  # fmt: skip


def per_record_us(evaluator: JobEvaluator, payloads: list[bytes]) -> float:
    """Microseconds per record for decode + every rule, over `payloads` in order, from a fresh state."""
    state = None
    start = time.perf_counter()
    for p in payloads:
        state, _ = evaluator.process(state, wire.decode(p), now=0.0)
    return (time.perf_counter() - start) / len(payloads) * 1e6


def python_re_seconds(pattern: str, length: int) -> float:
    """Seconds one `re.search` of `pattern` takes on `a` * length + `!` (the engine before RE2)."""
    compiled = re.compile(pattern)
    start = time.perf_counter()
    compiled.search("a" * length + "!")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300, help="records per measurement")
    parser.add_argument("--tensors", type=int, default=20, help="tensors per record")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (normal, hostile)")
    args = parser.parse_args()

    evaluator = JobEvaluator(parse_rules(RULES, "bench-rules.yaml"))
    longest = "a" * (wire.MAX_NAME_LEN - 1) + "!"
    normal_names = [f"layer{i}.fc.weight" for i in range(args.tensors)]
    # Each name must be distinct within a record: vary the tail, keep the hostile shape.
    hostile_names = [longest[: -1 - len(str(i))] + str(i) + "!" for i in range(args.tensors)]
    # As long as the hostile names but of no dangerous shape: separates the cost of length
    # (linear, bounded by the decoder's name limit) from the cost of the pattern meeting `a...a!`.
    long_names = ["b" * (wire.MAX_NAME_LEN - 1 - len(str(i))) + str(i) + "!" for i in range(args.tensors)]
    cases = {
        "normal (layer3.fc.weight)": [record_bytes(normal_names, "loss", s) for s in range(args.records)],
        "long (b*510 + digits + '!')": [
            record_bytes(long_names, "b" * 511 + "!", s) for s in range(args.records)
        ],
        "hostile (a*510 + digits + '!')": [
            record_bytes(hostile_names, longest, s) for s in range(args.records)
        ],
    }
    first = next(iter(cases))
    per_record_us(evaluator, cases[first][:20])  # warm-up: imports, first compilations
    times: dict[str, list[float]] = {label: [] for label in cases}
    ratios: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(args.repeats):
        for label, payloads in cases.items():
            times[label].append(per_record_us(evaluator, payloads))
        for label in cases:
            ratios[label].append(times[label][-1] / times[first][-1])

    print(
        f"{len(evaluator.specs)} rules ({len(CATASTROPHIC)} catastrophic patterns in 5 of them), "
        f"{args.tensors} tensors + 1 scalar per record, {args.records} records x {args.repeats} repeats"
    )
    print(f"{'names':<32} {'us/record':>10} {'min':>8} {'max':>8}  {'vs normal (min-max)':>22}")
    for label, xs in times.items():
        rs = ratios[label]
        spread = f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"
        print(f"{label:<32} {statistics.median(xs):>10.1f} {min(xs):>8.1f} {max(xs):>8.1f}  {spread:>22}")
    print()
    print(f"Python re on {CATASTROPHIC[0]!r}, one search of 'a' * n + '!' (before RE2):")
    for n in (16, 18, 20, 22):
        print(f"  n={n:<3} {python_re_seconds(CATASTROPHIC[0], n) * 1e3:10.1f} ms")


if __name__ == "__main__":
    main()
