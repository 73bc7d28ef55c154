#!/usr/bin/env python
"""Step time with the TorchHook against no hook, interleaved in one process.

Method (as in the peer measurements): two copies of the model with identical initialisation,
one never instrumented; segments alternate baseline, hook, baseline, hook, ... so that both see
the same machine drift. Each repetition gives ratio = hooked/baseline of the mean (and of the
median) per-step time; the report gives the mean and median of those ratios over repetitions.
Records are really published, to a broker (embedded Tansu unless --bootstrap / $KAFKA_BOOTSTRAP).

    python bench/hook_overhead.py --model mlp --intervals 1 10 --reps 7
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import uuid

import torch
from common import broker, make_batches, make_model, summary
from torch import nn

from tensorpulse.producers.torch import TorchHook


def run_segment(model, opt, batches, steps, step0, hook=None) -> list[float]:
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if hook is not None:
            hook.step(step0 + i, loss=loss)
        times.append(time.perf_counter() - t0)
    return times


def measure(kind: str, interval: int, bootstrap: str, steps: int, warmup: int, reps: int) -> dict:
    torch.manual_seed(0)
    base = make_model(kind)
    hooked = copy.deepcopy(base)
    batches = make_batches(kind)
    opt_b = torch.optim.SGD(base.parameters(), lr=0.01)
    opt_h = torch.optim.SGD(hooked.parameters(), lr=0.01)
    hook = TorchHook(f"bench-{kind}-i{interval}-{uuid.uuid4().hex[:6]}", bootstrap, save_interval=interval)
    hook.attach(hooked, opt_h)
    run_segment(base, opt_b, batches, warmup, 0)
    run_segment(hooked, opt_h, batches, warmup, 0, hook)
    step = warmup
    mean_ratios, median_ratios = [], []
    for _ in range(reps):
        tb = run_segment(base, opt_b, batches, steps, 0)
        th = run_segment(hooked, opt_h, batches, steps, step, hook)
        step += steps
        mean_ratios.append(statistics.fmean(th) / statistics.fmean(tb))
        median_ratios.append(statistics.median(th) / statistics.median(tb))
    hook.flush(30)
    stats = hook.stats()
    hook.close(10)
    return {
        "model": kind,
        "interval": interval,
        "mean_ratio": summary(mean_ratios),
        "median_ratio": summary(median_ratios),
        "ratios": [round(r, 4) for r in mean_ratios],
        "baseline_ms": statistics.fmean(tb) * 1000,
        "hook_stats": stats,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    ap.add_argument("--intervals", nargs="+", type=int, default=[1, 10])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per segment")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--bootstrap")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with broker(args.bootstrap) as bs:
        for kind in args.model:
            for interval in args.intervals:
                r = measure(kind, interval, bs, args.steps, args.warmup, args.reps)
                results.append(r)
                print(
                    f"{kind:4s} interval {interval:3d}: step time ratio hook/no-hook  mean {r['mean_ratio'][0]:.3f}"
                    f" (median over reps {r['mean_ratio'][1]:.3f}), median-step ratio {r['median_ratio'][1]:.3f};"
                    f" baseline {r['baseline_ms']:.2f} ms/step; published {r['hook_stats'].get('published')},"
                    f" dropped {r['hook_stats'].get('dropped')}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
