"""Hook, Publisher and ControlListener behaviour that needs no broker (unreachable or injected transport)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from memory_sink import MemorySink
from waits import blocked_in, thread_named, wait_for

from tensorpulse.actions import decode_action, encode_action
from tensorpulse.errors import ConfigError, DecodeError
from tensorpulse.producers import Hook, SaveConfig
from tensorpulse.producers.control import ControlListener
from tensorpulse.producers.publisher import Publisher

UNREACHABLE = "127.0.0.1:1"


# ---------------------------------------------------------------------------- unreachable broker
def test_unreachable_broker_never_raises_or_blocks_the_training_thread():
    """With an unreachable bootstrap no hook call waits for the broker, and nothing raises:
    every step's record is taken while none has been sent, and close() counts what it dropped."""
    hook = Hook("unit-unreachable", UNREACHABLE, max_queued=100)
    try:
        for step in range(200):
            hook.record(step, {"w": np.ones((8, 8)), "b": [1.0, 2.0]}, collection="weights")
            hook.record_scalars(step, {"loss": 0.5})
            hook.publish(step)
        assert not hook.should_stop
        # Taken without the broker: a call that waited for delivery could not have returned yet.
        before_close = hook.stats()
        assert before_close["published"] == 200 and before_close["sent"] == 0
        assert before_close["dropped_queue_full"] == 100  # max_queued=100: the oldest 100 went
    finally:
        hook.close(timeout=1.0)
    s = hook.stats()
    assert s["published"] == 201  # 200 steps + the end record
    assert s["sent"] == 0 and s["dropped"] == 201


def test_full_queue_drops_the_oldest_records_and_counts_them():
    """When the bounded queue is full the oldest records are dropped and counted, never blocking."""
    hook = Hook("unit-dropping", UNREACHABLE, max_queued=5, listen_for_actions=False)
    try:
        for step in range(50):
            hook.record(step, {"x": np.arange(4.0)})
        hook.publish()
        s = hook.stats()
        # the publisher thread is still waiting for topic creation, so nothing left the queue
        assert s["published"] == 50
        assert s["dropped_queue_full"] == 45
    finally:
        hook.close(timeout=0.5)


def test_close_returns_within_its_timeout_and_is_idempotent():
    """close() gives up on undeliverable records at its timeout and counts them as dropped; a second
    close is a no-op. (How long close takes is bench/'s to measure, not an assertion here.)"""
    hook = Hook("unit-close", UNREACHABLE)
    for step in range(20):
        hook.record(step, {"x": np.ones(3)})
    hook.close(timeout=0.3)
    closed = hook.stats()
    assert closed["published"] == 21 and closed["sent"] == 0 and closed["dropped"] == 21  # 20 steps + end
    assert not hook.enabled
    hook.close(timeout=5)
    hook.record(99, {"x": np.ones(3)})  # ignored after close
    assert hook.stats() == closed


def test_publisher_with_a_stuck_transport_drops_oldest_and_flush_is_bounded():
    """A blocked transport fills the deque: oldest records are dropped, flush/close honour timeouts."""
    gate = threading.Event()
    seen: list[bytes] = []

    def stuck(topic: str, value: bytes, key: bytes) -> None:
        gate.wait(5)
        seen.append(value)

    pub = Publisher("t", key="job", max_queued=3, produce_fn=stuck)
    for i in range(10):
        pub.submit(bytes([i]))
        if i == 0:
            assert wait_for(lambda: pub.stats()["pending"] == 1 and pub.queued_bytes == 0)
    assert pub.stats()["dropped_queue_full"] == 6  # 1 in the transport, 3 queued, 6 dropped
    assert pub.flush(0.1) == 4  # gave up at its timeout and says how many are left
    gate.set()
    assert pub.flush(2) == 0
    pub.close(1)
    assert seen == [b"\x00", b"\x07", b"\x08", b"\x09"]
    assert pub.stats()["sent"] == 4 and pub.stats()["enqueued"] == 10


def test_publisher_queue_is_bounded_in_bytes_too():
    """Large records are dropped oldest-first once the queue holds max_queued_bytes, whatever their count."""
    gate = threading.Event()
    seen: list[bytes] = []

    def stuck(topic: str, value: bytes, key: bytes) -> None:
        gate.wait(5)
        seen.append(value)

    pub = Publisher("t", key="job", max_queued=1000, max_queued_bytes=3000, produce_fn=stuck)
    pub.submit(b"a" * 1000)
    assert wait_for(lambda: pub.stats()["pending"] == 1 and pub.queued_bytes == 0)
    for i in range(1, 10):
        pub.submit(bytes([i]) * 1000)
    assert pub.queued_bytes == 3000 and pub.stats()["dropped_queue_full"] == 6
    big = b"z" * 10_000  # larger than the whole bound: kept alone, the newest is never dropped
    pub.submit(big)
    assert pub.queued_bytes == 10_000 and pub.stats()["dropped_queue_full"] == 9
    gate.set()
    assert pub.flush(2) == 0
    pub.close(1)
    assert seen == [b"a" * 1000, big]


def test_hook_sizes_its_queued_records():
    """The hook bounds its queue by records' estimated memory: more tensors, more bytes, and a small bound drops."""
    from tensorpulse.producers.records import TENSOR_HOST_BYTES

    gate = threading.Event()

    def stuck(topic: str, value: bytes, key: bytes) -> None:
        gate.wait(5)

    hook = Hook("q-bytes", produce_fn=stuck, max_queued_bytes=40 * TENSOR_HOST_BYTES * 3)
    for step in range(12):
        hook.record(step, {f"t{i}": np.ones(4) for i in range(40)})
    hook.publish()
    assert hook.stats()["dropped_queue_full"] > 0
    gate.set()
    hook.close(2)


# ---------------------------------------------------------------------------- configuration
def test_misconfiguration_raises_config_error_at_construction(monkeypatch):
    """Invalid job ids, ranks, schedules and Kafka settings raise ConfigError from the constructor."""
    with pytest.raises(ConfigError):
        Hook("bad job/name", enabled=False)
    with pytest.raises(ConfigError):
        Hook("ok", rank=2, world_size=2, enabled=False)
    with pytest.raises(ConfigError):
        Hook("ok", save_interval=0, enabled=False)
    with pytest.raises(ConfigError):
        Hook("ok", UNREACHABLE, kafka_config={"no.such.property": 1}, listen_for_actions=False)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError):
        Hook("ok", enabled=False)


def test_rank_and_world_size_default_from_the_environment(monkeypatch):
    """RANK and WORLD_SIZE (torch.distributed conventions) set the hook's rank and world size."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    sink = MemorySink()
    hook = Hook("unit-env", produce_fn=sink)
    hook.record_scalars(0, {"a": 1.0})
    hook.close(2)
    rec = sink.decoded()[0]
    assert (rec.rank, rec.world) == (3, 8)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (Hook("unit-env", enabled=False).rank, Hook("unit-env", enabled=False).world_size) == (0, 1)


def test_disabled_hook_does_nothing():
    """enabled=False makes every call a cheap no-op and should_save False."""
    hook = Hook("unit-off", enabled=False)
    hook.record(0, {"x": np.ones(2)})
    assert not hook.should_save(0)
    assert hook.flush() == 0
    hook.close()
    assert hook.stats()["published"] == 0


# ---------------------------------------------------------------------------- records on the wire
def test_records_steps_announcements_seq_and_end_record():
    """Records carry increasing seq, ts, the save schedule's steps, periodic announcements and an end record."""
    sink = MemorySink()
    hook = Hook("unit-wire", produce_fn=sink, save_interval=2, announce_every=3, rank=1, world_size=2)
    t0 = time.time()
    for step in range(12):
        hook.record(step, {"w": np.full((3, 3), float(step))}, collection="weights")
        hook.record(step, {"g": np.arange(5.0)}, collection="gradients")
        hook.record_scalars(step, {"loss": 1.0 / (step + 1)})
    hook.record(12, {"w": np.ones(2), "extra": np.zeros(2)}, collection="weights")  # new name set
    hook.close(2)
    records = sink.decoded()
    steps = [r for r in records if r.kind == "step"]
    assert [r.step for r in steps] == [0, 2, 4, 6, 8, 10, 12]
    assert [r.seq for r in records] == list(range(len(records)))
    assert all(t0 - 1 <= r.ts <= time.time() for r in records)
    assert all(
        key == b"unit-wire" and topic == "tensorpulse.reductions.unit-wire" for topic, _, key in sink.messages
    )
    announced = [b"names" in v for _, v, _ in sink.messages[: len(steps)]]
    assert announced == [True, False, False, True, False, False, True]
    r = steps[2]
    assert {t.name: t.collection for t in r.tensors} == {"w": "weights", "g": "gradients"}
    w = r.select(["weights"])[0]
    assert (w.n, w.mean, w.std) == (9, 4.0, 0.0)
    assert r.scalars == {"loss": pytest.approx(0.2)}
    assert steps[0].select(["gradients"])[0].quantiles is not None
    end = records[-1]
    assert (end.kind, end.mode, end.step) == ("end", "global", 12)


def test_torch_and_numpy_tensors_mix_in_one_record():
    """Hook.record reduces torch tensors with stats_torch and others with numpy, keeping their names."""
    torch = pytest.importorskip("torch")
    sink = MemorySink()
    hook = Hook("unit-mixed", produce_fn=sink)
    hook.record(0, {"t": torch.full((4, 4), 2.0), "n": np.arange(3.0), "l": [0.0, 0.0]}, collection="weights")
    hook.record(0, {"a": torch.relu(torch.randn(16, 6))}, collection="activations")
    hook.close(2)
    rec = sink.decoded()[0]
    by_name = {t.name: t for t in rec.tensors}
    assert set(by_name) == {"t", "n", "l", "a"}
    assert (by_name["t"].mean, by_name["t"].std) == (2.0, 0.0)
    assert by_name["n"].mean == 1.0 and by_name["l"].zeros == 2
    assert by_name["a"].activity is not None and by_name["a"].activity[0] == 6


def test_later_step_publishes_earlier_pending_record_of_the_same_mode():
    """A call for a later step of a mode publishes that mode's earlier pending record; other modes wait."""
    sink = MemorySink()
    hook = Hook("unit-auto", produce_fn=sink)
    hook.record_scalars(0, {"a": 1.0})
    hook.record_scalars(0, {"b": 2.0}, mode="eval")
    hook.record_scalars(1, {"a": 3.0})
    assert wait_for(lambda: len(sink.messages) == 1)
    assert (sink.decoded()[0].step, sink.decoded()[0].scalars) == (0, {"a": 1.0})
    hook.publish(mode="eval")
    assert wait_for(lambda: len(sink.messages) == 2)
    assert sink.decoded()[1].mode == "eval"
    hook.close(2)


def test_bad_calls_are_ignored_and_a_failing_statistic_disables_the_hook():
    """Invalid steps/modes are skipped; an exception while computing statistics disables the hook quietly."""

    class Broken:
        def __array__(self, *a, **k):
            raise RuntimeError("boom")

    sink = MemorySink()
    hook = Hook("unit-broken", produce_fn=sink)
    hook.record(-1, {"x": np.ones(2)})
    hook.record(0, {"x": np.ones(2)}, mode="training")
    assert hook.stats()["bad_calls"] == 2 and hook.enabled
    hook.record(0, {"x": Broken()})
    s = hook.stats()
    assert not hook.enabled and s["errors"] == 1
    hook.record(1, {"x": np.ones(2)})
    hook.close(2)
    assert [r.kind for r in sink.decoded()] == ["end"]


def test_bytes_per_tensor_without_kafka():
    """A non-announcing record of 40 small tensors costs at most 40 bytes per tensor."""
    sink = MemorySink()
    hook = Hook("unit-size", produce_fn=sink, quantile_steps=0)
    rng = np.random.default_rng(0)
    for step in range(3):
        hook.record(step, {f"layer{i}.weight": rng.normal(size=(16, 16)) for i in range(40)})
    hook.close(2)
    payload = len(sink.messages[1][1])
    assert b"names" not in sink.messages[1][1]
    print(f"bytes/tensor: {payload / 40:.1f}")
    assert payload / 40 <= 40


# ---------------------------------------------------------------------------- control messages
def test_control_messages_round_trip_and_reject_bad_input():
    """encode_action/decode_action round-trip and reject malformed messages with DecodeError."""
    raw = encode_action(
        "stop", "job-1", rule="LossNotDecreasing", alert_id="a1", step=7, reason="flat", ts=100.0
    )
    assert json.loads(raw)["action"] == "stop"
    assert decode_action(raw) == {
        "action": "stop",
        "job": "job-1",
        "rule": "LossNotDecreasing",
        "alert_id": "a1",
        "step": 7,
        "reason": "flat",
        "ts": 100.0,
    }
    minimal = decode_action(b'{"action":"checkpoint","job":"j","ts":1,"future":"x"}')
    assert minimal["rule"] == "" and minimal["step"] is None and "future" not in minimal
    for bad in (
        b"not json",
        b"[]",
        b'{"action":"halt","job":"j","ts":1}',
        b'{"action":"stop","job":"a b","ts":1}',
        b'{"action":"stop","job":"j"}',
        b'{"action":"stop","job":"j","ts":1,"step":-2}',
    ):
        with pytest.raises(DecodeError):
            decode_action(bad)
    with pytest.raises(ConfigError):
        encode_action("explode", "j")


def test_listener_filters_other_jobs_and_old_actions_and_survives_bad_callbacks():
    """Only fresh actions for this job are accepted; callback exceptions are logged, not raised."""
    listener = ControlListener("job-a", bootstrap=UNREACHABLE, start_ts=1000.0)
    got = []
    listener.on_action(lambda a: 1 / 0)
    listener.on_action(got.append)
    assert listener.handle(encode_action("stop", "job-b", ts=1000.0)) is None
    assert listener.handle(encode_action("stop", "job-a", ts=994.0)) is None  # before start - 5 s
    assert listener.handle(b"garbage") is None
    assert not listener.stop_requested.is_set()
    assert listener.handle(encode_action("checkpoint", "job-a", ts=996.0)) is not None
    assert not listener.stop_requested.is_set()
    assert listener.handle(encode_action("stop", "job-a", ts=1001.0, rule="R")) is not None
    assert listener.stop_requested.is_set()
    assert [a["action"] for a in got] == ["checkpoint", "stop"]


# ---------------------------------------------------------------------------- torch hook without Kafka
torch = pytest.importorskip("torch")


def make_mlp():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def train(model, hook, steps, *, start=0, micro_batches=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(start, start + steps):
        opt.zero_grad()
        loss = None
        for _ in range(micro_batches):
            loss = model(torch.randn(5, 6)).pow(2).mean()
            loss.backward()
        hook.step(step, loss=loss)
        opt.step()


def test_torch_hook_captures_the_collections_of_saved_steps_only():
    """TorchHook reports weights, biases, gradients, activations (+inputs early) and loss on saved steps."""
    from tensorpulse.producers.torch import TorchHook

    sink = MemorySink()
    model = make_mlp()
    hook = TorchHook("unit-torch", produce_fn=sink, save_interval=2, quantile_steps=1).attach(model)
    train(model, hook, 5)
    hook.close(2)
    steps = [r for r in sink.decoded() if r.kind == "step"]
    assert [r.step for r in steps] == [0, 2, 4]
    first = {t.name: t for t in steps[0].tensors}
    assert first["0.weight"].collection == "weights" and first["0.bias"].collection == "biases"
    assert first["gradient/2.weight"].collection == "gradients" and first["gradient/2.weight"].quantiles
    assert first["1/relu_output"].collection == "activations"
    assert first["1/relu_output"].activity[0] == 8
    assert first["3/tanh_output"].activity is not None
    assert first["1/relu_input"].collection == "activation_inputs"
    later = {t.name for t in steps[1].tensors}
    assert "1/relu_input" not in later and "1/relu_output" in later
    assert all(t.n == 5 * 8 for t in steps[1].tensors if t.collection == "activations")
    assert set(steps[2].scalars) == {"loss"}


def test_torch_hook_eval_mode_has_no_gradients_and_detach_stops_capture():
    """Eval steps carry weights and activations but no gradients; detach() removes every hook."""
    from tensorpulse.producers.torch import TorchHook

    sink = MemorySink()
    model = make_mlp()
    hook = TorchHook("unit-eval", produce_fn=sink).attach(model, exclude=r"bias")
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, 6))
    hook.step(0, loss=out.sum())
    hook.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())
    hook.close(2)
    rec = sink.decoded()[0]
    assert rec.mode == "eval"
    colls = {t.collection for t in rec.tensors}
    assert "gradients" not in colls and "activations" in colls
    assert not any("bias" in t.name for t in rec.tensors)


def test_torch_hook_shared_modules_and_gradient_accumulation_keep_names_unique():
    """A module used twice gets indexed names; extra forward passes before step() are not captured twice."""
    from torch import nn

    from tensorpulse.producers.torch import TorchHook

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(self.act(x)))

    sink = MemorySink()
    model = Shared()
    hook = TorchHook("unit-shared", produce_fn=sink, quantile_steps=0).attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
        hook.step(step)
        opt.step()
    hook.close(2)
    for rec in sink.decoded()[:2]:
        names = [t.name for t in rec.tensors if t.collection == "activations"]
        assert names == ["act/relu_output", "act/relu_output_1"]


@pytest.mark.parametrize("offload", [False, True])
def test_torch_hook_step_failure_disables_the_hook(monkeypatch, offload):
    """An exception in the statistics path is caught: training continues and the hook disables itself
    (offloaded: when the failed step is collected, at the latest at close)."""
    from tensorpulse.producers import offload as offload_module
    from tensorpulse.producers import torch_attach
    from tensorpulse.producers.torch import TorchHook

    def boom(*a, **k):
        raise RuntimeError("device lost")

    sink = MemorySink()
    model = make_mlp()
    hook = TorchHook("unit-fail", produce_fn=sink, offload=offload).attach(model)
    monkeypatch.setattr(torch_attach, "reduce_on_device", boom)  # activations, in the forward hooks
    monkeypatch.setattr(offload_module, "reduce_on_device", boom)  # a step's tensors
    train(model, hook, 3)
    if offload:
        hook.close(2)
    assert not hook.enabled and hook.stats()["errors"] >= 1
    hook.close(2)


def test_save_config_modes_apply_to_torch_capture():
    """A per-mode SaveConfig decides which train and eval steps the forward pre-hook captures."""
    from tensorpulse.producers.schedule import SaveConfigMode
    from tensorpulse.producers.torch import TorchHook

    sink = MemorySink()
    model = make_mlp()
    cfg = SaveConfig(save_interval=3, modes={"eval": SaveConfigMode(end_step=0, save_steps=[1])})
    hook = TorchHook("unit-modes", produce_fn=sink, save_config=cfg).attach(model)
    train(model, hook, 4)
    model.eval()
    for step in range(3):
        with torch.no_grad():
            model(torch.randn(2, 6))
        hook.step(step)
    hook.close(2)
    got = [(r.mode, r.step, any(t.collection == "activations" for t in r.tensors)) for r in sink.decoded()]
    assert got[:-1] == [("train", 0, True), ("train", 3, True), ("eval", 1, True)]


def test_torch_hook_registers_activation_hooks_for_captured_passes_only():
    """Forward passes of steps that are not saved run no activation hook; captured ones do, then unhook."""
    from tensorpulse.producers.torch import TorchHook

    sink = MemorySink()
    model = make_mlp()
    seen: list[int] = []
    model[1].register_forward_hook(lambda m, a, o: seen.append(len(m._forward_hooks)))
    hook = TorchHook("unit-lazy-hooks", produce_fn=sink, save_interval=2, quantile_steps=0).attach(model)
    train(model, hook, 4)
    assert seen == [2, 1, 2, 1]  # the user's hook, plus the hook's own on saved steps 0 and 2
    assert len(model._forward_pre_hooks) == 2 and not model._forward_hooks  # the compile probe and the start
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model] == [0, 1, 0, 0, 0]
    hook.close(2)
    acts = [
        t.name for r in sink.decoded() if r.kind == "step" for t in r.tensors if t.collection == "activations"
    ]
    # tanh inputs are captured on saved steps too, with in-range activity (SaturatedActivation)
    assert acts == ["1/relu_output", "3/Tanh_input", "3/tanh_output"] * 2


def test_publisher_delivers_batches_without_a_flush():
    """Records reach the transport within the batch delay without flush(); a full queue wakes it at once."""
    seen: list[bytes] = []
    pub = Publisher(
        "t", key="job", max_queued=4, produce_fn=lambda t, v, k: seen.append(v), batch_delay_s=0.05
    )
    try:
        pub.submit(b"a")
        assert wait_for(lambda: seen == [b"a"], timeout=2.0)
        slow = Publisher(
            "t",
            key="job",
            max_queued=4,
            produce_fn=lambda t, v, k: seen.append(v),
            batch_delay_s=60,
            name="unit-slow-publisher",
        )
        try:
            thread = thread_named("unit-slow-publisher")
            wait_for(lambda: blocked_in(thread, "_run"), 5, "the thread to idle until its next batch")
            for item in (b"b", b"c"):  # half full: wakes the thread
                slow.submit(item)
            assert wait_for(lambda: seen == [b"a", b"b", b"c"], timeout=2.0)
        finally:
            slow.close(1)
    finally:
        pub.close(1)
