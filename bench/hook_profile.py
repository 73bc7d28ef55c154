#!/usr/bin/env python
"""Where TorchHook's step-time overhead goes, on the benchmark MLP (one torch thread).

`hook_overhead.py` compares whole tools; this breaks our own hook down, in one process:

- kernels: microseconds per reduction of one 401k-element float32 tensor (the MLP's first weight):
  torch's single-statistic ops, the torch path of the hook (six statistics), the numba kernel;
  and a weight delta against a previous copy, by the torch pass and by the numba kernel.
- contention: the step time of plain training beside a background thread of this process that
  (a) calls a ~20 us torch reduction in a loop, (b) sleeps 0.5 ms in a loop (each wake-up takes
  the GIL), (c) runs the numba kernel over 32 MiB of its own (long calls without the GIL, no data
  shared with training), against no thread: what sharing the interpreter, and the machine, with
  a helper thread costs. Then a thread handed one job per step and waited for at the next: woken
  for each (a ThreadPoolExecutor), with (d) a job that does nothing (one wake-up, one take of the
  GIL) or (e) one that calls the numba kernel on 64 floats (the call gives the GIL back and takes
  it again); and the hook's PollingWorker, which looks for (e)'s jobs on its own clock, (f) with
  `time.sleep` between looks (each look takes the GIL). Then 0.1 ms of busy Python per step, (h)
  as the polling thread's job or (i) on the training thread itself: what Python costs training
  when it runs on the other core. Last, (j) (e)'s job handed to a thread that stays inside a
  numba loop and never takes the GIL (a diagnostic: the hook's worker used to wait that way,
  producers/native_wait.py, until issue 21 found it earned less than 0.02 of a step).
- floor: the same ratio for the least a hook that reads every weight and gradient once per step
  (or every --interval steps) can cost: one numba kernel call over them, on the training thread or on a background thread;
  and on a background thread over a copy of the same bytes that training never touches (what
  reading training's own data from the other core adds), summing them only instead of the six
  statistics (what the kernel's arithmetic adds to reading them), and handing the thread a job
  that reads 64 floats (the hand-over alone). The variants and the base take turns within each
  repetition, in rotating order. One row hands the kernel over every weight and gradient to a
  thread that stays in numba and never takes the GIL (the hand-over without Python). One more row
  has no reading at all: no-op hooks where TorchHook registers its own (torch's dispatch of
  module and optimizer hooks).
- hook: the mean step-time ratio of TorchHook(save_interval=1, or --interval) against an
  interleaved no-hook copy, reduced on the training thread or offloaded, with the numba kernels
  or torch ops; and two diagnostics, not modes of the hook: offloaded to a ThreadPoolExecutor
  instead of its polling worker, and with the numba kernel replaced by a stub that reads no tensor and writes plausible
  sums (what the hook costs besides reading and reducing the tensors). Then the training
  thread's time per step in each of the hook's entry points (offloaded, numba).
- phases (only when named): the training thread's CPU time per step above an interleaved no-hook
  copy, by position in the save cycle of TorchHook(save_interval=--interval, default 10): where
  in the cycle a save costs training, including the steps after it (records encoded on the
  publisher thread) and the step before it (the hooks registered again).
- unsaved: the same ratio over steps that the hook does not save (it saved the first step only):
  with the hook unhooking itself between saves, its default, and with its hooks kept on the
  model and optimizer (a diagnostic: how the hook ran before).

    python bench/hook_profile.py                 # all but phases, about six minutes
    python bench/hook_profile.py phases --interval 10 --steps 200 --reps 10
    python bench/hook_profile.py hook --reps 5
    python bench/hook_profile.py hook --interval 10 --steps 200 --reps 10
    python bench/hook_profile.py floor --interval 10 --steps 200 --reps 10

Ratios from one run on a shared machine: repeat a run before trusting a difference below 0.05.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import make_batches, make_model  # noqa: E402
from hook_jobs import GilFreeFloor, GilFreeKernelJob, KernelOnly, NoopHooks, PerStepJob, python_for  # noqa: E402
from torch import nn  # noqa: E402


def _per_call_us(fn: Callable[[], Any], n: int = 200) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def kernels() -> None:
    from tensorpulse.producers import stats_numba
    from tensorpulse.producers.stats_host import transfer
    from tensorpulse.producers.stats_torch import reduce_on_device

    x = torch.randn(512 * 784)
    rows = [
        ("torch sum", lambda: x.sum()),
        ("torch dot(x, x)", lambda: torch.dot(x, x)),
        ("torch aminmax", lambda: torch.aminmax(x)),
        ("torch vector_norm(ord=1)", lambda: torch.linalg.vector_norm(x, 1.0)),
        ("torch count_nonzero", lambda: torch.count_nonzero(x)),
    ]
    os.environ["TENSORPULSE_NUMBA"] = "0"
    rows.append(("hook, torch path (6 statistics)", lambda: transfer([reduce_on_device(x)])))
    from tensorpulse.producers.deltas_torch import _delta

    prev = x + 1e-3 * torch.randn(x.shape)
    rows.append(("weight delta, torch pass", lambda: _delta(x, prev, 1e-3)))
    if stats_numba.available():
        arr = x.numpy()
        rows.append(("numba kernel (6 statistics)", lambda: stats_numba.moments([arr])))
        rows.append(
            (
                "weight delta, numba kernel",
                lambda: stats_numba.deltas_at([x.data_ptr()], [prev.data_ptr()], [x.numel()], 1e-3),
            )
        )
    else:
        print("numba is not installed: pip install 'tensorpulse[fast]'")
    base = None
    print(f"\nkernels: one float32 tensor of {x.numel()} elements, us per call")
    for name, fn in rows:
        us = _per_call_us(fn)
        base = base or us
        print(f"  {name:34s} {us:8.1f} us  {us / base:5.1f}x sum")
    os.environ.pop("TENSORPULSE_NUMBA", None)


class _Trainer:
    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = make_model("mlp")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loss_fn = nn.CrossEntropyLoss()
        self.batches = make_batches("mlp")
        self.step = 0

    def run(self, n: int, hook: Any = None) -> float:
        """Mean seconds per step over `n` steps."""
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = self.batches[self.step % len(self.batches)]
            self.opt.zero_grad()
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            if hook is not None:
                hook.step(self.step, loss=loss)
            self.opt.step()
            self.step += 1
        return (time.perf_counter() - t0) / n


def _interleaved(base: Callable[[], float], tool: Callable[[], float], reps: int) -> float:
    """Median over repetitions of mean-step-time ratios tool/base, segments alternating order."""
    ratios = []
    for r in range(reps):
        if r % 2:
            t, b = tool(), base()
        else:
            b, t = base(), tool()
        ratios.append(t / b)
    return statistics.median(ratios)


def contention(steps: int, reps: int) -> None:
    trainer = _Trainer()
    trainer.run(20)
    work = torch.randn(400_000)

    def with_thread(body: Callable[[], None]) -> Callable[[], float]:
        def segment() -> float:
            stop = threading.Event()

            def loop() -> None:
                while not stop.is_set():
                    body()

            th = threading.Thread(target=loop, daemon=True)
            th.start()
            try:
                return trainer.run(steps)
            finally:
                stop.set()
                th.join()

        return segment

    bodies: list[tuple[str, Callable[[], Any]]] = [
        ("a ~20 us torch reduction in a loop", lambda: work.sum()),
        ("sleep 0.5 ms in a loop", lambda: time.sleep(0.0005)),
    ]
    from tensorpulse.producers import stats_numba

    if stats_numba.available():
        own = np.ones(8 << 20, dtype=np.float32)  # 32 MiB of its own: no data shared with training
        bodies.append(("the numba kernel over its own 32 MiB", lambda: stats_numba.moments([own])))
    print(f"\ncontention: MLP step time beside a background thread / alone ({reps} reps of {steps} steps)")
    for name, body in bodies:
        ratio = _interleaved(lambda: trainer.run(steps), with_thread(body), reps)
        print(f"  {name:40s} {ratio:5.3f}x")
    jobs: list[tuple[str, Callable[[], Any], str]] = [("a job that does nothing", lambda: None, "woken")]
    if stats_numba.available():
        tiny = np.ones(64, dtype=np.float32)
        kernel = ("a job that calls the kernel on 64 floats", lambda: stats_numba.moments([tiny]))
        jobs += [(*kernel, "woken"), (*kernel, "sleep")]
    python = ("a job of 0.1 ms of Python (no GIL release)", lambda: python_for(1e-4))
    jobs += [(*python, "sleep"), (*python, "inline")]
    hows = {
        "woken": "one thread woken per step",
        "sleep": "polling with time.sleep (the hook's)",
        "inline": "no thread: on the training thread",
    }
    for name, body, how in jobs:
        tooled = _Trainer()
        hook = PerStepJob(body, polling=how != "woken", inline=how == "inline")
        tooled.run(20, hook)
        ratio = _interleaved(lambda: trainer.run(steps), lambda t=tooled, h=hook: t.run(steps, h), reps)
        print(f"  {hows[how]:36s} {name:41s} {ratio:5.3f}x")
        hook.close()
    if stats_numba.available():
        tooled = _Trainer()
        gil_free = GilFreeKernelJob(stats_numba.args([tiny]))
        tooled.run(20, gil_free)
        ratio = _interleaved(lambda: trainer.run(steps), lambda t=tooled, h=gil_free: t.run(steps, h), reps)
        print(f"  {'a thread that never takes the GIL':36s} {kernel[0]:41s} {ratio:5.3f}x")
        gil_free.close()


def floor(steps: int, reps: int, interval: int = 1) -> None:
    """The floor rows side by side: every repetition runs the base and each variant once, in an
    order that rotates, so that a slow spell of the machine is spread over all of them."""
    from tensorpulse.producers import stats_numba

    if not stats_numba.available():
        print("\nfloor: numba is not installed: pip install 'tensorpulse[fast]'")
        return
    every = "per step" if interval == 1 else f"every {interval} steps"
    print(f"\nfloor: one kernel call over all weights and gradients {every} / no hook ({reps} reps of {steps} steps)")
    variants: list[tuple[str, Callable[[nn.Module, Any], Any]]] = [
        ("training thread", lambda m, o: KernelOnly(m, False, False, interval)),
        ("background thread", lambda m, o: KernelOnly(m, True, False, interval)),
        ("background thread, over a copy of its own", lambda m, o: KernelOnly(m, True, True, interval)),
        ("background thread, summing them only", lambda m, o: KernelOnly(m, True, False, interval, "sum")),
        ("background thread, a hand-over only (64 floats)", lambda m, o: KernelOnly(m, True, False, interval, "handover")),
        ("thread that never takes the GIL", lambda m, o: GilFreeFloor(m, interval)),
        ("training thread, no-op hooks where TorchHook hooks", NoopHooks),
    ]
    base = _Trainer()
    base.run(20)
    runs: list[tuple[_Trainer, Any]] = []
    for _, make in variants:
        tooled = _Trainer()
        hook = make(tooled.model, tooled.opt)
        tooled.run(20, hook)
        runs.append((tooled, hook))
    ratios: list[list[float]] = [[] for _ in variants]
    order = list(range(-1, len(variants)))  # -1: the base
    for r in range(reps):
        times: dict[int, float] = {}
        for i in order[r % len(order) :] + order[: r % len(order)]:
            times[i] = base.run(steps) if i < 0 else runs[i][0].run(steps, runs[i][1])
        for i in range(len(variants)):
            ratios[i].append(times[i] / times[-1])
    for (where, _), (_, hook), rs in zip(variants, runs, ratios, strict=True):
        hook.close()
        print(f"  on the {where:52s} {statistics.median(rs):5.3f}x")


def _wrap_timers(hook: Any, names: list[str], totals: dict[str, float]) -> None:
    for name in names:
        fn = getattr(hook, name)

        def timed(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals[_name] += time.perf_counter() - t0

        setattr(hook, name, timed)


def _stub_kernel(addrs, sizes, chunk, out, act_of, dims, los, his, offs, counts) -> None:  # noqa: ANN001
    """In place of the numba batch kernel: no tensor read, sums of a mean-0, std-1 tensor without
    zeros, and no active unit (so every result takes the kernel's path, never the torch one)."""
    out[:] = 0.0
    out[:, 1] = sizes  # sum of squares: n
    out[:, 5] = sizes  # non-zero count
    counts[:] = 0.0


def _stub_host_kernel(addrs, sizes, chunk, out, act_of, dims, los, his, offs, counts, thr, ratio, raw, nonzero, below, floats, zeros):  # noqa: ANN001, E501
    """In place of the numba kernel that also checks and arranges its results (see _stub_kernel)."""
    _stub_kernel(addrs, sizes, chunk, out, act_of, dims, los, his, offs, counts)
    raw[:] = 0.0
    raw[:, 2] = sizes
    nonzero[:] = sizes
    below[:] = np.diff(offs)[:, None]  # every unit below every threshold
    floats[:] = 0.0
    floats[:, 1] = 1.0  # std
    zeros[:] = 0
    return True


def hook_variants(steps: int, reps: int, interval: int = 1) -> None:
    from tensorpulse.producers import stats_numba
    from tensorpulse.producers.torch import TorchHook

    torch.set_num_threads(1)
    variants = [(False, "0"), (True, "0")]
    if stats_numba.available():
        variants += [(False, "1"), (True, "1"), (True, "pool"), (True, "stub")]
    base = _Trainer()
    print(f"\nhook: TorchHook(save_interval={interval}) / no hook, mean step time ({reps} reps of {steps} steps)")
    for offload, numba in variants:
        os.environ["TENSORPULSE_NUMBA"] = "0" if numba == "0" else "1"
        kernel, host_kernel = stats_numba._get(), stats_numba._host_kernel
        if numba == "stub":
            stats_numba._kernel, stats_numba._host_kernel = _stub_kernel, _stub_host_kernel
        tooled = _Trainer()
        hook = TorchHook(
            "profile", save_interval=interval, listen_for_actions=False, produce_fn=lambda *a: None, offload=offload
        )
        totals: dict[str, float] = collections.defaultdict(float)
        entry = ["step", "_on_forward_start", "_on_optimizer_step", "_wait_weights", "_reduce_activation"]
        _wrap_timers(hook, entry, totals)  # before attach, which registers the bound methods
        hook.attach(tooled.model, tooled.opt)
        if numba == "pool":  # before the first job creates the hook's PollingWorker
            from concurrent.futures import ThreadPoolExecutor

            hook._pool = ThreadPoolExecutor(1)  # type: ignore[assignment]
        base.run(20)
        tooled.run(20, hook)
        totals.clear()
        ratio = _interleaved(lambda: base.run(steps), lambda t=tooled, h=hook: t.run(steps, h), reps)
        hooked_steps = reps * steps
        hook.close()
        stats_numba._kernel, stats_numba._host_kernel = kernel, host_kernel
        where = "background" if offload else "inline"
        name = {
            "0": "torch ops",
            "1": "numba",
            "pool": "numba, on a ThreadPoolExecutor",
            "stub": "numba kernel stubbed (reads no tensor)",
        }[numba]
        print(f"  {where:11s} {name:38s} {ratio:5.3f}x")
        if offload and numba == "1":
            for name in entry:
                print(f"      training thread in {name:22s} {totals[name] / hooked_steps * 1e3:6.3f} ms/step")
    os.environ.pop("TENSORPULSE_NUMBA", None)


def phases(steps: int, reps: int, interval: int) -> None:
    """The training thread's CPU time per step of TorchHook(save_interval=interval) above the same
    step of an interleaved no-hook copy, by position in the save cycle (0: the saved step).

    Why CPU time of the training thread (time.thread_time): it leaves out the waits (the GIL,
    the weights), so what it shows is work done, or made slower, on the training thread itself:
    the hook's Python, torch's dispatch of its hooks, and cache misses on data that another
    thread touched.
    """
    from tensorpulse.producers.torch import TorchHook

    cycle = max(1, interval)
    base, tooled = _Trainer(), _Trainer()
    hook = TorchHook("profile", save_interval=cycle, listen_for_actions=False, produce_fn=lambda *a: None)
    hook.attach(tooled.model, tooled.opt)
    copies = {"base": (base, None), "hook": (tooled, hook)}
    seen: dict[str, list[list[int]]] = {key: [[] for _ in range(cycle)] for key in copies}
    wall = dict.fromkeys(copies, 0.0)

    def run(key: str, n: int, timed: bool = True) -> None:
        trainer, hk = copies[key]
        t0 = time.perf_counter()
        for _ in range(n):
            c0 = time.thread_time_ns()
            trainer.run(1, hk)
            if timed:
                seen[key][(trainer.step - 1) % cycle].append(time.thread_time_ns() - c0)
        if timed:
            wall[key] += time.perf_counter() - t0

    run("base", 2 * cycle, timed=False)
    run("hook", 2 * cycle, timed=False)
    n = max(cycle, steps - steps % cycle)  # whole cycles per segment
    for r in range(reps):
        for key in ("hook", "base") if r % 2 else ("base", "hook"):
            run(key, n)
    hook.close()
    print(
        f"\nphases: training-thread CPU per step above no hook, by position in a cycle of {cycle} "
        f"(TorchHook(save_interval={cycle}); {reps} reps of {n} steps; median over steps)"
    )
    total = 0.0
    for k in range(cycle):
        b, h = statistics.median(seen["base"][k]) / 1e6, statistics.median(seen["hook"][k]) / 1e6
        total += h - b
        what = "saved" if k == 0 else ("before a save" if k == cycle - 1 else "")
        print(f"  step {k:3d} {what:14s} {h - b:+7.3f} ms  (no hook {b:.3f} ms)")
    mean_base = wall["base"] / (reps * n) * 1e3
    print(f"  per cycle      {total:+7.3f} ms of CPU; {total / cycle / mean_base:+.3f} of a {mean_base:.3f} ms step")
    print(f"  mean step time ratio, wall clock  {wall['hook'] / wall['base']:5.3f}x")


def unsaved(steps: int, reps: int) -> None:
    """Steps that are not saved, only: the hook saved step 0 and saves nothing after it."""
    from tensorpulse.producers.torch import TorchHook

    torch.set_num_threads(1)
    base = _Trainer()
    base.run(20)
    print(f"\nunsaved: steps that TorchHook does not save / no hook, mean step time ({reps} reps of {steps} steps)")
    for kept in (False, True):
        tooled = _Trainer()
        hook = TorchHook("profile", save_interval=10**9, listen_for_actions=False, produce_fn=lambda *a: None)
        hook.attach(tooled.model, tooled.opt)
        if kept:  # a diagnostic: as before 2026-11-24 08:59 UTC, the hooks stay on between saves
            hook._disarm = lambda: None  # type: ignore[method-assign]
        tooled.run(20, hook)
        ratio = _interleaved(lambda: base.run(steps), lambda t=tooled, h=hook: t.run(steps, h), reps)
        hook.close()
        name = "hooks kept on the model and optimizer" if kept else "the hook unhooked between saves (default)"
        print(f"  {name:50s} {ratio:5.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "parts",
        nargs="*",
        metavar="PART",
        help="kernels, contention, floor, hook, unsaved, phases (default: all but phases)",
    )
    ap.add_argument("--steps", type=int, default=100, help="timed steps per segment")
    ap.add_argument("--reps", type=int, default=6, help="repetitions (segment pairs)")
    ap.add_argument(
        "--interval",
        type=int,
        default=None,
        help="the save interval of the `hook` and `floor` parts (default 1) and of `phases` (default 10)",
    )
    args = ap.parse_args()
    names = ["kernels", "contention", "floor", "hook", "unsaved", "phases"]
    parts = args.parts or names[:-1]
    unknown = sorted(set(parts) - set(names))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(names)}")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs")
    if "kernels" in parts:
        kernels()
    if "contention" in parts:
        contention(args.steps, args.reps)
    interval = args.interval or 1
    if "floor" in parts:
        floor(args.steps, args.reps, interval)
    if "hook" in parts:
        hook_variants(args.steps, args.reps, interval)
    if "unsaved" in parts:
        unsaved(args.steps, args.reps)
    if "phases" in parts:
        phases(args.steps, args.reps, args.interval or 10)


if __name__ == "__main__":
    main()
