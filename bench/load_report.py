"""The figures and the report of bench/load.py: small statistics (nearest-rank percentiles with
missing alerts as inf, slopes, JSON-safe numbers), the knee and soak tables, the JSON file.

Apart from load.py, which runs the levels: what a level measured is printed and written here
(bench/job_start.py uses the statistics too).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

from common import utc, write_json

MB = 2**20


# ---------------------------------------------------------------------- small statistics
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100); inf entries (missing alerts) count as the largest."""
    s = sorted(values)
    if not s:
        return math.nan
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var


def finite(x: float | None, digits: int = 4) -> float | None:
    """JSON has no inf/NaN: those become null."""
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


HEADER = (
    f"{'target/s':>9} {'offered/s':>9} {'stats/s':>9} {'processed/s':>11} {'ratio':>6} {'backlog max/end':>15} "
    f"{'lag max/end':>11} {'alert p50/p99 ms':>16} {'alerts':>9} {'cpu%':>5} {'us/rec':>6} {'gen%':>5} "
    f"{'mach%':>5} {'rss MB':>6}  ok"
)


def _ms(x: float | None) -> str:
    return "miss" if x is None else f"{x * 1000:.0f}"


def _num(x: float | None, width: int, fmt: str = ".0f") -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def row(x: dict[str, Any]) -> str:
    lag = "-" if x["lag_metric_max"] is None else f"{x['lag_metric_max']:.0f}/{x['lag_metric_end'] or 0:.0f}"
    alerts = f"{x['alerts_received']}/{x['alerts_expected']}"
    p = f"{_ms(x['alert_latency_p50_s'])}/{_ms(x['alert_latency_p99_s'])}" if x["alerts_expected"] else "-"
    return (
        f"{x['target_rps']:>9g} {x['offered_rps']:>9.0f} {x['offered_tensor_stats_ps']:>9.0f} "
        f"{x['processed_rps']:>11.0f} {x['processed_ratio'] or 0:>6.3f} "
        f"{str(x['backlog_max']) + '/' + str(x['backlog_end']):>15} {lag:>11} {p:>16} {alerts:>9} "
        f"{x['worker_cpu_pct']:>5.0f} {_num(x.get('worker_cpu_us_per_record'), 6)} "
        f"{x['generator_cpu_pct']:>5.0f} {_num(x.get('machine_cpu_pct'), 5)} "
        f"{x['worker_rss_mb_max']:>6.0f}  {'yes' if x.get('ok') else 'NO'}"
    )


def _print_knee(report: dict[str, Any]) -> None:
    print("\n" + HEADER)
    for level in report["levels"]:
        for k, earlier in enumerate(level.get("failed_attempts", []), 1):
            print(row(earlier))
            print(f"{'':>9} ^ attempt {k} of {level['attempts']}: " + "; ".join(earlier["reasons"]))
        print(row(level))
        if level["reasons"]:
            print(f"{'':>9} ^ " + "; ".join(level["reasons"]))
    print(f"\nknee: {report['note']} ({report['stopped']})")
    if report["knee_target_rps"] is not None:
        print(
            f"      {report['knee_offered_rps']:.0f} records/s = {report['knee_tensor_stats_ps']:.0f} tensor "
            f"statistics/s sustained; peak processed {report['peak_processed_rps']:.0f} records/s"
        )
    t = report["totals"]
    print(
        f"records offered {t['records_offered']}, delivered {t['records_delivered']}, failed {t['records_failed']}, "
        f"processed {t['records_processed']}; ExplodingTensor alerts {t['alerts_received']}/{t['alerts_expected']}"
    )


def _print_comparison(report: dict[str, Any]) -> None:
    names = report["designs_order"]
    c = report["comparison"]
    cell = "processed/s  ok  cpu% us/rec gen% mach%"
    print("\n" + f"{'':>9} " + " | ".join(f"{n:^{len(cell)}}" for n in names))
    print(f"{'target/s':>9} " + " | ".join(cell for _ in names))
    for row in c["rows"]:
        parts = []
        for n in names:
            x = row[n]
            if x is None:
                parts.append(f"{'(not run)':^{len(cell)}}")
                continue
            parts.append(
                f"{x['processed_rps']:>11.0f} {'yes' if x['ok'] else ' NO':>3} {x['worker_cpu_pct']:>5.0f} "
                f"{_num(x['worker_cpu_us_per_record'], 6)} {x['generator_cpu_pct']:>4.0f} "
                f"{_num(x['machine_cpu_pct'], 5)}"
            )
        print(f"{row['target_rps']:>9g} " + " | ".join(parts))
    for n in names:
        r = report["by_design"][n]
        print(
            f"{n}: knee {_num(r['knee_target_rps'], 0, 'g').strip()} records/s; {r['note']} ({r['stopped']})"
        )
    for key in ("knee_target_rps", "peak_processed_rps", "worker_cpu_us_per_record_min"):
        ratio = c.get(f"{key}_current_over_baseline")
        if ratio is not None:
            print(f"current/baseline {key}: {ratio:.3f}")


def print_report(report: dict[str, Any]) -> None:
    if report["mode"] == "knee":
        if "by_design" in report:
            for n in report["designs_order"]:
                print(f"\n=== {n}")
                _print_knee(report["by_design"][n])
            _print_comparison(report)
        else:
            _print_knee(report)
        return
    level, m, t = report["level"], report["memory"], report["totals"]
    print("\n" + HEADER)
    print(row(level))
    if level["reasons"]:
        print(f"{'':>9} ^ " + "; ".join(level["reasons"]))
    print(
        f"\nworker RSS: first {m['worker_rss_mb_first']} MB, after warm-up {m['worker_rss_mb_after_warmup']} MB, "
        f"last {m['worker_rss_mb_last']} MB, max {m['worker_rss_mb_max']} MB; slope after warm-up "
        f"{m['worker_rss_slope_mb_per_min']} MB/min (all: {m['worker_rss_slope_all_mb_per_min']}) -> "
        f"{'flat' if m['flat'] else 'GROWING' if m['flat'] is False else 'too few samples'} "
        f"(limit {m['flat_limit_mb_per_min']:g} MB/min)"
    )
    print(
        f"generator RSS: first {m['generator_rss_mb_first']} MB, last {m['generator_rss_mb_last']} MB, "
        f"slope {m['generator_rss_slope_mb_per_min']} MB/min"
    )
    print(
        f"records offered {t['records_offered']}, delivered {t['records_delivered']}, failed {t['records_failed']}, "
        f"processed {t['records_processed']}; ExplodingTensor alerts {t['alerts_received']}/{t['alerts_expected']}"
    )


def write_report(
    report: dict[str, Any], args: argparse.Namespace, started: float, run_host: dict[str, Any]
) -> Path:
    config = {k: v for k, v in vars(args).items() if k not in ("func",)}
    out = {
        **report,
        "config": config,
        "started_utc": utc(started),
        "duration_s": round(time.time() - started, 1),
        "host": {**run_host, "loadavg_end": list(os.getloadavg())},
    }
    return write_json(_nulls(out), args.out, f"load-{report['mode']}", started, allow_nan=False)


def _nulls(x: Any) -> Any:
    """`x` with every inf or NaN float as null (JSON has neither: a level whose alerts went
    missing has an infinite latency p99, and the report was lost to a ValueError at the end)."""
    if isinstance(x, float):
        return finite(x, 12)
    if isinstance(x, dict):
        return {k: _nulls(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nulls(v) for v in x]
    return x
