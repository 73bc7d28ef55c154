#!/usr/bin/env python
"""Extra memory of TorchHook on CPU MLPs of 12.6M, 50.4M and 201M parameters, beside no hook, in one run.

Method: one child process per (model, configuration, repetition), started by this driver in
an interleaved order (no-hook, then each configuration, per model and repetition), so that
every configuration meets the same machine. A child builds a 12-layer MLP (width 1024, 2048 or
4096, float32), SGD, a few fixed batches, trains `--warmup` steps without any hook, then (for a
hooked configuration) imports tensorpulse and attaches the hook, and trains `--steps` steps,
saving every step. It reports:

* persistent: resident memory (VmRSS) at the end, before `close()`;
* peak: the process's peak resident memory (VmHWM);
* private: the anonymous part of the persistent figure (RssAnon: memory only this process
  uses), and the peak less the file-backed pages (RssFile: shared libraries' code, such as
  numba's LLVM, which the kernel shares between processes and can drop and reload);
* step: the median step time of its last half of steps;
* checkpoints: VmRSS after the imports, after attach, after the first saved step.

Extra memory = the hooked child's value minus the no-hook child's of the same model and
repetition; the step-time ratio likewise. The table gives the median over repetitions and the
range. Records are handed to a `produce_fn` that keeps only their byte count, so Kafka's
buffers are not in these figures unless `--bootstrap` names a broker (then the hook's own
producer is used, as in production).

    python bench/hook_memory.py                                  # every model and configuration
    python bench/hook_memory.py --models 50M --configs defaults exact --steps 20 --reps 1

A loaded machine, on purpose: `--burners N` runs N busy-looping Python processes (at this
driver's nice level) beside every child, hooked or not, so that the hook's background thread
is slowed as on a machine shared with other work (the gradient hand-over's peak depends on it:
bench/README.md "The hook's memory"):

    python bench/hook_memory.py --models 201M --configs defaults --burners 2

The budget (issue 23): extra <= 64 MiB + 5 % of the tracked tensors' bytes, persistent and at
peak.

numba's LLVM: the hook hands back the pages of llvmlite's library that loading its kernels
touched (producers/code_pages.py), but the kernel keeps those that another process maps too,
as shared memory counted in each process's VmRSS. The checkpoint lines give llvmlite's resident
and shared MiB at the end. On a machine where other processes use the same numba install, the
figures of one training process alone come from giving the children a private copy:

    cp -r "$(python -c 'import llvmlite, os; print(os.path.dirname(llvmlite.__file__))')" /tmp/own/
    PYTHONPATH=/tmp/own python bench/hook_memory.py --configs defaults
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
#: Model name -> MLP width (12 square layers: 12 * width^2 weights).
MODELS = {"12M": 1024, "50M": 2048, "201M": 4096}
LAYERS = 12
BATCH = 32
#: Configuration -> (TorchHook keyword arguments, environment).
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "defaults": ({}, {}),
    "exact": ({"delta_method": "exact"}, {}),
    "no-deltas": ({"track_deltas": ()}, {}),
    "no-offload": ({"offload": False}, {}),
    "no-numba": ({}, {"TENSORPULSE_NUMBA": "0"}),
    # The plain torch path on the training thread: what a GPU model runs (there numba never loads).
    "torch-path": ({"offload": False}, {"TENSORPULSE_NUMBA": "0"}),
    "no-activations": ({"_attach": {"activations": False}}, {}),
    # Before the backward waited for the job holding the old gradients (bench-only: the wait
    # turned off on the hook object, to compare the two in one run).
    "no-held-wait": ({"_no_held_wait": True}, {}),
}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _llvm_mib() -> tuple[float, float]:
    """(resident, of which shared with other processes) MiB of llvmlite's mappings (numba's LLVM):
    pages another process maps too (another rank, another numba user) stay resident after the
    hook's release (producers/code_pages.py) and are counted once per machine."""
    rss = shared = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):
                inside = "/llvmlite/" in line
            elif inside and head == "Rss:":
                rss += int(line.split()[1])
            elif inside and head in ("Shared_Clean:", "Shared_Dirty:"):
                shared += int(line.split()[1])
    return rss / 1024, shared / 1024


# ----------------------------------------------------------------------------- child
def child(model_name: str, config: str | None, steps: int, warmup: int, bootstrap: str | None) -> dict[str, Any]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    width = MODELS[model_name]
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, width, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(4)]
    loss_fn = nn.CrossEntropyLoss()

    def train(step: int, hook: Any = None) -> float:
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if hook is not None:
            hook.step(step, loss=loss)
        opt.step()
        return time.perf_counter() - t0

    for s in range(warmup):
        train(s)
    marks = {"baseline": _status_mib("VmRSS")}
    hook = None
    sent = [0]
    if config is not None:
        from tensorpulse.producers.torch import TorchHook

        marks["imports"] = _status_mib("VmRSS")
        kwargs, _ = CONFIGS[config]
        kwargs = dict(kwargs)
        attach_kwargs = kwargs.pop("_attach", {})
        no_held_wait = kwargs.pop("_no_held_wait", False)

        def produce(topic: str, value: bytes, key: bytes | None) -> None:
            sent[0] += len(value)

        hook = TorchHook(
            f"mem-{model_name}-{config}",
            bootstrap,
            produce_fn=None if bootstrap else produce,
            **kwargs,
        )
        hook.attach(model, opt, **attach_kwargs)
        if no_held_wait:
            hook._wait_for_held_gradients = lambda: None  # the bench's own switch (CONFIGS)
        marks["attach"] = _status_mib("VmRSS")
    times = []
    for s in range(warmup, warmup + steps):
        times.append(train(s, hook))
        if s == warmup and hook is not None:
            marks["first save"] = _status_mib("VmRSS")
    result = {
        "persistent": _status_mib("VmRSS"),
        "peak": _status_mib("VmHWM"),
        "anon": _status_mib("RssAnon"),
        "file": _status_mib("RssFile") + _status_mib("RssShmem"),
        "llvm": _llvm_mib(),
        "step": statistics.median(times[len(times) // 2 :]),
        "marks": marks,
        "bytes": sent[0],
        "tracked": sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("weight"))
        / 2**20,
    }
    if hook is not None:
        st = hook.stats()
        result["waits"] = (st.get("gradient_waits", 0), st.get("gradient_wait_s", 0.0))
        hook.close()
    return result


# ----------------------------------------------------------------------------- driver
def run_child(model: str, config: str | None, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    if config is not None:
        env.update(CONFIGS[config][1])
    cmd = [sys.executable, __file__, "--child", model, config or "-", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.bootstrap:
        cmd += ["--bootstrap", args.bootstrap]
    burners = [
        subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.burners)
    ]  # a loaded machine (module docstring)
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    if out.returncode != 0:
        raise SystemExit(f"child {model}/{config or 'no-hook'} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.0f}"
    return f"{med:.0f} ({min(values):.0f}..{max(values):.0f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=40, help="saved steps per child (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="steps without a hook first (default 3)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of every child (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    p.add_argument("--bootstrap", help="publish to this Kafka cluster instead of a counting produce_fn")
    p.add_argument("--burners", type=int, default=0, help="busy-looping processes beside every child (default 0)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        model, config = args.child
        torch_threads = args.threads
        import torch

        torch.set_num_threads(torch_threads)
        print(json.dumps(child(model, None if config == "-" else config, args.steps, args.warmup, args.bootstrap)))
        return 0

    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for model in args.models:
        for rep in range(args.reps):
            for config in [None, *args.configs]:
                name = config or "no-hook"
                t0 = time.monotonic()
                r = run_child(model, config, args)
                raw.setdefault(model, {}).setdefault(name, []).append(r)
                print(
                    f"  {model:>5} {name:<15} rep {rep + 1}/{args.reps}: rss {r['persistent']:.0f} MiB, "
                    f"peak {r['peak']:.0f} MiB, step {r['step'] * 1e3:.1f} ms ({time.monotonic() - t0:.0f} s, "
                    f"load {os.getloadavg()[0]:.1f})"
                    + (" backward waited {} times, {:.2f} s".format(*r["waits"]) if "waits" in r else ""),
                    file=sys.stderr,
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    print(
        "| model | tracked (weights) | budget | configuration | extra persistent MiB | extra peak MiB "
        "| private persistent | private peak | step ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model, by in raw.items():
        base = by["no-hook"]
        tracked = base[0]["tracked"]
        budget = 64 + 0.05 * tracked
        for config in args.configs:
            runs = by[config]
            pers = [r["persistent"] - b["persistent"] for r, b in zip(runs, base, strict=True)]
            peak = [r["peak"] - b["peak"] for r, b in zip(runs, base, strict=True)]
            anon = [r["anon"] - b["anon"] for r, b in zip(runs, base, strict=True)]
            anon_peak = [(r["peak"] - r["file"]) - (b["peak"] - b["file"]) for r, b in zip(runs, base, strict=True)]
            ratio = [r["step"] / b["step"] for r, b in zip(runs, base, strict=True)]
            rmed = statistics.median(ratio)
            print(
                f"| {model} | {tracked:.0f} MiB | {budget:.0f} MiB | {config} | {_cell(pers)} | {_cell(peak)} "
                f"| {_cell(anon)} | {_cell(anon_peak)} | {rmed:.2f} ({min(ratio):.2f}..{max(ratio):.2f}) |"
            )
    print()
    print("RSS checkpoints (MiB above the no-hook baseline after warm-up, first repetition):")
    for model, by in raw.items():
        for config in args.configs:
            marks = by[config][0]["marks"]
            base = marks["baseline"]
            llvm = by[config][0].get("llvm", (0.0, 0.0))
            print(
                f"  {model:>5} {config:<15} "
                + ", ".join(f"{k} +{v - base:.0f}" for k, v in marks.items() if k != "baseline")
                + f"; llvmlite's pages at the end {llvm[0]:.0f} MiB ({llvm[1]:.0f} shared)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
