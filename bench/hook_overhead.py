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
MODELS = ("mlp", "cnn")
if HERE not in sys.path:  # common.py and peers.py, also when this file is loaded as a module
    sys.path.insert(0, HERE)


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
    batches = make_batches(kind)
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
    # repetition only, and the more so the rarer the saves. Its cost is reported on its own.
    start = startup_saves * interval
    startup_extra_s = sum(_train(hooked, loss_h, opt_h, batches, start, 0, tool)) - sum(
        _train(base, loss_b, opt_b, batches, start, 0)
    )
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
            threads=args.threads,
            workdir=args.workdir,
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
    tool: str, kind: str, interval: int, args: argparse.Namespace, bootstrap: str | None
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
        "--threads", str(args.threads), "--workdir", os.path.join(work, "out"), "--result", result,
        "--tree-root", str(os.getpid()),
    ]  # fmt: skip
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
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


def summarise(
    tool: str, kind: str, interval: int, cell: dict[str, Any], max_foreign: float
) -> dict[str, Any]:
    """One table row from a cell's raw result."""
    row: dict[str, Any] = {"tool": tool, "model": kind, "interval": interval, "status": cell["status"]}
    if cell["status"] != "ok":
        row["reason"] = cell.get("reason", "")
        return row
    reps = cell["reps"]
    kept = [r for r in reps if max(r["foreign_base"], r["foreign_hook"]) <= max_foreign]
    use = kept or reps
    mean_r = [r["hook_mean_ms"] / r["base_mean_ms"] for r in use]
    median_r = [r["hook_median_ms"] / r["base_median_ms"] for r in use]
    steps = max(cell["hook_steps"], 1)
    row.update(
        mean_ratio=statistics.median(mean_r),
        median_ratio=statistics.median(median_r),
        mean_ratio_range=[min(mean_r), max(mean_r)],
        median_ratio_range=[min(median_r), max(median_r)],
        reps_kept=len(kept),
        reps_total=len(reps),
        noisy=not kept,
        base_median_ms=statistics.median(r["base_median_ms"] for r in use),
        base_mean_ms=statistics.median(r["base_mean_ms"] for r in use),
        bytes_per_step=cell["bytes"] / steps,
        bytes_per_save=cell["bytes"] / max(cell["saves"], 1),
        peak_mb=cell["peak_self_mb"] + cell["children_mb"],
        peak_self_mb=cell["peak_self_mb"],
        children_mb=cell["children_mb"],
        setup_s=cell["setup_s"],
        close_s=cell["close_s"],
        startup_steps=cell.get("startup_steps", 0),
        startup_extra_s=cell.get("startup_extra_s", 0.0),
        versions=cell["versions"],
        per_rep=reps,
    )
    return row


def overhead_check(rows: list[dict[str, Any]], factor: float = 5.0) -> list[dict[str, Any]]:
    """Per (model, interval) and ratio kind: is tensorpulse's overhead (ratio - 1) at most 1/factor
    of the best peer's? `passed` is None where tensorpulse or every peer is missing, or where no
    peer's overhead stands out of the no-hook (A/A) row's distance from 1."""
    from peers import PEERS

    ok = {(r["tool"], r["model"], r["interval"]): r for r in rows if r["status"] == "ok"}
    cells = sorted({(r["model"], r["interval"]) for r in rows}, key=lambda c: (MODELS.index(c[0]), c[1]))
    out = []
    for kind, interval in cells:
        for basis in ("mean_ratio", "median_ratio"):
            ours = ok.get(("tensorpulse", kind, interval))
            peers = [ok[(p, kind, interval)] for p in PEERS if (p, kind, interval) in ok]
            entry: dict[str, Any] = {"model": kind, "interval": interval, "basis": basis, "required": factor}
            if ours is None or not peers:
                entry.update(
                    passed=None, note="tensorpulse not measured" if ours is None else "no peer measured"
                )
                out.append(entry)
                continue
            best = min(peers, key=lambda r: r[basis])
            ours_over, peer_over = ours[basis] - 1.0, best[basis] - 1.0
            entry.update(
                ours_overhead=ours_over,
                best_peer=best["tool"],
                best_peer_overhead=peer_over,
                noisy=ours["noisy"] or best["noisy"],
            )
            aa = ok.get(("no-hook", kind, interval))
            # The A/A row: how far "no overhead" reads from 1 in this run; smaller differences
            # from 1 cannot be told apart from none.
            resolution = 0.0
            if aa is not None:
                entry["no_hook_overhead"] = aa[basis] - 1.0
                resolution = abs(entry["no_hook_overhead"])
            if peer_over <= resolution:
                entry.update(factor=None, passed=None, note="no peer overhead above the no-hook row's noise")
            elif ours_over <= resolution:
                entry.update(
                    factor=None, passed=True, note="tensorpulse overhead within the no-hook row's noise"
                )
            else:
                entry.update(factor=peer_over / ours_over, passed=peer_over >= factor * ours_over)
            out.append(entry)
    return out


def _fmt_bytes(n: float) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


_VERDICT = {True: "PASS", False: "FAIL", None: "n/a"}


def format_table(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':5} {'int':>3}  {'tool':19} {'mean x':>7} {'median x':>8} {'bytes/step':>11} "
        f"{'peak MB':>8}  {'reps':>5}  note",
    ]
    for r in rows:
        head = f"{r['model']:5} {r['interval']:>3}  {r['tool']:19}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r.get('reason', '')}")
            continue
        note = "NOISY (no clean repetition)" if r["noisy"] else ""
        if r.get("startup_steps"):
            note = f"start-up {r['startup_extra_s']:+.2f} s over {r['startup_steps']} steps {note}".rstrip()
        lines.append(
            f"{head} {r['mean_ratio']:7.2f} {r['median_ratio']:8.2f} {_fmt_bytes(r['bytes_per_step']):>11} "
            f"{r['peak_mb']:8.1f}  {r['reps_kept']:>2}/{r['reps_total']:<2}  {note}"
        )
    lines.append("")
    for c in checks:
        head = f"{c['required']:g}x check, {c['model']} every {c['interval']}, {c['basis']}:"
        if "ours_overhead" not in c:
            lines.append(f"{head} n/a ({c['note']})")
            continue
        lines.append(
            f"{head} tensorpulse {c['ours_overhead']:+.3f} vs best peer {c['best_peer']} "
            f"{c['best_peer_overhead']:+.3f}"
            + ("" if c["factor"] is None else f" -> {c['factor']:.1f}x less")
            + (f" (no-hook A/A {c['no_hook_overhead']:+.3f})" if "no_hook_overhead" in c else "")
            + f": {_VERDICT[c['passed']]}"
            + (f" ({c['note']})" if "note" in c else "")
        )
    return "\n".join(lines)


def drive(args: argparse.Namespace) -> int:
    from common import broker
    from peers import TOOLS

    for t in args.tools:
        if t not in TOOLS:
            raise SystemExit(f"unknown tool {t!r}: one of {', '.join(TOOLS)}")
    for interval in args.intervals:
        if (args.steps % interval) or (args.warmup % interval):
            print(f"note: --steps/--warmup not multiples of interval {interval}: saves per segment vary")
    cells: dict[tuple[str, str, int], dict[str, Any]] = {}
    started = time.strftime("%Y%m%d-%H%M%S")
    use_broker = args.broker or args.bootstrap
    with broker(args.bootstrap) if use_broker else contextlib.nullcontext(None) as bootstrap:
        for rnd in range(args.rounds):
            for kind in args.models:
                for interval in args.intervals:
                    for tool in args.tools:
                        t0 = time.monotonic()
                        res = spawn_cell(tool, kind, interval, args, bootstrap)
                        key = (tool, kind, interval)
                        cells[key] = merge(cells.get(key), res)
                        print(
                            f"[round {rnd + 1}/{args.rounds}] {kind} every {interval} {tool}: {res['status']}"
                            f" ({time.monotonic() - t0:.0f} s)"
                            + (f" {res.get('reason', '')}" if res["status"] != "ok" else ""),
                            flush=True,
                        )
    rows = [summarise(*key, cell, args.max_foreign) for key, cell in cells.items()]
    order = {t: i for i, t in enumerate(args.tools)}
    rows.sort(key=lambda r: (MODELS.index(r["model"]), r["interval"], order[r["tool"]]))
    checks = overhead_check(rows, args.factor)
    print()
    print(format_table(rows, checks))
    report = {
        "created": started,
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
                "max_foreign",
            )
        }
        | {"broker": bool(use_broker), "cpus": os.cpu_count()},
        "rows": rows,
        "check": checks,
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
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
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
    for name in ("steps", "reps", "rounds", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.startup_saves < 0 or any(i < 1 for i in args.intervals):
        ap.error("--warmup and --startup-saves must be >= 0 and every interval >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cell_main(args) if args.cell else drive(args)


if __name__ == "__main__":
    sys.exit(main())
