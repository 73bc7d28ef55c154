"""The load benchmark (bench/load.py) runs end to end: two tiny knee levels against a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOAD = Path(__file__).resolve().parents[2] / "bench" / "load.py"

LEVEL_FIELDS = {
    "target_rps",
    "offered_records",
    "offered_rps",
    "offered_tensor_stats_ps",
    "processed_records",
    "processed_rps",
    "processed_ratio",
    "backlog_max",
    "backlog_end",
    "lag_metric_max",
    "lag_metric_end",
    "alerts_expected",
    "alerts_received",
    "alert_latency_p50_s",
    "alert_latency_p99_s",
    "worker_cpu_pct",
    "worker_rss_mb_max",
    "timeline",
    "ok",
    "reasons",
}


def test_knee_with_two_tiny_levels(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Both levels are reported with every field; processed counts are > 0 and never exceed offered."""
    out = tmp_path / "knee.json"
    cmd = [sys.executable, str(LOAD), "knee", "--bootstrap", kafka_bootstrap, "--jobs", "2", "--tensors", "5"]
    cmd += ["--rates", "10,20", "--level-seconds", "3", "--faults-per-s", "2", "--drain-s", "15"]
    cmd += ["--alert-wait-s", "5", "--keep-going", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["mode"] == "knee"
    assert [level["target_rps"] for level in report["levels"]] == [10.0, 20.0]
    for level in report["levels"]:
        assert set(level) >= LEVEL_FIELDS, LEVEL_FIELDS - set(level)
        assert 0 < level["processed_records"] <= level["offered_records"]
        assert 0 < level["processed_rps"] <= level["offered_rps"]
        assert level["offered_tensor_stats_ps"] == pytest.approx(5 * level["offered_rps"], rel=0.01)
        # Faults were injected (--faults-per-s 2): at least one of their alerts came back.
        assert 0 < level["alerts_received"] <= level["alerts_expected"]
        assert level["timeline"], "no samples were taken during the level"
        assert level["worker_rss_mb_max"] > 0
    totals = report["totals"]
    assert 0 < totals["records_processed"] <= totals["records_offered"]
    assert totals["alerts_expected"] > 0
    assert "knee_target_rps" in report and "peak_processed_rps" in report


def test_knee_of_both_designs_interleaves_their_levels(kafka_bootstrap: str, tmp_path: Path) -> None:
    """--designs baseline current: each design runs its own worker (the revision's, the working
    tree's) on its own jobs, the levels alternate with the first design rotating, and the report
    compares them rate by rate."""
    out = tmp_path / "knee.json"
    cmd = [sys.executable, str(LOAD), "knee", "--designs", "baseline", "current"]
    cmd += ["--bootstrap", kafka_bootstrap, "--jobs", "2", "--tensors", "5", "--rates", "10,20"]
    cmd += ["--level-seconds", "3", "--drain-s", "15"]
    cmd += ["--alert-wait-s", "5", "--keep-going", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["mode"] == "knee" and report["designs_order"] == ["baseline", "current"]
    repo = LOAD.parents[1].resolve()
    sources = report["design_sources"]
    assert sources["baseline"]["rev"].startswith("9382ccd")
    for module, path in sources["baseline"]["imports"].items():
        assert not Path(path).resolve().is_relative_to(repo), (module, path)  # the revision's files ran
    for module, path in sources["current"]["imports"].items():
        assert Path(path).resolve().is_relative_to(repo), (module, path)
    runs = report["by_design"]
    for name in ("baseline", "current"):
        levels = runs[name]["levels"]
        assert [level["target_rps"] for level in levels] == [10.0, 20.0]
        for level in levels:
            assert level["design"] == name
            assert set(level) >= LEVEL_FIELDS, LEVEL_FIELDS - set(level)
            assert 0 < level["processed_records"] <= level["offered_records"]
            assert level["idle_designs_cpu_pct"] is not None and level["generator_cpu_pct"] > 0
        assert 0 < runs[name]["totals"]["records_processed"] <= runs[name]["totals"]["records_offered"]
    # baseline first at the first rate, current first at the second
    b0, b1 = (level["started_unix"] for level in runs["baseline"]["levels"])
    c0, c1 = (level["started_unix"] for level in runs["current"]["levels"])
    assert b0 < c0 < c1 < b1, (b0, c0, c1, b1)
    rows = report["comparison"]["rows"]
    assert [r["target_rps"] for r in rows] == [10.0, 20.0]
    assert all(r["baseline"]["processed_rps"] > 0 and r["current"]["processed_rps"] > 0 for r in rows)
    assert "knee_target_rps_current_over_baseline" in report["comparison"]
    assert "current/baseline" in done.stdout
