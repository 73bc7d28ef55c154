"""The overhead table's rows and verdicts, from the cells' raw results (bench/hook_overhead.py):
one row per (tool, model, save interval, threads) with the median ratio over repetitions and its
range, the "5x less overhead than the best peer" check, and issue 20's targets. Standard library
only (the smdebug cells import hook_overhead.py, and with it this module, from their own venv)."""

from __future__ import annotations

import statistics
from typing import Any

from common import MODELS


def summarise(
    tool: str, kind: str, interval: int, cell: dict[str, Any], max_foreign: float, threads: int = 1
) -> dict[str, Any]:
    """One table row from a cell's raw result."""
    row: dict[str, Any] = {
        "tool": tool,
        "model": kind,
        "interval": interval,
        "threads": threads,
        "status": cell["status"],
    }
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


def _key(row: dict[str, Any]) -> tuple[str, str, int, int]:
    return row["tool"], row["model"], row["interval"], row.get("threads", 1)


def _aa_row(ok: dict[tuple, dict[str, Any]], kind: str, interval: int, threads: int) -> dict[str, Any] | None:
    """The no-hook (A/A) row of a model and thread count: its own interval's, or, with --aa-once
    (the A/A ratio does not depend on the interval: nothing is saved), the one that was run."""
    same = ok.get(("no-hook", kind, interval, threads))
    if same is not None:
        return same
    return next((r for k, r in ok.items() if k[0] == "no-hook" and k[1] == kind and k[3] == threads), None)


def target_check(rows: list[dict[str, Any]], targets: dict[int, float]) -> list[dict[str, Any]]:
    """Issue 20's targets per tensorpulse row (mean ratio: the throughput cost): met when the
    median over repetitions is at most the target; `every_rep` says whether each repetition was."""
    ok = {_key(r): r for r in rows if r["status"] == "ok"}
    out = []
    for (tool, kind, interval, threads), r in ok.items():
        if tool != "tensorpulse" or interval not in targets:
            continue
        aa = _aa_row(ok, kind, interval, threads)
        out.append(
            {
                "model": kind,
                "interval": interval,
                "threads": threads,
                "target": targets[interval],
                "mean_ratio": r["mean_ratio"],
                "mean_ratio_range": r["mean_ratio_range"],
                "no_hook_mean_ratio": None if aa is None else aa["mean_ratio"],
                "met": r["mean_ratio"] <= targets[interval],
                "every_rep": r["mean_ratio_range"][1] <= targets[interval],
            }
        )
    return out


def overhead_check(rows: list[dict[str, Any]], factor: float = 5.0) -> list[dict[str, Any]]:
    """Per (model, interval) and ratio kind: is tensorpulse's overhead (ratio - 1) at most 1/factor
    of the best peer's? `passed` is None where tensorpulse or every peer is missing, or where no
    peer's overhead stands out of the no-hook (A/A) row's distance from 1."""
    from peers import PEERS

    ok = {_key(r): r for r in rows if r["status"] == "ok"}
    cells = sorted({_key(r)[1:] for r in rows}, key=lambda c: (MODELS.index(c[0]), c[1], c[2]))
    out = []
    for kind, interval, threads in cells:
        for basis in ("mean_ratio", "median_ratio"):
            ours = ok.get(("tensorpulse", kind, interval, threads))
            peers = [ok[(p, kind, interval, threads)] for p in PEERS if (p, kind, interval, threads) in ok]
            entry: dict[str, Any] = {"model": kind, "interval": interval, "basis": basis, "required": factor}
            if threads != 1:
                entry["threads"] = threads
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
            aa = _aa_row(ok, kind, interval, threads)
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


def _ratio(r: dict[str, Any], basis: str) -> str:
    lo, hi = r[f"{basis}_range"]
    return f"{r[basis]:.3f} ({lo:.3f}-{hi:.3f})"


def format_table(
    rows: list[dict[str, Any]], checks: list[dict[str, Any]], targets: list[dict[str, Any]] = ()
) -> str:
    """The rows (ratios: median over repetitions, with their range), the peer checks, the targets."""
    lines = [
        f"{'model':8} {'int':>3} {'thr':>3}  {'tool':19} {'mean x (range)':>21} {'median x (range)':>21} "
        f"{'base ms':>8} {'bytes/step':>11} {'peak MB':>8}  {'reps':>5}  note",
    ]
    for r in rows:
        head = f"{r['model']:8} {r['interval']:>3} {r.get('threads', 1):>3}  {r['tool']:19}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r.get('reason', '')}")
            continue
        note = "NOISY (no clean repetition)" if r["noisy"] else ""
        if r.get("startup_steps"):
            note = f"start-up {r['startup_extra_s']:+.2f} s over {r['startup_steps']} steps {note}".rstrip()
        lines.append(
            f"{head} {_ratio(r, 'mean_ratio'):>21} {_ratio(r, 'median_ratio'):>21} {r['base_mean_ms']:8.1f} "
            f"{_fmt_bytes(r['bytes_per_step']):>11} {r['peak_mb']:8.1f}  {r['reps_kept']:>2}/{r['reps_total']:<2}  {note}"
        )
    lines.append("")
    for t in targets:
        aa = "" if t["no_hook_mean_ratio"] is None else f", A/A {t['no_hook_mean_ratio']:.3f}"
        verdict = "MET" if t["met"] else "MISSED"
        lines.append(
            f"target <= {t['target']:g}x, {t['model']} every {t['interval']}, {t['threads']} thread(s): mean "
            f"{t['mean_ratio']:.3f} (reps {t['mean_ratio_range'][0]:.3f}-{t['mean_ratio_range'][1]:.3f}{aa}): "
            f"{verdict}"
            + ("" if t["every_rep"] == t["met"] else " (not in every repetition)" if t["met"] else "")
        )
    if targets:
        lines.append("")
    for c in checks:
        thr = f", {c['threads']} threads" if "threads" in c else ""
        head = f"{c['required']:g}x check, {c['model']} every {c['interval']}{thr}, {c['basis']}:"
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
