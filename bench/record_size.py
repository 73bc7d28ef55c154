#!/usr/bin/env python
"""Bytes per tensor per step on the wire (msgpack record, before broker compression).

Trains the benchmark models with a TorchHook whose transport is replaced by a list, so every
published payload is measured exactly. Reports, per model: tensors per record, bytes per
tensor for records that carry only the schema id (the steady state), and amortised over all
records including the periodic name announcements.

    python bench/record_size.py --steps 300
"""

from __future__ import annotations

import argparse
import sys

import msgpack
import torch
from common import make_batches, make_model
from torch import nn

from tensorpulse.producers.torch import TorchHook


def measure(kind: str, steps: int) -> dict:
    torch.manual_seed(0)
    model, batches = make_model(kind), make_batches(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    payloads: list[bytes] = []
    hook = TorchHook(
        f"size-{kind}",
        "127.0.0.1:1",
        listen_for_actions=False,
        produce_fn=lambda topic, value, key: payloads.append(value),
    )
    hook.attach(model, opt)
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        hook.step(step, loss=loss)
    hook.close(10)
    steady, total_bytes, total_tensors = [], 0, 0
    for p in payloads:
        rec = msgpack.unpackb(p, raw=False, strict_map_key=False)
        t = rec.get("t")
        if not t:
            continue
        k = len(t["n"])
        total_bytes += len(p)
        total_tensors += k
        if "names" not in t and "q" not in t:
            steady.append((len(p), k))
    per_tensor = sum(b for b, _ in steady) / sum(k for _, k in steady)
    return {
        "model": kind,
        "records": len(payloads),
        "tensors": steady[0][1],
        "steady_bytes_per_tensor": per_tensor,
        "amortised_bytes_per_tensor": total_bytes / total_tensors,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    worst = 0.0
    for kind in args.model:
        r = measure(kind, args.steps)
        worst = max(worst, r["steady_bytes_per_tensor"])
        print(
            f"{kind:4s}: {r['tensors']} tensors/record; {r['steady_bytes_per_tensor']:.1f} B per tensor per step "
            f"(record header and loss included); {r['amortised_bytes_per_tensor']:.1f} B amortised over "
            f"{r['records']} records incl. name announcements and early-step quantiles"
        )
    print(f"budget 40 B per tensor per step: {'met' if worst <= 40 else 'NOT met'} (worst {worst:.1f} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
