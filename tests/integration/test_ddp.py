"""Two-process DistributedDataParallel jobs (gloo, CPU) through the broker and a real stream worker.

Each rank is its own `python` process running tests/integration/ddp_rank.py, with a TorchHook that
takes rank and world from RANK / WORLD_SIZE. Two jobs run side by side: a healthy one, and one
whose rank 1 gets its inputs scaled by 1000 from a known step. RankDivergence must fire on the
second, naming rank 1, and stay silent on the first; a stop action published on each job's
control topic must reach both of its ranks.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from tensorpulse.actions import encode_action
from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC, control_topic, reductions_topic

from .ddp_rank import BAD_FROM, STEPS
from .helpers import (
    committed_past,
    create_topic,
    launch_ranks,
    metric_value,
    ranks_ready,
    read_topic,
    scrape,
    wait_for,
    worker_process,
)

pytest.importorskip("torch")
pytestmark = pytest.mark.integration

BAD_RANK = 1
WORLD = 2
RANK_SCRIPT = Path(__file__).with_name("ddp_rank.py")


def _launch(job: str, bootstrap: str, out: Path, bad_rank: int) -> list[subprocess.Popen]:
    """WORLD rank processes of one job."""
    cfg = {"job": job, "bootstrap": bootstrap, "out": str(out), "bad_rank": bad_rank, "stop_wait": 60}
    return launch_ranks(RANK_SCRIPT, WORLD, [json.dumps(cfg)], out)


@pytest.fixture(scope="module")
def ddp_runs(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run both jobs through one worker; return their alerts, rank results and timings."""
    tmp = tmp_path_factory.mktemp("ddp")
    u = uuid.uuid4().hex[:8]
    jobs = {"healthy": f"ddp-ok-{u}", "corrupt": f"ddp-bad-{u}"}
    for job in jobs.values():  # created up front: the worker follows both from its first build
        create_topic(kafka_bootstrap, reductions_topic(job))
        create_topic(kafka_bootstrap, control_topic(job))
    t0 = time.monotonic()
    all_procs: list[subprocess.Popen] = []
    result: dict[str, Any] = {"jobs": jobs}
    regex = f"^ddp-(ok|bad)-{u}$"
    try:
        with worker_process(kafka_bootstrap, tmp, group=f"g-ddp-{u}", jobs_regex=regex) as (_, url):
            procs = {
                name: _launch(job, kafka_bootstrap, tmp / name, BAD_RANK if name == "corrupt" else -1)
                for name, job in jobs.items()
            }
            all_procs = [p for ps in procs.values() for p in ps]
            wait_for(
                lambda: all(ranks_ready(tmp / n, ps) for n, ps in procs.items()),
                120,
                "both jobs to finish training",
            )
            result["trained_s"] = time.monotonic() - t0

            def evaluated() -> bool:
                text = scrape(url)
                return all(
                    metric_value(text, "tensorpulse_records_total", training_job=j, mode="train")
                    == WORLD * STEPS
                    for j in jobs.values()
                )

            wait_for(evaluated, 60, "the worker to evaluate every record of both jobs")

            def alerts() -> list[AlertEvent]:
                evs = [
                    AlertEvent.from_json(m.value())
                    for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1)
                ]
                return [e for e in evs if e.job in jobs.values() and e.rule == "RankDivergence"]

            wait_for(
                lambda: any(e.job == jobs["corrupt"] for e in alerts()),
                30,
                "RankDivergence on the corrupted job",
            )
            # Once the worker committed past both jobs' records, all it wrote about them is readable.
            wait_for(
                lambda: all(committed_past(kafka_bootstrap, f"g-ddp-{u}", j) for j in jobs.values()),
                60,
                "the worker to commit past both jobs' records",
            )
            result["alerts"] = alerts()
            result["alerted_s"] = time.monotonic() - t0

            producer = Producer({"bootstrap.servers": kafka_bootstrap})
            for job in jobs.values():
                producer.produce(
                    control_topic(job), key=job.encode(), value=encode_action("stop", job, rule="test")
                )
            assert producer.flush(10) == 0
            for p in all_procs:
                p.wait(60)
            result["codes"] = {name: [p.returncode for p in ps] for name, ps in procs.items()}
            result["seen"] = {
                name: [json.loads((tmp / name / f"result-{r}.json").read_text()) for r in range(WORLD)]
                for name in jobs
            }
            result["total_s"] = time.monotonic() - t0
    finally:
        for p in all_procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(
        f"\nDDP: trained in {result.get('trained_s', 0):.1f}s, alert seen at {result.get('alerted_s', 0):.1f}s, "
        f"stop honoured at {result.get('total_s', 0):.1f}s"
    )
    for e in result.get("alerts", []):
        print(f"  {e.format()}")
    return result


def test_rank_divergence_names_the_corrupted_rank(ddp_runs: dict[str, Any]) -> None:
    """Rank 1's inputs scaled x1000 from step 12: RankDivergence fires once, naming rank 1, at step >= 12."""
    job = ddp_runs["jobs"]["corrupt"]
    firing = [e for e in ddp_runs["alerts"] if e.job == job and e.status == "firing"]
    assert len(firing) == 1, firing
    e = firing[0]
    assert e.rank == BAD_RANK and BAD_FROM <= e.step < STEPS and e.mode == "train"
    assert e.value is not None and e.value > 10 and e.tensors
    assert f"rank {BAD_RANK}" in e.message


def test_healthy_two_rank_run_raises_no_rank_divergence(ddp_runs: dict[str, Any]) -> None:
    """The same DDP job without corruption: every record evaluated, no RankDivergence event at all."""
    job = ddp_runs["jobs"]["healthy"]
    assert [e for e in ddp_runs["alerts"] if e.job == job] == []
    # each rank delivered every step before the worker was checked (the end record comes at close)
    assert all(s["sent"] == STEPS and s["dropped"] == 0 for s in ddp_runs["seen"]["healthy"])


def test_stop_action_reaches_every_rank(ddp_runs: dict[str, Any]) -> None:
    """One stop action on a job's control topic sets should_stop on both of its ranks (each rank listens itself)."""
    for name in ("healthy", "corrupt"):
        seen = ddp_runs["seen"][name]
        assert [(s["rank"], s["world"], s["should_stop"]) for s in seen] == [
            (0, WORLD, True),
            (1, WORLD, True),
        ]
        assert ddp_runs["codes"][name] == [0, 0]


def test_healthy_ranks_stay_far_below_the_threshold(ddp_runs: dict[str, Any], kafka_bootstrap: str) -> None:
    """Measured margin: on the healthy job's own records, the largest cross-rank ratio of any step is < 3."""
    from tensorpulse import wire
    from tensorpulse.rules import RankDivergence

    cache = wire.SchemaCache()
    job = ddp_runs["jobs"]["healthy"]
    records = [wire.decode(m.value(), cache) for m in read_topic(kafka_bootstrap, reductions_topic(job))]
    steps = [r for r in records if r.kind == "step"]
    assert len(steps) == WORLD * STEPS and {r.world for r in steps} == {WORLD}
    # A threshold just above 1 turns every compared step into a finding whose value is its largest ratio.
    rule = RankDivergence(ratio_threshold=1.000001, patience=1)
    state, ratios = rule.initialize(), []
    for r in steps:
        state, finding = rule.update(state, r)
        if finding is not None and finding.value is not None:
            ratios.append(finding.value)
    print(f"\nhealthy DDP: {len(ratios)} steps compared, largest cross-rank ratio {max(ratios):.3f}")
    # Ranks' records arrive in bursts of several steps; all but a burst beyond max_pending_steps are compared.
    assert len(ratios) >= STEPS - 10 and max(ratios) < 3.0
