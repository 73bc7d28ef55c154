"""What the hooks capture beyond tensor statistics: weight deltas, tanh/sigmoid input activity,
label/confusion counts and input summaries, each checked against numpy on known tensors."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.producers import Hook

torch = pytest.importorskip("torch")
from memory_sink import MemorySink  # noqa: E402
from torch import nn  # noqa: E402

from tensorpulse.producers import deltas_torch, stats_torch  # noqa: E402
from tensorpulse.producers.torch import TorchHook  # noqa: E402


@pytest.fixture(params=["host", "device"])
def path(request, monkeypatch):
    """The CPU path, or on CPU the path an accelerator takes (no host-side shortcuts)."""
    if request.param == "device":
        monkeypatch.setattr(stats_torch, "_HOST_DEVICES", frozenset())
    return request.param


def expected_delta(w: np.ndarray, prev: np.ndarray, rtol: float, atol: float) -> tuple[float, float, float]:
    w, prev = w.astype(np.float64), prev.astype(np.float64)
    d = w - prev
    return (
        float(np.sqrt((d * d).sum())),
        float(np.sqrt((prev * prev).sum())),
        float((np.abs(d) - (atol + rtol * np.abs(prev))).max()),
    )


def assert_delta(got: wire.Delta, prev_step: int, want: tuple[float, float, float]) -> None:
    assert got.prev_step == prev_step
    assert got.update_l2 == pytest.approx(want[0], rel=1e-4, abs=1e-12)
    assert got.prev_l2 == pytest.approx(want[1], rel=1e-5)
    assert got.allclose_excess == pytest.approx(want[2], rel=1e-4, abs=1e-9)


def activity(x: np.ndarray, lo: float, hi: float) -> tuple[int, ...]:
    """(units, units active in fewer than each ACTIVITY_EDGES fraction of samples), active = lo < x < hi."""
    axes = (0, *range(2, x.ndim))
    active = ((x > lo) & (x < hi)).sum(axis=axes)
    samples = x.size // x.shape[1]
    return (x.shape[1], *(int((active < e * samples).sum()) for e in wire.ACTIVITY_EDGES))


# ---------------------------------------------------------------------------- weight deltas
def test_torch_hook_sends_weight_deltas_between_saved_train_steps(path):
    """With delta_method="exact", weights carry (prev step, ||w - w_prev||, ||w_prev||, allclose excess) from the
    previous saved step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = MemorySink()
    hook = TorchHook(
        "cap-delta", produce_fn=sink, delta_every=1, save_interval=2, delta_rtol=1e-3, delta_atol=1e-6,
        delta_method="exact",
    )
    hook.attach(model, opt)
    snapshots = {}
    for step in range(5):
        loss = model(torch.randn(16, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step % 2 == 0:
            snapshots[step] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        hook.step(step, loss=loss)
        opt.step()
    hook.close(2)
    recs = sink.records()
    assert [r.step for r in recs] == [0, 2, 4]
    assert all(t.delta is None for t in recs[0].tensors)  # nothing to compare with yet
    for rec, prev in zip(recs[1:], (0, 2), strict=True):
        assert rec.tolerance == (1e-3, 1e-6)
        deltas = {t.name: t.delta for t in rec.tensors if t.delta is not None}
        assert sorted(deltas) == ["0.weight", "2.weight"]  # biases and gradients are not tracked
        for name, d in deltas.items():
            want = expected_delta(snapshots[rec.step][name], snapshots[prev][name], 1e-3, 1e-6)
            assert_delta(d, prev, want)


def test_chunked_deltas_and_allclose_sign(monkeypatch, path):
    """Multi-chunk tensors and split multi-tensor groups give the same deltas; an unchanged tensor is allclose
    (excess <= 0), a moved one not."""
    monkeypatch.setattr(stats_torch, "CHUNK", 1000)
    monkeypatch.setattr(deltas_torch, "DELTA_CPU_CHUNK", 1000)
    monkeypatch.setattr(deltas_torch, "DELTA_GROUP", 4000)
    sink = MemorySink()
    hook = Hook("cap-chunks", produce_fn=sink, delta_every=1, delta_method="exact")
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(4500, generator=g)
    w1 = w0 + 1e-3 * torch.randn(4500, generator=g)
    still = torch.randn(300, generator=g)
    half = torch.randn(2, 1500, generator=g).to(torch.float16)
    half1 = (half.float() + 0.01).to(torch.float16)
    v0 = torch.randn(3900, generator=g)
    v1 = v0 * 1.5
    hook.record(0, {"w": w0.clone(), "still": still.clone(), "half": half, "v": v0}, collection="weights")
    hook.record(1, {"w": w1.clone(), "still": still.clone(), "half": half1, "v": v1}, collection="weights")
    hook.record(1, {"g": w1}, collection="gradients")
    hook.close(2)
    rec = {t.name: t for t in sink.records()[1].tensors}
    assert_delta(rec["w"].delta, 0, expected_delta(w1.numpy(), w0.numpy(), 1e-5, 1e-8))
    assert_delta(
        rec["half"].delta, 0, expected_delta(half1.float().numpy(), half.float().numpy(), 1e-5, 1e-8)
    )
    assert_delta(rec["v"].delta, 0, expected_delta(v1.numpy(), v0.numpy(), 1e-5, 1e-8))
    assert rec["still"].delta.update_l2 == 0.0
    assert rec["still"].delta.allclose_excess <= 0 < rec["w"].delta.allclose_excess
    assert rec["g"].delta is None


def test_numpy_hook_deltas_and_disabling_them():
    """The numpy path sends the same deltas; track_deltas=() sends none and no tolerance."""
    rng = np.random.default_rng(1)
    a0, a1 = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    sink, off = MemorySink(), MemorySink()
    hook = Hook("cap-np", produce_fn=sink, delta_every=1, delta_atol=0.5, delta_method="exact")
    no = Hook("cap-np-off", produce_fn=off, track_deltas=())
    for h in (hook, no):
        h.record(3, {"w": a0}, collection="weights")
        h.record(7, {"w": a1}, collection="weights")
        h.record(8, {"w": a1}, mode="eval", collection="weights")
        h.close(2)
    recs = sink.records()
    assert recs[1].tolerance == (1e-5, 0.5)
    assert_delta(recs[1].tensors[0].delta, 3, expected_delta(a1, a0, 1e-5, 0.5))
    assert recs[2].mode == "eval" and recs[2].tensors[0].delta is None
    assert all(t.delta is None for r in off.records() for t in r.tensors)
    assert all(r.tolerance is None for r in off.records())


# ---------------------------------------------------------------------------- tanh / sigmoid inputs
def test_tanh_and_sigmoid_inputs_carry_in_range_activity(path):
    """Inputs of tanh and sigmoid modules are "activations" with a per-unit in-range activity histogram."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = nn.Tanh()
            self.s = nn.Sigmoid()

        def forward(self, x):
            return self.s(self.t(x) * 30 - 5)

    rng = np.random.default_rng(2)
    # unit j of 8 is saturated in a different share of samples
    x = rng.normal(size=(400, 8, 3)) * np.array([0.5, 5, 9, 12, 20, 40, 80, 200])[None, :, None]
    sink = MemorySink()
    model = Net()
    hook = TorchHook("cap-sat", produce_fn=sink, save_interval=2, tanh_range=(-9.4999, 9.4999)).attach(model)
    xt = torch.tensor(x, dtype=torch.float32)
    for step in range(3):
        model(xt)
        hook.step(step)
    hook.close(2)
    recs = sink.records()
    assert [r.step for r in recs] == [0, 2]
    x32 = xt.numpy().astype(np.float64)
    s_in = np.tanh(xt).numpy().astype(np.float64) * 30 - 5
    for rec in recs:
        by = {t.name: t for t in rec.tensors}
        assert by["t/Tanh_input"].collection == "activations"
        assert by["t/Tanh_input"].activity == activity(x32, -9.4999, 9.4999)
        assert by["s/Sigmoid_input"].activity == activity(s_in, -23.0, 16.99999)
        # units saturated in most samples exist: the histogram is not trivially all zeros
        assert by["t/Tanh_input"].activity[3] >= 1 and by["t/Tanh_input"].activity[5] >= 3
        assert by["t/Tanh_input"].n == x.size


def test_hook_record_with_an_activity_range_on_both_paths(path):
    """Hook.record(active_range=...) counts a unit active where lo < x < hi, for numpy and torch tensors."""
    x = np.random.default_rng(4).normal(size=(1000, 6)) * np.arange(1, 7) * 5
    sink = MemorySink()
    hook = Hook("cap-range", produce_fn=sink)
    tensors = {"np/Tanh_input": x, "torch/Tanh_input": torch.tensor(x)}
    hook.record(0, tensors, collection="activations", active_range=(-9.4999, 9.4999))
    hook.record(0, {"relu": x}, collection="activations")
    hook.close(2)
    by = {t.name: t.activity for t in sink.records()[0].tensors}
    want = activity(x, -9.4999, 9.4999)
    assert by["np/Tanh_input"] == by["torch/Tanh_input"] == want
    assert by["relu"] == activity(x, 0.0, np.inf) != want


# ---------------------------------------------------------------------------- labels and predictions
def confusion(y: np.ndarray, p: np.ndarray, k: int) -> tuple[int, ...]:
    m = np.zeros((k, k), dtype=np.int64)
    for a, b in zip(y, p, strict=True):
        if 0 <= a < k and 0 <= b < k:
            m[a, b] += 1
    return tuple(m.reshape(-1).tolist())


def test_labels_with_logits_and_with_class_ids(path):
    """Label counts and k*k confusion counts from logits (argmax) or ids; out-of-range ids are not counted."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4))
    ids = rng.integers(0, 4, 150)
    y_bad = np.concatenate([rng.integers(0, 4, 149), [7]])
    sink = MemorySink()
    hook = Hook("cap-labels", produce_fn=sink)
    hook.record_labels(torch.tensor(y), torch.tensor(logits), step=0)
    hook.record_labels(torch.tensor(y_bad), torch.tensor(ids), num_classes=4, name="ids", step=0)
    hook.record_labels(y, logits, name="np", step=0)
    hook.record_labels(torch.tensor(y), name="only", step=0)
    hook.close(2)
    cls = sink.records()[0].classes
    pred = logits.argmax(1)
    assert cls["labels"].labels == tuple(np.bincount(y, minlength=4).tolist())
    assert cls["labels"].confusion == confusion(y, pred, 4)
    assert cls["np"] == cls["labels"]
    assert cls["ids"].labels == tuple(np.bincount(y_bad[y_bad < 4], minlength=4).tolist())
    assert cls["ids"].confusion == confusion(y_bad, ids, 4)
    assert cls["only"].k == int(y.max()) + 1 and cls["only"].confusion is None
    assert cls["labels"].correct() == tuple(int(((y == c) & (pred == c)).sum()) for c in range(4))


def test_more_than_256_classes_send_label_counts_only(path):
    """Above 256 classes only the label counts travel (k*k would be too large)."""
    y = np.arange(600) % 300
    sink = MemorySink()
    hook = Hook("cap-many", produce_fn=sink)
    hook.record_labels(torch.tensor(y), torch.tensor(y[::-1].copy()), num_classes=300, step=0)
    hook.close(2)
    got = sink.records()[0].classes["labels"]
    assert got.k == 300 and got.confusion is None
    assert got.labels == tuple(np.bincount(y, minlength=300).tolist())


# ---------------------------------------------------------------------------- model inputs
def test_image_and_token_inputs(path):
    """Images: per-channel sums and sums of squares (NCHW or channels last); tokens: counts of watched values."""
    rng = np.random.default_rng(6)
    nchw = rng.normal(0.3, 2.0, size=(10, 3, 5, 4)).astype(np.float32)
    nhwc = rng.random(size=(6, 4, 4, 2)).astype(np.float32)
    tokens = rng.integers(0, 6, size=(8, 33))
    sink = MemorySink()
    hook = Hook("cap-inputs", produce_fn=sink)
    hook.record_inputs(torch.tensor(nchw), step=0)
    hook.record_inputs(torch.tensor(nhwc), "last", channel=-1, step=0)
    hook.record_inputs(torch.tensor(tokens), "ids", token_values=(0, 5), step=0)
    hook.record_inputs(nchw, "np_images", step=0)
    hook.record_inputs(tokens, "np_ids", token_values=(0, 5), step=0)
    hook.record_inputs(torch.randn(4, 3), "tabular", step=0)  # neither: skipped
    hook.close(2)
    rec = sink.records()[0]
    img = rec.images["inputs"]
    x = nchw.astype(np.float64)
    assert (img.images, img.pixels) == (10, 20)
    np.testing.assert_allclose(img.sums, x.sum(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(img.sumsq, (x * x).sum(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(rec.images["np_images"].sums, img.sums, rtol=1e-5)
    last = rec.images["last"]
    assert (last.images, last.pixels) == (6, 16)
    np.testing.assert_allclose(last.sums, nhwc.astype(np.float64).sum(axis=(0, 1, 2)), rtol=1e-5)
    tok = rec.tokens["ids"]
    assert tok.total == tokens.size
    assert tok.counts == {0: int((tokens == 0).sum()), 5: int((tokens == 5).sum())}
    assert rec.tokens["np_ids"] == tok
    assert "tabular" not in rec.images and "tabular" not in rec.tokens


def test_auto_input_capture_on_saved_steps_with_one_host_copy(monkeypatch, path):
    """attach(capture_inputs=True) summarises the model input on saved steps; a saved step costs one .cpu()
    with labels, inputs and deltas, and an unsaved step none."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = MemorySink()
    # offload=False: this counts the host copies of the inline path (offloaded, weights and the
    # rest are copied separately, and after step() returns)
    hook = TorchHook("cap-auto", produce_fn=sink, delta_every=1, save_interval=2, offload=False).attach(
        model, opt, capture_inputs=True
    )
    calls: list[int] = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **kw):
        calls.append(1)
        return real_cpu(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    g = torch.Generator().manual_seed(2)
    inputs, per_step = [], []
    for step in range(4):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        inputs.append(x)
        calls.clear()
        out = model(x)
        hook.record_labels(y, out)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook.step(step, loss=loss)
        per_step.append(len(calls))
    monkeypatch.undo()
    hook.close(2)
    assert per_step == [1, 0, 1, 0]
    recs = sink.records()
    assert [r.step for r in recs] == [0, 2]
    for rec in recs:
        x = inputs[rec.step].numpy().astype(np.float64)
        np.testing.assert_allclose(rec.images["inputs"].sums, x.sum(axis=(0, 2, 3)), rtol=1e-5)
        assert sum(rec.classes["labels"].labels) == 8 and len(rec.classes["labels"].confusion) == 25
    assert recs[1].select(["weights"])[0].delta.prev_step == 0


def test_bad_label_input_is_counted_not_raised():
    """Float labels are a usage error: counted and logged, training goes on, the hook stays enabled."""
    sink = MemorySink()
    hook = Hook("cap-bad", produce_fn=sink)
    hook.record_labels(torch.randn(5), step=0)
    hook.record_labels(np.array([0.5, 1.5]), step=0)
    hook.record_inputs(torch.randn(2, 3, 4, 4), kind="pictures", step=0)
    hook.record_scalars(0, {"loss": 1.0})
    assert hook.enabled and hook.stats()["errors"] == 3
    hook.close(2)
    assert sink.records()[0].scalars == {"loss": 1.0} and not sink.records()[0].classes


# ---------------------------------------------------------------------------- wire round trip
def test_all_blocks_round_trip_through_the_wire():
    """One record with deltas, labels, images, tokens and a vector decodes to the values recorded."""
    sink = MemorySink()
    hook = Hook("cap-wire", produce_fn=sink, delta_every=1, announce_every=1, delta_method="exact")
    w0, w1 = np.linspace(-1, 1, 12).reshape(3, 4), np.linspace(-1, 1.5, 12).reshape(3, 4)
    hook.record(0, {"w": w0}, collection="weights")
    hook.record(1, {"w": w1}, collection="weights")
    hook.record_labels(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), step=1)
    hook.record_inputs(np.ones((2, 3, 2, 2)), step=1)
    hook.record_inputs(np.array([[0, 0, 3]]), "ids", step=1)
    hook.record_vector(1, "feature_importance/gain", [3.0, 1.5], labels=["a", "b"])
    hook.close(2)
    rec = wire.decode(sink.payloads[1])
    assert_delta(rec.tensors[0].delta, 0, expected_delta(w1, w0, 1e-5, 1e-8))
    assert rec.classes["labels"] == wire.ClassCounts(3, (1, 2, 1), (1, 0, 0, 0, 1, 1, 0, 0, 1))
    assert rec.images["inputs"] == wire.ImageSums(2, 4, (8.0, 8.0, 8.0), (8.0, 8.0, 8.0))
    assert rec.tokens["ids"] == wire.TokenCounts(3, {0: 2})
    assert rec.vectors["feature_importance/gain"] == wire.Vector((3.0, 1.5), ("a", "b"))


def test_deltas_every_nth_saved_step_by_default() -> None:
    """By default deltas ride on every 10th saved train step, against the previous such step."""
    sent: list[bytes] = []
    hook = Hook("cap-every", produce_fn=lambda t, v, k: sent.append(v))
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    for step in range(25):
        hook.record(step, {"fc.weight": w + step}, collection="weights")
    hook.flush()
    schemas = wire.SchemaCache()
    with_delta = {
        r.step: r.tensors[0].delta for r in (wire.decode(p, schemas) for p in sent) if r.tensors[0].delta
    }
    assert sorted(with_delta) == [10, 20]
    assert with_delta[20].prev_step == 10
    assert with_delta[20].update_l2 == pytest.approx(np.sqrt(12 * 10.0**2), rel=1e-6)


@pytest.mark.parametrize("offload", [False, True])
def test_capture_hooks_stay_between_captured_passes_and_leave_before_the_others(offload: bool) -> None:
    """Registering the activation hooks at every captured pass costs more than calling them: they
    stay registered from one captured pass to the next (and are re-registered when what they
    capture changes: activation inputs on the first saves), and a pass that is not saved runs
    without them. The records are the same either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = MemorySink()
    from tensorpulse.producers.schedule import SaveConfig

    schedule = SaveConfig(end_step=6, save_steps=[8])  # steps 0-5, then 8
    hook = TorchHook("keep", produce_fn=sink, offload=offload, quantile_steps=2, save_config=schedule)
    hook.attach(model, opt)
    relu = model[1]
    x, y = torch.randn(8, 6), torch.randint(0, 2, (8,))
    registered: list[list[int]] = []  # ids of the capture handles, per step (empty: none)
    relu_hooks: list[int] = []
    for step in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        registered.append([id(h) for h in hook._capture_handles])
        relu_hooks.append(len(relu._forward_hooks) + len(relu._forward_pre_hooks))
        hook.step(step)
        opt.step()
    hook.close()
    saved = [0, 1, 2, 3, 4, 5, 8]
    assert [bool(r) for r in registered] == [s in saved for s in range(10)]
    assert [n > 0 for n in relu_hooks] == [s in saved for s in range(10)]
    # steps 0-1 capture ReLU inputs too (quantiles), 2-5 only outputs: registered anew at 2, then kept
    assert registered[0] == registered[1] != registered[2]
    assert registered[2] == registered[3] == registered[4] == registered[5]
    assert relu_hooks[0] == relu_hooks[1] == 2 and relu_hooks[2] == 1
    records = sink.records()
    assert [r.step for r in records] == saved
    for r in records:
        names = {t.name for t in r.tensors}
        assert "1/relu_output" in names, (r.step, names)
        assert ("1/relu_input" in names) == (r.step < 2), (r.step, names)
