#!/usr/bin/env python
"""Where TorchHook's time goes on one of the overhead table's models, by thread and by part.

`hook_overhead.py` gives the ratio; this says what makes it up, on the same model, batch, thread
count and save interval. One process trains two copies of the model (same weights, same batches),
one with TorchHook (its defaults, records counted by a `produce_fn` as in the table), in
alternating segments, and reports per step:

- wall time and the training thread's CPU time (`time.thread_time`) of each copy, and the CPU
  time of the process's other threads (torch's own intra-op threads, the hook's worker and
  publisher) beside each: the hook's cost on the training thread and what it adds off it;
- a py-spy sample of the hooked segments (`py-spy record --threads --nonblocking`, this
  process's pid), every sample put in one part by the frames on its stack: activation hooks
  (forward hooks and what they reduce), the weights' reduction, the gradients' reduction (with
  the activations kept for it), the weight sketch and deltas, `step()` and the hand-over to the
  worker, waiting for a background job, encoding records, handing them to the transport
  (`produce_fn`), other hook code, and training itself. The samples of the training thread show
  what the hook adds to its path; those of the hook's threads show the work moved off it.

    python bench/hook_breakdown.py --model resnet18 --interval 1 --threads 2 --steps 40
    python bench/hook_breakdown.py --model gpt --interval 10 --threads 1 --steps 60 --reps 2

Needs py-spy (`pip install py-spy`; without it, only the CPU-time table). Sampling stops no
thread (`--nonblocking`), but it takes a core's share: read the parts as shares, not the times.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
from common import MODELS, make_batches, make_model  # noqa: E402
from torch import nn  # noqa: E402

#: (part, substrings of a frame) in order: a sample goes to the first part one of whose
#: substrings is in a frame of its stack (frames read from the innermost out within each part).
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("waiting for a background job", ("Outcome._wait", "_wait_weights", "_wait_jobs")),
    ("weight sketch and deltas", ("sketch", "Sketch", "deltas_torch", "DeltaTracker", "_delta_tracker")),
    ("weights' reduction", ("_reduce_weights",)),
    ("gradients' (+ kept activations') reduction", ("Offloading._reduce", "_reduce_lean")),
    (
        "activation hooks",
        ("_make_hook", "_make_pre_hook", "_reduce_activation", "_on_forward", "_start_forward"),
    ),
    ("encoding records", ("RecordEncoder", "wire.py", "records.py", "recording.py", "Publisher._send")),
    ("handing to the transport", ("_Counter.__call__",)),
    (
        "step() and the hand-over",
        ("TorchHook.step", "_prefetch_weights", "_on_optimizer", "_submit", "_assemble"),
    ),
    ("optimizer.zero_grad, through the hook's wrapper", ("_guard_offloaded_reads.<locals>.zero_grad",)),
    ("other hook code", ("tensorpulse/",)),
)
#: a leaf frame that waits (the sample is no CPU work: the hook's threads waiting for work)
WAITS = ("wait (threading.py", "sleep", "PollingWorker._run (")
IDLE = "waiting for work (the hook's worker and publisher)"
TRAINING = "training (no hook frame)"


def classify(stack: str, training_thread: bool = True) -> str:
    """The part of one py-spy sample (its frames joined by ';', outermost first). py-spy samples
    waiting threads too (`--nonblocking` cannot tell): off the training thread a sample whose
    innermost frame waits (the worker's GIL-free poll, a queue's wait) is the thread idle."""
    frames = stack.split(";")
    if not training_thread and any(w in frames[-1] for w in WAITS):
        return IDLE
    for part, keys in PARTS:
        if any(k in f for f in reversed(frames) for k in keys):
            return part
    return TRAINING


def parse_raw(path: str, main_tid: int) -> dict[str, collections.Counter]:
    """py-spy's raw output -> samples per part, for the training thread and for every other one."""
    out = {"training thread": collections.Counter(), "other threads": collections.Counter()}
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack.startswith("thread ("):
                continue
            tid = int(stack[len("thread (") : stack.index(")")], 0)
            which = "training thread" if tid == main_tid else "other threads"
            out[which][classify(stack, tid == main_tid)] += int(count)
    return out


class Copy:
    """One copy of the model with its optimizer, its step counter, and (maybe) the hook."""

    def __init__(self, model: nn.Module, batches: list, hook: Any = None) -> None:
        self.model, self.batches, self.hook, self.step = model, batches, hook, 0
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()

    def run(self, n: int) -> tuple[float, float, float]:
        """`n` steps: (wall s, training-thread CPU s, other threads' CPU s)."""
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        for _ in range(n):
            x, y = self.batches[self.step % len(self.batches)]
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            if self.hook is not None:
                self.hook.step(self.step, loss=loss)
            self.opt.step()
            self.step += 1
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        return wall, cpu, time.process_time() - p0 - cpu


class _Counter:
    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, topic: str, value: bytes, key: bytes) -> None:  # "_count (breakdown" in PARTS
        self.bytes += len(value) + len(key or b"")


def _spy(steps_fn: Any, rate: int) -> tuple[str | None, Any]:
    """Run `steps_fn()` under py-spy sampling this process; (raw output path or None, its result)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return None, steps_fn()
    fd, path = tempfile.mkstemp(prefix="tp-breakdown-", suffix=".txt")
    os.close(fd)
    cmd = [spy, "record", "--pid", str(os.getpid()), "--threads", "--nonblocking", "--format", "raw"]
    proc = subprocess.Popen(
        [*cmd, "--rate", str(rate), "-o", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(1.0)  # py-spy attaches; not a synchronisation of results, only of its start
    try:
        result = steps_fn()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return path, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="resnet18")
    ap.add_argument("--interval", type=int, default=1, help="save interval")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batch", type=int, help="batch size (default per model)")
    ap.add_argument("--steps", type=int, default=40, help="steps per segment")
    ap.add_argument("--reps", type=int, default=2, help="segment pairs (base, hooked / hooked, base)")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--raw", help="append py-spy's raw samples (stacks and counts) to this file")
    args = ap.parse_args()
    from tensorpulse.producers.torch import TorchHook

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_model(args.model)
    batches = make_batches(args.model, batch=args.batch)
    counter = _Counter()
    hook = TorchHook("breakdown", save_interval=args.interval, listen_for_actions=False, produce_fn=counter)
    base, hooked = Copy(model, batches), Copy(copy.deepcopy(model), batches)
    hook.attach(hooked.model, hooked.opt)
    hooked.hook = hook
    base.run(5)
    hooked.run(10 * args.interval)  # the first 10 saves add quantiles and compile kernels: not measured
    hook.flush(30)
    totals = {"base": [0.0, 0.0, 0.0], "hook": [0.0, 0.0, 0.0]}
    main_tid = threading.get_native_id()
    samples: dict[str, collections.Counter] = {
        "training thread": collections.Counter(),
        "other threads": collections.Counter(),
    }
    for r in range(args.reps):
        for which in ("hook", "base") if r % 2 else ("base", "hook"):
            if which == "base":
                got = base.run(args.steps)
            else:
                path, got = _spy(lambda: hooked.run(args.steps), args.rate)
                if path is not None:
                    for k, c in parse_raw(path, main_tid).items():
                        samples[k].update(c)
                    if args.raw:
                        with open(path) as src, open(args.raw, "a") as dst:
                            dst.write(src.read())
                    os.unlink(path)
            totals[which] = [a + b for a, b in zip(totals[which], got, strict=True)]
    hook.close(10)
    n = args.steps * args.reps
    b, h = ([1e3 * v / n for v in totals[k]] for k in ("base", "hook"))
    print(
        f"{args.model}, every {args.interval}, {args.threads} thread(s), batch {len(batches[0][0])}"
        f"{'' if args.model != 'gpt' else ' x 256 tokens'}, {n} steps per copy; offloaded (the default "
        f"'auto': threads x local ranks < CPUs): {torch.get_num_threads() < (os.cpu_count() or 1)}"
    )
    print(f"{'ms per step':34} {'no hook':>9} {'hook':>9} {'hook - no hook':>15}")
    for i, what in enumerate(("wall", "training thread CPU", "other threads' CPU")):
        print(f"{what:34} {b[i]:9.2f} {h[i]:9.2f} {h[i] - b[i]:+15.2f}")
    print(f"wall ratio {h[0] / b[0]:.3f}; records {counter.bytes / max(n, 1):.0f} B per step")
    for thread, counts in samples.items():
        total = sum(counts.values())
        if not total:
            continue
        print(f"\npy-spy samples, {thread} ({total}):")
        for part, c in counts.most_common():
            print(f"  {part:52} {c:6d}  {100 * c / total:5.1f} %")


if __name__ == "__main__":
    main()
