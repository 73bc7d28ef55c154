"""A two-process FSDP2 job (`fully_shard`, gloo, CPU) through the broker and a real stream worker.

Each rank is its own `python` process running tests/integration/fsdp_rank.py with a TorchHook at
its defaults (offloaded reductions included): every parameter and gradient is a DTensor, and each
rank publishes the statistics of its own shards, marked (wire `t.sh`). At the last step rank 1's
shard of 2.weight holds a NaN before the forward pass (written by an optimizer step post-hook
that runs before the hook's, so the offloaded weight read always sees it). ExplodingTensor must fire on
rank 1 naming 2.weight first; the worker must combine the shards of every step into the
parameters' statistics (tensorpulse_parameter_stat), equal to those of the whole parameters.
"""

from __future__ import annotations

import json
import math
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

from .fsdp_rank import BAD_PARAM, BAD_STEP, CHECKED_STEP, STEPS
from .helpers import (
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
RANK_SCRIPT = Path(__file__).with_name("fsdp_rank.py")


@pytest.fixture(scope="module")
def fsdp_run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the job through one worker; return its alerts, the combined gauges, records and rank results."""
    tmp = tmp_path_factory.mktemp("fsdp")
    u = uuid.uuid4().hex[:8]
    job = f"fsdp-{u}"
    create_topic(kafka_bootstrap, reductions_topic(job))
    create_topic(kafka_bootstrap, control_topic(job))
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    result: dict[str, Any] = {"job": job}
    try:
        with worker_process(kafka_bootstrap, tmp, group=f"g-fsdp-{u}", jobs_regex=f"^{job}$") as (_, url):
            cfg = {
                "job": job,
                "bootstrap": kafka_bootstrap,
                "out": str(tmp / "run"),
                "bad_rank": BAD_RANK,
                "stop_wait": 60,
            }
            procs = launch_ranks(RANK_SCRIPT, WORLD, [json.dumps(cfg)], tmp / "run")
            wait_for(lambda: ranks_ready(tmp / "run", procs), 180, "both ranks to finish training")
            result["trained_s"] = time.monotonic() - t0

            def evaluated() -> bool:
                records = metric_value(
                    scrape(url), "tensorpulse_records_total", training_job=job, mode="train"
                )
                return records == WORLD * STEPS

            wait_for(evaluated, 60, "the worker to evaluate every record")

            def alerts() -> list[AlertEvent]:
                evs = [
                    AlertEvent.from_json(m.value())
                    for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=1)
                ]
                return [e for e in evs if e.job == job]

            wait_for(
                lambda: any(e.rule == "ExplodingTensor" and e.rank == BAD_RANK for e in alerts()),
                30,
                "ExplodingTensor on the rank whose shard holds the NaN",
            )
            result["alerts"] = alerts()
            result["metrics"] = scrape(url)  # before the ranks end: the job's series go with it
            result["records"] = [m.value() for m in read_topic(kafka_bootstrap, reductions_topic(job))]
            producer = Producer({"bootstrap.servers": kafka_bootstrap})
            producer.produce(
                control_topic(job), key=job.encode(), value=encode_action("stop", job, rule="test")
            )
            assert producer.flush(10) == 0
            for p in procs:
                p.wait(60)
            result["codes"] = [p.returncode for p in procs]
            result["seen"] = [
                json.loads((tmp / "run" / f"result-{r}.json").read_text()) for r in range(WORLD)
            ]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"\nFSDP2: trained and alerted in {time.monotonic() - t0:.1f}s")
    for e in result.get("alerts", []):
        print(f"  {e.format()}  (alert - publish: {e.ts - (e.publish_ts or e.ts):.3f}s)")
    return result


def test_nan_in_one_ranks_shard_names_that_rank_and_the_parameter(fsdp_run: dict[str, Any]) -> None:
    """Rank 1's shard of 2.weight turns NaN at the last step: rank 1's ExplodingTensor names 2.weight first;
    rank 0's shard of it stays finite, so no alert of rank 0 names it; nothing fired before that step."""
    firing = [e for e in fsdp_run["alerts"] if e.rule == "ExplodingTensor" and e.status == "firing"]
    bad = [e for e in firing if e.rank == BAD_RANK]
    assert len(bad) == 1, firing
    e = bad[0]
    assert e.step == BAD_STEP and e.mode == "train"
    assert e.tensors and BAD_PARAM in e.tensors
    assert f"tensor {BAD_PARAM} has 1 non-finite" in e.message  # the first offender, its one NaN
    # the job's first non-finite: rank 1's shard, though rank 0's NaN activations may have come first
    first = e.details["first_nonfinite"]
    assert (first["rank"], first["tensor"], first["step"]) == (BAD_RANK, BAD_PARAM, BAD_STEP)
    assert e.message.endswith(f"first non-finite: rank {BAD_RANK}, {BAD_PARAM}, step {BAD_STEP}")
    others = [e for e in firing if e.rank != BAD_RANK]
    assert all(e.step == BAD_STEP and BAD_PARAM not in e.tensors for e in others), others
    assert all(e.step >= BAD_STEP for e in fsdp_run["alerts"] if e.rule == "ExplodingTensor")


def test_each_rank_publishes_its_own_shard_marked(fsdp_run: dict[str, Any]) -> None:
    """Rank r's record holds shard r of 2 of every parameter: its own size, the whole's numel and its row-major offset."""
    from tensorpulse import wire

    cache = wire.SchemaCache()
    records = [wire.decode(v, cache) for v in fsdp_run["records"]]
    steps = [r for r in records if r.kind == "step"]
    assert len(steps) == WORLD * STEPS
    seen = fsdp_run["seen"]
    for r in (r for r in steps if r.step == CHECKED_STEP):
        t = next(t for t in r.tensors if t.name == BAD_PARAM)
        rows = seen[r.rank]["shards"][BAD_PARAM][0]
        assert t.n == rows * 32 and t.shard is not None
        assert (t.shard.numel, t.shard.index, t.shard.count) == (33 * 32, r.rank, WORLD)
        assert t.shard.offset == (0 if r.rank == 0 else seen[0]["shards"][BAD_PARAM][0] * 32)
        assert all(
            t.shard is not None for t in r.tensors if t.collection in ("weights", "biases", "gradients")
        )
        assert all(t.shard is None for t in r.tensors if t.collection.startswith("activation"))
    assert [s["errors"] for s in seen] == [0, 0] and [s["sent"] for s in seen] == [STEPS, STEPS]
    assert fsdp_run["codes"] == [0, 0]


def test_worker_combines_the_shards_into_the_whole_parameters(fsdp_run: dict[str, Any]) -> None:
    """Combined from both ranks' records, every parameter and gradient of the checked step equals the whole
    tensor (full_tensor on the ranks); the worker's gauges show the last step, whose 2.weight has the one NaN."""
    from tensorpulse import wire
    from tensorpulse.stream.shards import ShardJoin

    cache = wire.SchemaCache()
    join = ShardJoin()
    combined: dict[tuple[int, str], wire.TensorStats] = {}
    for v in fsdp_run["records"]:
        for step, whole in join.add(wire.decode(v, cache)):
            combined[(step, whole.name)] = whole
    want = fsdp_run["seen"][0]["whole"]
    assert want == fsdp_run["seen"][1]["whole"]
    assert len(want) == 12  # three Linear layers: weight and bias, each with its gradient
    for name, ref in want.items():
        got = combined[(CHECKED_STEP, name)]
        assert got.n == ref["n"] and got.quantiles is None
        scale = max(abs(ref["mean"]), ref["std"], 1e-30)
        for key in ("mean", "std", "min", "max"):
            assert getattr(got, key) == pytest.approx(ref[key], rel=1e-5, abs=1e-5 * scale), (name, key)
        assert got.l2 == pytest.approx(ref["l2"], rel=1e-5), name
    text = fsdp_run["metrics"]
    labels = {"training_job": fsdp_run["job"], "mode": "train", "collection": "weights", "tensor": BAD_PARAM}
    assert metric_value(text, "tensorpulse_parameter_step", **labels) == BAD_STEP
    assert metric_value(text, "tensorpulse_parameter_stat", stat="nan", **labels) == 1
    assert metric_value(text, "tensorpulse_parameter_stat", stat="n", **labels) == 33 * 32
    assert math.isnan(metric_value(text, "tensorpulse_parameter_stat", stat="mean", **labels) or 0.0)
