#!/usr/bin/env python
"""Step-time overhead of TorchHook beside the peers (TensorBoard, wandb, smdebug), in one run.

Method: one child process per (tool, model, save interval), all started by this driver. Inside a
child, two copies of the model with the same initialisation train on the same batches; only one
copy carries the tool. They run in alternating segments (base, tool, tool, base, base, tool, ...),
so both see the same drift of a shared machine, and each repetition gives two ratios, tool/base:
of the mean step time (the save steps amortised: throughput) and of the median step time (a
typical step). A repetition during which processes outside this run used more than
--max-foreign of the machine is dropped (all are kept, and the row marked noisy, if none is
clean); each row reports the median of its repetitions' ratios. Before its repetitions, each
child runs both copies once for --startup-saves saves' worth of steps (10 by default), outside
the ratios, so that the rows are steady state: tensorpulse adds p5/p95 of the gradients at its
first 10 saves (`quantile_steps`), which would otherwise fall into the first repetition at every
10 steps; that segment's extra time is reported as the cell's start-up. Bytes per step: files the peers
wrote; for tensorpulse the records handed to Kafka (key + value, before compression). Peak memory:
growth of the child's peak RSS once the tool is set up, plus the RSS of processes the tool
started (wandb's service).

    python bench/hook_overhead.py                                    # full table (long: see README)
    python bench/hook_overhead.py --models mlp --intervals 1 --tools no-hook tensorpulse --steps 20 --reps 1
    python bench/hook_overhead.py --models gpt resnet18 --tools no-hook tensorpulse --threads 1 2 --aa-once

Models: the peer table's MLP and small CNN (batch 128), and issue 20's real ones (real_models.py):
a 6-layer, 6-head, 384-wide GPT on 256-token blocks (batch 4) and ResNet-18 on 64x64 images (batch
32); --batch overrides the batch size. --threads takes several counts: each is a cell of its own.

Peers that are not installed (bench/setup_peers.sh installs them) are reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SMDEBUG_PYTHON = os.path.join(HERE, ".venv-smdebug", "bin", "python")
if HERE not in sys.path:  # common.py and peers.py, also when this file is loaded as a module
    sys.path.insert(0, HERE)

from common import MODELS  # noqa: E402
from overhead_table import format_table, overhead_check, summarise, target_check  # noqa: E402


# ----------------------------------------------------------------------------- one cell (child process)
def _train(model, loss_fn, opt, batches, n: int, step0: int, tool=None) -> list[float]:
    """`n` training steps; seconds per step (zero_grad .. optimizer step, the tool's call included)."""
    times = []
    for i in range(n):
        step = step0 + i
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if tool is not None:
            tool.after_backward(step, loss)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def run_cell(
    tool_name: str,
    kind: str,
    interval: int,
    *,
    steps: int,
    warmup: int,
    reps: int,
    threads: int,
    workdir: str,
    batch: int | None = None,
    bootstrap: str | None = None,
    tree_root: int | None = None,
    startup_saves: int = 0,
) -> dict[str, Any]:
    """Measure one (tool, model, interval) cell in this process; see the module docstring.
    `tree_root`: the pid whose process tree is this benchmark (CPU used outside it is foreign).
    `startup_saves`: both copies first run that many saves' worth of steps, outside the ratios."""
    import torch
    from common import children_rss_mb, cpu_snapshot, foreign_share, make_batches, make_model, peak_rss_mb
    from peers import make_tool
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = make_model(kind)
    hooked = copy.deepcopy(base)
    batches = make_batches(kind, batch=batch)
    loss_b, loss_h = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    opt_b = torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9)
    opt_h = torch.optim.SGD(hooked.parameters(), lr=0.01, momentum=0.9)
    # Both copies train once before the tool exists: their buffers are allocated and the peak
    # RSS from here on is what the tool adds.
    _train(base, loss_b, opt_b, batches, max(warmup, 10), 0)
    _train(hooked, loss_h, opt_h, batches, max(warmup, 10), 0)
    rss_ref = peak_rss_mb()
    t0 = time.perf_counter()
    tool = make_tool(tool_name, hooked, loss_h, opt_h, workdir, interval, bootstrap)
    setup_s = time.perf_counter() - t0

    # Start-up, outside the ratios: what a tool does only at its first saves (tensorpulse: p5/p95
    # during the first `quantile_steps` saves, numba compiles) would otherwise weigh on the first
    # repetition only, and the more so the rarer the saves. Its cost is reported on its own. The
    # base copy runs at most 20 of those steps (its mean stands for all): at every 10 steps of a
    # model with 1 s steps, running it for all 100 would double this segment for nothing.
    start = startup_saves * interval
    startup_h = _train(hooked, loss_h, opt_h, batches, start, 0, tool)
    startup_b = _train(base, loss_b, opt_b, batches, min(start, 20), 0)
    startup_extra_s = sum(startup_h) - (statistics.fmean(startup_b) * start if startup_b else 0.0)
    tool.flush()
    bytes0 = tool.bytes_written()
    seg = warmup + steps
    step_b = step_h = start
    out_reps = []
    for r in range(reps):
        hook_first = r % 2 == 1  # ABBA order: a drift within a repetition cancels over two
        timed: dict[str, list[float]] = {}
        foreign: dict[str, float] = {}
        for which in ("hook", "base") if hook_first else ("base", "hook"):
            gc.collect()
            a = cpu_snapshot(tree_root)
            if which == "base":
                timed[which] = _train(base, loss_b, opt_b, batches, seg, step_b)
                step_b += seg
            else:
                timed[which] = _train(hooked, loss_h, opt_h, batches, seg, step_h, tool)
                step_h += seg
            foreign[which] = foreign_share(a, cpu_snapshot(tree_root))
        tb, th = timed["base"][warmup:], timed["hook"][warmup:]
        out_reps.append(
            {
                "base_mean_ms": 1e3 * statistics.fmean(tb),
                "base_median_ms": 1e3 * statistics.median(tb),
                "hook_mean_ms": 1e3 * statistics.fmean(th),
                "hook_median_ms": 1e3 * statistics.median(th),
                "foreign_base": foreign["base"],
                "foreign_hook": foreign["hook"],
                "hook_first": hook_first,
            }
        )
    children_mb = children_rss_mb()
    peak_self = max(0.0, peak_rss_mb() - rss_ref)
    t0 = time.perf_counter()
    tool.close()
    close_s = time.perf_counter() - t0
    peak_self = max(peak_self, peak_rss_mb() - rss_ref)
    nbytes = tool.bytes_written() - bytes0
    return {
        "status": "ok",
        "reps": out_reps,
        "bytes": nbytes,
        "hook_steps": step_h - start,
        "saves": len(range(start, step_h, interval)),
        "startup_steps": start,
        "startup_extra_s": startup_extra_s,
        "peak_self_mb": peak_self,
        "children_mb": children_mb,
        "rss_ref_mb": rss_ref,
        "setup_s": setup_s,
        "close_s": close_s,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0], **tool.versions()},
    }


def cell_main(args: argparse.Namespace) -> int:
    """Child entry point: run one cell and write its result (or why it could not run) to --result."""
    from peers import NotInstalled

    try:
        res = run_cell(
            args.cell,
            args.models[0],
            args.intervals[0],
            steps=args.steps,
            warmup=args.warmup,
            reps=args.reps,
            threads=args.threads[0],
            workdir=args.workdir,
            batch=args.batch,
            bootstrap=args.bootstrap,
            tree_root=args.tree_root,
            startup_saves=args.startup_saves,
        )
        rc = 0
    except NotInstalled as exc:
        res, rc = {"status": "not installed", "reason": str(exc)}, 0
    except Exception as exc:  # noqa: BLE001 - the driver reports it and goes on with other cells
        tb = traceback.format_exc(limit=6)
        res, rc = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "traceback": tb}, 1
    with open(args.result, "w") as f:
        json.dump(res, f)
    return rc


# ----------------------------------------------------------------------------- driver
def _python_for(tool: str, smdebug_python: str) -> tuple[str | None, str]:
    from peers import needs_smdebug_env

    if not needs_smdebug_env(tool):
        return sys.executable, ""
    if os.path.exists(smdebug_python):
        return smdebug_python, ""
    return None, f"no smdebug environment at {smdebug_python} (run bench/setup_peers.sh)"


def spawn_cell(
    tool: str, kind: str, interval: int, args: argparse.Namespace, bootstrap: str | None, threads: int = 1
) -> dict[str, Any]:
    """Run one cell in a child process; never raises: failures come back as a status and a reason."""
    python, why = _python_for(tool, args.smdebug_python)
    if python is None:
        return {"status": "not installed", "reason": why}
    work = tempfile.mkdtemp(prefix=f"tp-overhead-{tool}-{kind}-i{interval}-")
    result = os.path.join(work, "result.json")
    cmd = [
        python, os.path.abspath(__file__), "--cell", tool, "--models", kind, "--intervals", str(interval),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--reps", str(args.reps),
        "--startup-saves", str(args.startup_saves),
        "--threads", str(threads), "--workdir", os.path.join(work, "out"), "--result", result,
        "--tree-root", str(os.getpid()),
    ]  # fmt: skip
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, check=False)
        if os.path.exists(result):
            with open(result) as f:
                return json.load(f)
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        return {"status": "failed", "reason": f"exit {proc.returncode}: " + " | ".join(tail)}
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"no result within {args.cell_timeout} s"}
    except OSError as exc:
        return {"status": "failed", "reason": f"could not start {python}: {exc}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Combine the same cell's results from several rounds (repetitions, bytes and steps add up)."""
    if old is None or old.get("status") != "ok":
        return new if old is None or new.get("status") == "ok" else old
    if new.get("status") != "ok":
        return old
    out = dict(old)
    out["reps"] = old["reps"] + new["reps"]
    for k in ("bytes", "hook_steps", "saves"):
        out[k] = old[k] + new[k]
    for k in ("peak_self_mb", "children_mb", "setup_s", "close_s", "startup_extra_s"):
        out[k] = max(old.get(k, 0.0), new.get(k, 0.0))
    return out


def _target(text: str) -> tuple[int, float]:
    interval, _, ratio = text.partition(":")
    return int(interval), float(ratio)


def drive(args: argparse.Namespace) -> int:
    from common import broker, machine_info
    from peers import TOOLS

    for t in args.tools:
        if t not in TOOLS:
            raise SystemExit(f"unknown tool {t!r}: one of {', '.join(TOOLS)}")
    for interval in args.intervals:
        if (args.steps % interval) or (args.warmup % interval):
            print(f"note: --steps/--warmup not multiples of interval {interval}: saves per segment vary")
    cells: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    started = time.strftime("%Y%m%d-%H%M%S")
    machine = machine_info(HERE)
    use_broker = args.broker or args.bootstrap
    plan = [
        (kind, threads, interval, tool)
        for kind in args.models
        for threads in args.threads
        for interval in args.intervals
        for tool in args.tools
        if not (args.aa_once and tool == "no-hook" and interval != args.intervals[0])
    ]
    with broker(args.bootstrap) if use_broker else contextlib.nullcontext(None) as bootstrap:
        for rnd in range(args.rounds):
            for kind, threads, interval, tool in plan:
                t0 = time.monotonic()
                res = spawn_cell(tool, kind, interval, args, bootstrap, threads)
                key = (tool, kind, interval, threads)
                cells[key] = merge(cells.get(key), res)
                print(
                    f"[round {rnd + 1}/{args.rounds}] {kind} every {interval}, {threads} thread(s), {tool}: "
                    f"{res['status']} ({time.monotonic() - t0:.0f} s)"
                    + (f" {res.get('reason', '')}" if res["status"] != "ok" else ""),
                    flush=True,
                )
    rows = [summarise(*key[:3], cell, args.max_foreign, threads=key[3]) for key, cell in cells.items()]
    order = {t: i for i, t in enumerate(args.tools)}
    rows.sort(key=lambda r: (MODELS.index(r["model"]), r["threads"], r["interval"], order[r["tool"]]))
    checks = overhead_check(rows, args.factor)
    targets = target_check(rows, dict(args.target)) if args.target else []
    machine["loadavg_end"] = os.getloadavg()
    print()
    print(format_table(rows, checks, targets))
    report = {
        "created": started,
        "finished": time.strftime("%Y%m%d-%H%M%S"),
        "machine": machine,
        "config": {
            k: getattr(args, k)
            for k in (
                "models",
                "intervals",
                "tools",
                "steps",
                "warmup",
                "startup_saves",
                "reps",
                "rounds",
                "threads",
                "batch",
                "aa_once",
                "max_foreign",
            )
        }
        | {"broker": bool(use_broker), "cpus": os.cpu_count()},
        "rows": rows,
        "check": checks,
        "targets": targets,
    }
    path = args.out or os.path.join(args.out_dir, f"overhead-{started}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {path}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from peers import TOOLS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", "--model", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--intervals", nargs="+", type=int, default=[1, 10])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), help=f"of: {', '.join(TOOLS)}")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per segment")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each segment")
    ap.add_argument(
        "--startup-saves",
        type=int,
        default=10,
        help="saves' worth of steps (times the interval) each cell runs once before its repetitions, "
        "outside the ratios; their extra time is reported as start-up (tensorpulse's first 10 saves add p5/p95)",
    )
    ap.add_argument("--reps", type=int, default=5, help="repetitions (base + tool segment pairs) per cell")
    ap.add_argument("--rounds", type=int, default=1, help="passes over all cells; repetitions pool per cell")
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="torch intra-op threads; several: a cell each"
    )
    ap.add_argument("--batch", type=int, help="batch size (default per model: common.BATCH)")
    ap.add_argument(
        "--aa-once",
        action="store_true",
        help="run the no-hook (A/A) cell at the first interval only (it saves nothing at any interval)",
    )
    ap.add_argument(
        "--target",
        type=_target,
        nargs="*",
        default=[(1, 1.05), (10, 1.01)],
        metavar="INTERVAL:RATIO",
        help="issue 20's targets for tensorpulse's mean ratio (default 1:1.05 10:1.01)",
    )
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=0.10,
        help="drop repetitions where others used more of the machine",
    )
    ap.add_argument("--factor", type=float, default=5.0, help="required overhead factor vs the best peer")
    ap.add_argument("--broker", action="store_true", help="publish tensorpulse records to a real broker")
    ap.add_argument("--bootstrap", help="that broker (default: $KAFKA_BOOTSTRAP or an embedded one)")
    ap.add_argument("--smdebug-python", default=SMDEBUG_PYTHON)
    ap.add_argument("--cell-timeout", type=float, default=1800.0, help="seconds per cell process")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--out", "--json", help="JSON path (default: OUT_DIR/overhead-<timestamp>.json)")
    ap.add_argument("--cell", choices=list(TOOLS), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--tree-root", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("steps", "reps", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if any(t < 1 for t in args.threads) or (args.batch is not None and args.batch < 1):
        ap.error("--threads and --batch must be >= 1")
    if args.warmup < 0 or args.startup_saves < 0 or any(i < 1 for i in args.intervals):
        ap.error("--warmup and --startup-saves must be >= 0 and every interval >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cell_main(args) if args.cell else drive(args)


if __name__ == "__main__":
    sys.exit(main())
