"""Sketched weight deltas (producers/sketch.py): one definition on every path, the stated accuracy,
exactly zero for an unchanged tensor, bounded memory, and the wire's `ds` key."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.producers import Hook, stats_numba
from tensorpulse.producers.sketch import RATIO, WIDTHS, row_signs, sketch_numpy, width_for

torch = pytest.importorskip("torch")
from memory_sink import MemorySink  # noqa: E402
from torch import nn  # noqa: E402

from tensorpulse.producers import sketch_torch, stats_host, stats_torch  # noqa: E402
from tensorpulse.producers.torch import TorchHook  # noqa: E402


@pytest.fixture(params=["numba", "torch", "device"])
def path(request, monkeypatch):
    """The numba kernel (CPU float32), the torch ops on the CPU, or the path an accelerator takes."""
    if request.param == "numba":
        if not stats_numba.enabled():
            pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(stats_numba, "enabled", lambda: False)
    if request.param == "device":
        monkeypatch.setattr(stats_torch, "_HOST_DEVICES", frozenset())
    return request.param


def test_row_signs_are_balanced_and_prefix_stable():
    """The signs are +-1, about half each, and a longer sequence starts with the shorter one."""
    s = row_signs(100_000)
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert abs(s.mean()) < 0.02
    assert np.array_equal(row_signs(1000), s[:1000])


@pytest.mark.parametrize(
    ("shape", "want"),
    [((10,), 251), ((4096, 4096), 4093), ((1024, 1024), 4093), ((1021, 1024), 2039), ((1000, 77), 251), ((4093 * 256,), 4093)],
)
def test_width_grows_with_the_tensor_and_avoids_strides(shape, want):
    """The width is the largest prime within n / RATIO (at least the smallest), never one dividing a stride."""
    assert width_for(shape) == want
    w = width_for((5, 4093 * 300))  # a row of exactly 300 widths would put each column in one bucket
    assert w != 4093 and (4093 * 300) % w
    assert w in WIDTHS or w < WIDTHS[-1]


@pytest.mark.parametrize("shape", [(7,), (300,), (64, 33), (2, 1500), (4096 + 17,)])
def test_every_path_gives_the_reference_sketch(path, shape):
    """numba, torch and the device path agree with sketch_numpy (float64 rounding), sums of squares included."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g)
    w = width_for(shape)
    want = sketch_numpy(x.numpy(), w)
    got = sketch_torch.sketches([x])[0].cpu().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got[-1] == pytest.approx(float((x.double() ** 2).sum()), rel=1e-12)


def test_blocks_of_the_torch_path_add_up(monkeypatch):
    """A tensor longer than one float64 block gives the same sketch as in one block."""
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    w = width_for(x.shape)
    whole = sketch_torch.sketch(x, w)
    monkeypatch.setattr(sketch_torch, "TORCH_BLOCK", 1000)
    np.testing.assert_allclose(sketch_torch.sketch(x, w).numpy(), whole.numpy(), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("shape", [(512, 512), (2048, 1024)])
def test_estimate_is_within_the_stated_error(shape):
    """Over random dense updates, ||S(d)|| / ||d|| has mean ~1 and the spread sqrt(1 / (2 width)) stated in the docs."""
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal(shape).astype(np.float32)
    width = width_for(shape)
    s0 = sketch_numpy(w0, width)
    ratios = []
    for _ in range(40):
        w1 = w0 + rng.standard_normal(shape).astype(np.float32) * 1e-3
        d = sketch_numpy(w1, width)[:-1] - s0[:-1]
        true = np.linalg.norm(w1.astype(np.float64) - w0.astype(np.float64))
        ratios.append(math.sqrt(d @ d) / true)
    stated = math.sqrt(1 / (2 * width))
    assert abs(np.mean(ratios) - 1) < 2 * stated
    assert 0.5 * stated < np.std(ratios) < 1.6 * stated


def test_sparse_update_is_nearly_exact():
    """A change confined to fewer elements than the width (one row of an embedding) is measured almost exactly."""
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((1000, 1024)).astype(np.float32)
    w1 = w0.copy()
    w1[417] += rng.standard_normal(1024).astype(np.float32) * 0.01
    width = width_for(w0.shape)
    d = sketch_numpy(w1, width)[:-1] - sketch_numpy(w0, width)[:-1]
    true = np.linalg.norm(w1.astype(np.float64) - w0.astype(np.float64))
    assert math.sqrt(d @ d) == pytest.approx(true, rel=1e-6)


def test_hook_sends_sketched_deltas_by_default(path):
    """The default hook sends `ds` deltas: estimate near the truth, ||w_prev|| exact, exactly 0 for a frozen
    tensor, no excess and no tolerance; every delta step of a model on any path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 8))
    model[2].weight.requires_grad_(False)  # frozen: its delta must be exactly 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sink = MemorySink()
    hook = TorchHook("sk-delta", produce_fn=sink, delta_every=1, offload=False).attach(model, opt)
    snaps = {}
    for step in range(3):
        loss = model(torch.randn(32, 64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        snaps[step] = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
        hook.step(step, loss=loss)
        opt.step()
    hook.close(2)
    recs = sink.records()
    assert [r.step for r in recs] == [0, 1, 2]
    for rec in recs[1:]:
        assert rec.tolerance is None
        deltas = {t.name: t.delta for t in rec.tensors if t.delta is not None}
        assert sorted(deltas) == ["0.weight", "2.weight"]
        for name, d in deltas.items():
            assert not d.exact and d.allclose_excess is None
            assert d.prev_step == rec.step - 1
            now, before = snaps[rec.step][name], snaps[rec.step - 1][name]
            assert d.prev_l2 == pytest.approx(np.linalg.norm(before), rel=1e-9)
            true = np.linalg.norm(now - before)
            if name == "2.weight":
                assert d.update_l2 == 0.0
            else:
                assert true > 0 and d.update_l2 == pytest.approx(true, rel=0.25)


def test_numpy_hook_sketches_too():
    """The numpy path sends the same kind of delta, exactly 0 for an unchanged array."""
    rng = np.random.default_rng(1)
    a0 = rng.normal(size=(50, 70))
    a1 = a0 + rng.normal(size=(50, 70)) * 0.1
    sink = MemorySink()
    hook = Hook("sk-np", produce_fn=sink, delta_every=1)
    hook.record(3, {"w": a0, "still": a0}, collection="weights")
    hook.record(7, {"w": a1, "still": a0}, collection="weights")
    hook.close(2)
    rec = sink.records()[1]
    d = {t.name: t.delta for t in rec.tensors}
    assert d["still"].update_l2 == 0.0 and d["still"].prev_l2 == pytest.approx(np.linalg.norm(a0))
    assert d["w"].prev_step == 3 and d["w"].update_l2 == pytest.approx(np.linalg.norm(a1 - a0), rel=0.25)


def test_sketch_memory_is_under_one_percent_of_the_weights():
    """The tracker keeps at most 8 (width + 1) bytes per tensor: under 1 % of large float32 tensors plus 2 KiB each."""
    tensors = [torch.randn(2048, 2048), torch.randn(1024, 512), torch.randn(100)]
    tracker = sketch_torch.SketchTracker()
    stats = [stats_torch.DeviceStats(n=t.numel()) for t in tensors]
    tracker.track(0, ["a", "b", "c"], tensors, stats)
    weights = sum(t.numel() * 4 for t in tensors)
    assert tracker.nbytes() <= 0.01 * weights + len(tensors) * 8 * (WIDTHS[0] + 1)
    assert tracker.nbytes() <= sum(8 * (max(WIDTHS[0], t.numel() // RATIO) + 1) for t in tensors)


def test_wire_keeps_exact_and_sketched_deltas_apart():
    """`d` rows carry the allclose excess and `tol`; `ds` rows carry none; a v1 reader ignoring `ds` still decodes."""
    block = wire.TensorBlock(
        names=["a", "b"],
        collections=["weights", "weights"],
        n=np.array([4, 4]),
        floats=np.zeros((2, len(wire.FLOAT_COLUMNS)), np.float32),
        zeros=np.array([0, 0]),
        deltas={0: (5, 1.0, 2.0, -0.5), 1: (5, 3.0, 4.0, None)},
        tolerance=(1e-5, 1e-8),
    )
    payload = wire.encode(job="j", rank=0, world=1, step=6, mode="train", ts=1.0, tensors=block)
    raw = msgpack.unpackb(payload, strict_map_key=False)
    assert raw["t"]["d"] == {0: [5, 1.0, 2.0, -0.5]} and raw["t"]["ds"] == {1: [5, 3.0, 4.0]}
    rec = wire.decode(payload)
    a, b = rec.tensors
    assert a.delta == wire.Delta(5, 1.0, 2.0, -0.5) and a.delta.exact
    assert b.delta == wire.Delta(5, 3.0, 4.0) and not b.delta.exact
    bad = dict(raw)
    bad["t"] = dict(raw["t"], ds={1: [5, 3.0]})
    with pytest.raises(wire.DecodeError):
        wire.decode(msgpack.packb(bad))


def test_small_tensor_groups_are_bounded(monkeypatch):
    """Many small tensors are reduced in matrices of at most ROWS_MAX elements, with the same statistics."""
    monkeypatch.setattr(stats_numba, "enabled", lambda: False)  # the torch path, which groups them
    xs = [torch.randn(4096, generator=torch.Generator().manual_seed(i)) for i in range(300)]
    stats = stats_torch.reduce_many(xs)
    groups: dict[int, int] = {}
    for s in stats:
        groups[id(s.rows)] = groups.get(id(s.rows), 0) + 1
    assert max(groups.values()) * 4096 <= stats_torch.ROWS_MAX
    assert len(groups) >= 300 * 4096 // stats_torch.ROWS_MAX
    host, _ = stats_host.transfer(stats)
    cols = host.finish()
    want = np.array([[float(x.mean()), float(x.std(unbiased=False))] for x in xs])
    np.testing.assert_allclose(cols.floats[:, :2], want, rtol=1e-4, atol=1e-6)


def test_a_model_the_kernels_cannot_take_never_loads_numba():
    """numba (about 65 MiB of resident memory, 53 of it private) loads only for CPU float32 tensors: not for a float64 model
    (nor, by the same checks, for one on an accelerator), deltas and quantile steps included."""
    import subprocess
    import sys

    if not stats_numba.enabled():
        pytest.skip("numba is not installed")
    code = """
import sys, torch
from torch import nn
from tensorpulse.producers.torch import TorchHook
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).double()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
hook = TorchHook("no-numba", produce_fn=lambda *a: None, delta_every=2).attach(model, opt)
for step in range(6):
    opt.zero_grad()
    model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    hook.step(step)
    opt.step()
hook.close(2)
assert hook.stats()["published"] >= 6 and hook.stats()["errors"] == 0, hook.stats()
print("numba" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
