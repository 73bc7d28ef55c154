"""The PyTorch hook against a real broker: records on the reductions topic, actions on the control topic."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from tensorpulse import wire
from tensorpulse.topics import control_topic, reductions_topic

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorpulse.actions import encode_action  # noqa: E402
from tensorpulse.producers.torch import TorchHook  # noqa: E402

pytestmark = pytest.mark.integration

STEPS = 25
HIDDEN = 32


def consume_records(bootstrap: str, topic: str, until_end: bool = True, timeout: float = 60.0):
    """(record, payload bytes, key) for every message of `topic`, read through a consumer group."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-hook-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "enable.auto.commit": False,
        }
    )
    cache = wire.SchemaCache()
    out = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is not None:
                    continue
                out.append((wire.decode(m.value(), cache), m.value(), m.key()))
            if until_end and out and out[-1][0].kind == "end":
                break
    finally:
        c.close()
    return out


def test_torch_hook_publishes_every_step_and_reads_back(kafka_bootstrap: str, unique: str):
    """A TorchHook on a small MLP publishes N decodable steps with all collections, the loss and an end record."""
    job = f"hook-it-{unique}"
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hook = TorchHook(job, kafka_bootstrap, quantile_steps=3, announce_every=100).attach(model, opt)
    expected = {}
    losses = {}
    for step in range(STEPS):
        x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        hook.step(step, loss=loss)  # its cost is bench/hook_overhead.py's to measure
        w, g = (
            model[0].weight.detach().numpy().astype(np.float64),
            model[0].weight.grad.numpy().astype(np.float64),
        )
        expected[step] = (w.mean(), w.std(), g.mean(), g.std())
        losses[step] = float(loss.detach())
        opt.step()
    assert hook.flush(30) == 0
    hook.close(10)
    s = hook.stats()
    assert s["sent"] == STEPS + 1 and s["dropped"] == 0 and s["errors"] == 0

    got = consume_records(kafka_bootstrap, reductions_topic(job))
    records = [r for r, _, _ in got]
    assert all(key == job.encode() for _, _, key in got)
    steps = [r for r in records if r.kind == "step"]
    assert [r.step for r in steps] == list(range(STEPS))
    assert all(r.mode == "train" and r.job == job and (r.rank, r.world) == (0, 1) for r in steps)
    assert [r.seq for r in records] == list(range(STEPS + 1))
    assert records[-1].kind == "end"

    for r in steps:
        by_name = {t.name: t for t in r.tensors}
        assert {t.collection for t in r.tensors} >= {"weights", "biases", "gradients", "activations"}
        assert by_name["0.weight"].collection == "weights" and by_name["0.bias"].collection == "biases"
        assert by_name["gradient/4.weight"].n == 4 * HIDDEN
        for name in ("1/relu_output", "3/relu_output"):
            act = by_name[name]
            assert act.collection == "activations" and act.n == 64 * HIDDEN
            assert act.activity is not None and act.activity[0] == HIDDEN
            assert act.min >= 0.0 and act.zeros > 0
        wm, ws, gm, gs = expected[r.step]
        assert by_name["0.weight"].mean == pytest.approx(wm, abs=1e-6)
        assert by_name["0.weight"].std == pytest.approx(ws, rel=1e-4)
        assert by_name["gradient/0.weight"].mean == pytest.approx(gm, abs=1e-6)
        assert by_name["gradient/0.weight"].std == pytest.approx(gs, rel=1e-4)
        assert r.scalars["loss"] == pytest.approx(losses[r.step], rel=1e-6)
        assert r.scalars["lr"] == pytest.approx(0.05)
        early = r.step < 3
        assert ("1/relu_input" in by_name) == early
        assert (by_name["gradient/0.weight"].quantiles is not None) == early

    plain = [(len(v), len(r.tensors)) for r, v, _ in got if r.kind == "step" and b"names" not in v]
    assert len(plain) == STEPS - 2  # announced at seq 0 and when the early-step schema ended
    per_tensor = sum(b for b, _ in plain) / sum(k for _, k in plain)
    print(f"\nbytes per tensor per step: {per_tensor:.1f} ({len(plain)} non-announcing records)")
    assert per_tensor <= 40

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, reductions_topic(job))
    conf = admin.describe_configs([res])[res].result(10)
    assert conf["retention.ms"].value == str(7 * 24 * 3600 * 1000)
    assert conf["cleanup.policy"].value == "delete"


def test_control_message_sets_should_stop(kafka_bootstrap: str, unique: str):
    """A stop action on the job's control topic sets should_stop within 10 s; other jobs' and stale actions do not."""
    job = f"hook-ctl-{unique}"
    hook = TorchHook(job, kafka_bootstrap)
    seen = []
    checkpoint, stopped = threading.Event(), threading.Event()

    def on_action(action):
        seen.append(action)
        if action["action"] == "checkpoint":
            checkpoint.set()
        if action["action"] == "stop":
            stopped.set()

    hook.on_action(on_action)
    try:
        p = Producer({"bootstrap.servers": kafka_bootstrap})
        topic = control_topic(job)
        key = job.encode()
        p.produce(topic, encode_action("stop", f"other-{unique}", rule="R"), key=key)
        p.produce(topic, encode_action("stop", job, rule="R", ts=time.time() - 60), key=key)
        p.produce(topic, b"not json", key=key)
        p.produce(topic, encode_action("checkpoint", job, rule="R", alert_id="a1"), key=key)
        assert p.flush(10) == 0
        assert checkpoint.wait(10), "checkpoint action not received"
        assert not hook.should_stop
        p.produce(topic, encode_action("stop", job, rule="LossNotDecreasing", alert_id="a2", step=3), key=key)
        assert p.flush(10) == 0
        assert stopped.wait(10), "stop action not received"  # the callbacks run after should_stop is set
        assert hook.should_stop
        assert [a["action"] for a in seen] == ["checkpoint", "stop"]
        assert seen[-1]["alert_id"] == "a2" and seen[-1]["step"] == 3
        assert hook.stats()["control"] == {"other_job": 1, "stale": 1, "malformed": 1, "accepted": 2}
    finally:
        hook.close(5)
