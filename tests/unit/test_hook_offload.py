"""Offloaded reductions give the same records as reductions on the training thread.

Several tests reach into TorchHook's private offload state (`_jobs`, `_weights`, `_staged`,
`_guard_handles`, `_reduce`): the order in which the background jobs run and what the training
thread waits for are the behaviour under test, and the hook deliberately shows none of it to its
users (its public face is `step`, `flush`, `close`, `stats`).
"""

from __future__ import annotations

import copy
import time

import pytest
from waits import wait_for

from tensorpulse import wire

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402


def _train(hook, model, opt, steps: int, order: str, seed: int, set_to_none: bool = True, after=None) -> None:
    """`steps` steps on seeded batches, hook.step() before or after the optimizer's step;
    `after()` runs at the end of each step."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, y = torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if order == "before":
            hook.step(step, loss=loss)
        opt.step()
        if order == "after":
            hook.step(step, loss=loss)
        if after is not None:
            after()


def _records(sent: list[bytes]) -> list[wire.StepRecord]:
    schemas = wire.SchemaCache()
    return [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"]


def _run(offload: bool, order: str, set_to_none: bool, model: nn.Module) -> list[wire.StepRecord]:
    sent: list[bytes] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("off", produce_fn=lambda t, v, k: sent.append(v), offload=offload, delta_every=1)
    hook.attach(model, opt)
    _train(hook, model, opt, 12, order, 1, set_to_none)
    hook.close()
    return _records(sent)


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_offloaded_statistics_equal_inline_ones(order: str, set_to_none: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    inline = _run(False, order, set_to_none, copy.deepcopy(model))
    offloaded = _run(True, order, set_to_none, copy.deepcopy(model))
    assert [r.step for r in offloaded] == list(range(12))
    for a, b in zip(inline, offloaded, strict=True):
        assert a.scalars == b.scalars
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for ta, tb in zip(a.tensors, b.tensors, strict=True):
            assert (ta.n, ta.mean, ta.std, ta.min, ta.max, ta.zeros) == (tb.n, tb.mean, tb.std, tb.min, tb.max, tb.zeros)
            assert ta.delta == tb.delta


def test_offload_argument_is_checked() -> None:
    from tensorpulse.errors import ConfigError

    with pytest.raises(ConfigError, match="offload"):
        TorchHook("off", produce_fn=lambda *a: None, offload="sometimes")


def test_an_activation_changed_while_reduced_in_the_background_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    """An in-place op that autograd records replaces the activation's grad_fn, which tells it."""
    from tensorpulse.producers.offload import _Deferred

    hook = TorchHook("off", produce_fn=lambda *a: None, offload=True)
    x = torch.ones(4, requires_grad=True)
    h = x * 2  # a module's output, as autograd records it
    kept = _Deferred(h.detach(), h, h.grad_fn, {})
    hook._check_unchanged(kept)
    assert "changed in place" not in caplog.text
    h.mul_(0.5)  # e.g. a later in-place op on the module's output
    hook._check_unchanged(kept)
    assert "changed in place" in caplog.text
    hook.close()


def test_weights_are_read_between_optimizer_steps_in_the_background() -> None:
    """With an optimizer, the weights' reduction starts after its step, off the training thread;
    with zero_grad before the forward pass, no backward needs a gradient guard."""
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("off", produce_fn=lambda *a: None, offload=True).attach(model, opt)
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert hook._guard_handles == [] and all(not p._backward_hooks for p in model.parameters())
        hook.step(step)
        opt.step()
        assert hook._weights is not None and hook._weights.generation == step + 1 and not hook._weights.taken
    hook.close()


@pytest.mark.parametrize(("interval", "jobs_per_step"), [(1, 1), (2, 2)])
def test_a_step_before_the_optimizer_shares_one_background_job_with_the_next_weights(
    interval: int, jobs_per_step: int
) -> None:
    """hook.step() then optimizer.step(): the step's gradients and activations ride in the job
    that reads the next step's weights (one handover per step); when the next step is not saved
    the step's job goes alone, after its weights' own job (two per saved step)."""
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sent: list[bytes] = []
    hook = TorchHook("off", produce_fn=lambda t, v, k: sent.append(v), offload=True, save_interval=interval)
    hook.attach(model, opt)
    submitted: list[str] = []
    original = hook._submit

    def counting(fn, *args):
        submitted.append(fn.__name__)
        return original(fn, *args)

    hook._submit = counting  # type: ignore[method-assign]
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    steps = 8
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        hook.step(step)
        opt.step()
    hook.close()
    saved = steps // interval
    # the first step's weights are read on their own (at the first forward pass); the first saved
    # step's gradients and activations on the training thread (no earlier gradients to tell
    # in-place zeroing by: `_grads_reused`), which at interval 2 saves that step's own job
    assert len(submitted) == 1 + saved * jobs_per_step - (jobs_per_step - 1), submitted
    if interval == 1:
        assert submitted[1:] == ["_reduce_both"] * saved
    schemas = wire.SchemaCache()
    records = [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"]
    assert [r.step for r in records] == list(range(0, steps, interval))
    assert all(any(t.name == "gradient/0.weight" for t in r.tensors) for r in records)
    assert all(any(t.name == "0.weight" for t in r.tensors) for r in records)


def test_a_failing_part_of_a_shared_job_leaves_the_other_part() -> None:
    """The step part of a shared job fails: the job raises, the weights part is still read."""
    from tensorpulse.producers.worker import Outcome

    model = nn.Sequential(nn.Linear(4, 3))
    hook = TorchHook("off", produce_fn=lambda *a: None, offload=True).attach(model)

    def failing(*args):
        raise RuntimeError("boom in the step part")

    hook._reduce = failing  # type: ignore[method-assign]
    tensors = [p for _, _, p in hook._param_items]
    weights = Outcome()
    with pytest.raises(RuntimeError, match="boom"):
        hook._reduce_both(weights, 0, tensors, None, [("step args",)])
    assert weights.done() and weights.exception() is None
    assert weights.result().n.tolist() == [12, 3]
    hook.close()


@pytest.mark.parametrize("offload", [False, True])
def test_the_one_kernel_call_path_gives_the_records_of_the_torch_path(
    offload: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Numba on (one batch call per job, numba weight deltas) or off (torch ops): same records."""
    pytest.importorskip("numba")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))
    monkeypatch.setenv("TENSORPULSE_NUMBA", "0")
    ops = _run(offload, "before", True, copy.deepcopy(model))
    monkeypatch.setenv("TENSORPULSE_NUMBA", "1")
    fused = _run(offload, "before", True, copy.deepcopy(model))
    assert [r.step for r in fused] == [r.step for r in ops] == list(range(12))
    for a, b in zip(ops, fused, strict=True):
        assert a.scalars == pytest.approx(b.scalars)
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for ta, tb in zip(a.tensors, b.tensors, strict=True):
            assert (ta.n, ta.min, ta.max, ta.zeros, ta.nan, ta.inf) == (tb.n, tb.min, tb.max, tb.zeros, tb.nan, tb.inf)
            assert (ta.mean, ta.std) == pytest.approx((tb.mean, tb.std), rel=1e-5, abs=1e-7)
            assert ta.activity == tb.activity
            assert (ta.delta is None) == (tb.delta is None)
            if ta.delta is not None:
                da, db = ta.delta, tb.delta
                assert da.prev_step == db.prev_step
                assert (da.update_l2, da.prev_l2) == pytest.approx((db.update_l2, db.prev_l2), rel=1e-4, abs=1e-9)
                assert da.exact == db.exact


class _ScaledGelu(nn.Module):
    """Changes its activation in place after the activation module ran (GELU keeps its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        h.mul_(0.5)
        return self.out(h)


def test_an_activation_changed_after_its_module_is_reported_on_the_training_thread_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("numba")
    model = _ScaledGelu()
    hook = TorchHook("off", produce_fn=lambda *a: None, offload=False)
    hook.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(3, 4)).sum().backward()
    hook.step(0)
    hook.close()
    assert "changed in place" in caplog.text


def test_the_optimizer_waits_for_the_weights_not_for_the_step_sharing_their_job() -> None:
    import threading

    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("off", produce_fn=lambda *a: None, offload=True).attach(model, opt)
    release = threading.Event()
    original = hook._reduce

    def slow(*args):
        release.wait(10)
        return original(*args)

    for step in range(2):  # step 0 is read on the training thread (`_grads_reused`), step 1 not
        if step == 1:
            hook._reduce = slow  # type: ignore[method-assign]
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 10)), torch.randint(0, 3, (16,))).backward()
        hook.step(step)
        opt.step()  # its post-hook starts one job: the weights of step 2, then step 1's gradients
    try:
        assert hook._weights is not None
        hook._weights.future.result(timeout=5)  # read while the step part still waits
        assert not hook._jobs[-1].future.done()
    finally:
        release.set()
        hook.close()


@pytest.mark.parametrize("output", ["tensor", "object"])
def test_the_next_backward_waits_for_the_job_holding_the_old_gradients(output: str) -> None:
    """A background job still reading step 1's gradients when step 2's backward starts: the
    backward waits for it before producing a gradient, and the old gradients are freed by then
    (with zero_grad(set_to_none=True) both sets would otherwise live at once). The job goes on
    only once the training thread waits for it, so that nothing depends on timing. "object": an
    output autograd cannot hook (the parameters' own hooks wait instead)."""
    import threading
    import weakref

    from waits import stack_of

    class Boxed(nn.Module):  # returns its output inside an object that is not a tensor container
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x):
            return type("Out", (), {"logits": self.net(x)})()

    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)) if output == "tensor" else Boxed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("held", produce_fn=lambda *a: None, offload=True).attach(model, opt)
    trainer = threading.current_thread()
    original = hook._reduce

    def late(*args):  # the job starts only once the training thread waits for it
        wait_for(lambda: "_wait_for_held_gradients" in stack_of(trainer), what="the backward waiting")
        return original(*args)

    def logits(out):
        return out if output == "tensor" else out.logits

    old: list = []
    for step in range(2):  # step 0 is read on the training thread (`_grads_reused`), step 1 not
        if step == 1:
            hook._reduce = late  # type: ignore[method-assign]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits(model(torch.randn(16, 10))), torch.randint(0, 3, (16,))).backward()
        old = [weakref.ref(p.grad) for p in model.parameters()]
        hook.step(step)
        opt.step()
    alive_at_new_gradient: list[int] = []
    for p in model.parameters():
        # "tensor": before any parameter's gradient reaches autograd's accumulation; "object":
        # the parameters' hooks registered at the forward pass run after this test's, so the
        # check comes once the new gradient is stored
        count = lambda *_: alive_at_new_gradient.append(sum(r() is not None for r in old))  # noqa: E731
        p.register_hook(count) if output == "tensor" else p.register_post_accumulate_grad_hook(count)
    try:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits(model(torch.randn(16, 10))), torch.randint(0, 3, (16,))).backward()
        assert alive_at_new_gradient and alive_at_new_gradient[0] == 0, alive_at_new_gradient
        assert all(r() is None for r in old)
        assert hook.stats()["gradient_waits"] == 1
    finally:
        hook.close()


def test_a_backward_reduces_the_old_gradients_itself_while_the_job_reads_the_weights() -> None:
    """The job that holds step 1's gradients is still reading the next weights (blocked here)
    when step 2's backward starts: the training thread takes the gradients out of the job and
    reduces them, instead of waiting for the weights too; their record is the one the job would
    have made, and the optimizer still waits for the weights."""
    import threading
    import weakref

    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sent: list[bytes] = []
    hook = TorchHook("steal", produce_fn=lambda t, v, k: sent.append(v), offload=True).attach(model, opt)
    release = threading.Event()
    reduce_weights = hook._reduce_weights
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]

    def blocked(*args):
        release.wait(10)
        return reduce_weights(*args)

    old: list = []
    try:
        for step, (x, y) in enumerate(batches[:2]):
            if step == 1:
                hook._reduce_weights = blocked  # type: ignore[method-assign]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            old = [weakref.ref(p.grad) for p in model.parameters()]
            hook.step(step)
            opt.step()  # its post-hook starts one job: the weights of step 2 (blocked), then step 1's
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(batches[2][0]), batches[2][1]).backward()
        assert all(r() is None for r in old)
        assert hook._weights is not None and not hook._weights.future.done()
        assert hook._jobs[-1].future.done() and hook.stats()["gradient_waits"] == 1
    finally:
        release.set()
        hook.close()
    schemas = wire.SchemaCache()
    records = {r.step: r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"}
    assert any(t.name == "gradient/0.weight" for t in records[1].tensors)
    assert any(t.name == "0.weight" for t in records[1].tensors)


def _accumulating(offload: bool, model: nn.Module, slow_job_s: float = 0.0) -> tuple[list[wire.StepRecord], int]:
    """Two micro-batches per optimizer step, each saved (hook.step after its backward): the second
    backward accumulates into the gradients the first one's job reads."""
    sent: list[bytes] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("acc", produce_fn=lambda t, v, k: sent.append(v), offload=offload)
    hook.attach(model, opt)
    if slow_job_s:  # the job would read the gradients after the next backward, if nothing waited
        reduce = hook._reduce

        def slow(*args, **kwargs):
            time.sleep(slow_job_s)  # sleep-ok: a slow reduction is the case under test, not a wait
            return reduce(*args, **kwargs)

        hook._reduce = slow  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(3)
    guarded = 0
    for step in range(8):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        guarded += bool(hook._guard_handles)
        hook.step(step)
        if step % 2:
            opt.step()
            opt.zero_grad()
    hook.close()
    schemas = wire.SchemaCache()
    return [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"], guarded


def test_gradients_accumulated_in_place_wait_for_the_job_still_reading_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    inline, _ = _accumulating(False, copy.deepcopy(model))
    offloaded, guarded = _accumulating(True, copy.deepcopy(model), slow_job_s=0.05)
    # the second micro-batch of each optimizer step but the first: the first saved step is read
    # on the training thread (`_grads_reused`: nothing to compare its gradients with)
    assert guarded == 3
    assert [r.step for r in offloaded] == list(range(8))
    for a, b in zip(inline, offloaded, strict=True):
        grads_a = {t.name: (t.mean, t.std, t.min, t.max) for t in a.tensors if t.name.startswith("gradient/")}
        grads_b = {t.name: (t.mean, t.std, t.min, t.max) for t in b.tensors if t.name.startswith("gradient/")}
        assert grads_a and grads_a == grads_b, a.step



def _wait_background(hook: TorchHook) -> None:
    """Wait for the jobs already handed to the background thread (not for a staged one)."""
    for job in list(hook._jobs):
        job.future.exception(timeout=60)
    if hook._weights is not None:
        hook._weights.future.exception(timeout=60)


def _hooks_on(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    return len(model._forward_pre_hooks) + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


#: The two forward pre-hooks that stay on the model while the hook is attached: they notice a
#: switch of mode (no wrapped model.train) and, while disarmed, return at once.
WATCH = 2


def _train_saving_every(interval: int, offload: bool, order: str, model: nn.Module, *, disarm: bool = True):
    """13 steps saved every `interval`, each step's background jobs waited for before the next;
    returns (whether any hook of ours was on the model or optimizer after each step, records)."""
    sent: list[bytes] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook = TorchHook("arm", produce_fn=lambda t, v, k: sent.append(v), offload=offload, save_interval=interval)
    hook.attach(model, opt)
    if not disarm:
        hook._disarm = lambda: None  # type: ignore[method-assign]
    hooked: list[bool] = []

    def after() -> None:
        hooked.append(_hooks_on(model, opt) > WATCH)
        _wait_background(hook)

    _train(hook, model, opt, 13, order, 2, after=after)
    hook.close()
    return hooked, _records(sent)


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("order", ["after", "before"])
def test_between_saves_the_hook_unhooks_itself_and_records_stay_the_same(offload: bool, order: str) -> None:
    """Saving every 5 steps: once a save's job is read, no hook of ours but the two forward
    pre-hooks (which return at once) runs on the steps that are not saved; they are back before
    the next saved step, whose records are unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    hooked, records = _train_saving_every(5, offload, order, copy.deepcopy(model))
    _, always = _train_saving_every(5, offload, order, copy.deepcopy(model), disarm=False)
    # on at the saved steps 0, 5, 10 and at the step before each; off from the second step after
    # a save (the first one unhooks only if the save's job was already read)
    assert [hooked[i] for i in (0, 4, 5, 9, 10)] == [True] * 5
    assert [hooked[i] for i in (2, 3, 7, 8, 12)] == [False] * 5
    assert [r.step for r in records] == [r.step for r in always] == [0, 5, 10]
    for a, b in zip(always, records, strict=True):
        assert a.scalars == b.scalars
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        assert any(t.name.endswith("relu_output") for t in b.tensors)
        for ta, tb in zip(a.tensors, b.tensors, strict=True):
            assert (ta.n, ta.mean, ta.std, ta.min, ta.max, ta.zeros, ta.activity) == (
                tb.n, tb.mean, tb.std, tb.min, tb.max, tb.zeros, tb.activity
            )


def _offloaded(interval: int, steps: int):
    """A hooked model trained `steps` steps, saving every `interval`, its background jobs waited
    for at every step; returns (records sent so far, model, optimizer, hook)."""
    sent: list[bytes] = []
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("arm", produce_fn=lambda t, v, k: sent.append(v), offload=True, save_interval=interval)
    hook.attach(model, opt)
    _train(hook, model, opt, steps, "before", 3, after=lambda: _wait_background(hook))
    return sent, model, opt, hook


def test_a_saved_steps_record_leaves_at_the_next_steps_not_at_the_next_save() -> None:
    """Offloaded, at interval 10 a record used to wait for the next saved step(), ten steps on."""
    sent, _, _, hook = _offloaded(10, 3)
    # The publisher thread hands it over on its own clock: wait for the record, not for time.
    wait_for(lambda: sent, 10, "step 0's record to reach the transport")
    assert [r.step for r in _records(sent)] == [0]
    hook.close()


def test_switching_to_eval_hooks_the_next_saved_eval_pass() -> None:
    """Unhooked between train saves, the first pass after model.eval() brings the hooks back when
    the eval step is saved, and that pass is captured."""
    sent, model, opt, hook = _offloaded(5, 3)
    assert _hooks_on(model, opt) == WATCH  # unhooked: steps 3 and 4 are not saved
    model.eval()
    assert _hooks_on(model, opt) == WATCH  # model.eval() is the model's own: nothing happens yet
    with torch.no_grad():
        model(torch.randn(8, 10))
    assert _hooks_on(model, opt) == WATCH + 2  # the pass saw the switch: eval step 0 is saved
    hook.step(0, mode="eval")
    model.train()
    hook.close()
    evals = [r for r in _records(sent) if r.mode == "eval"]
    assert [r.step for r in evals] == [0]
    assert any(t.name.endswith("relu_output") for t in evals[0].tensors)


def test_a_deepcopy_of_the_hooked_model_switches_its_own_mode() -> None:
    """A deepcopy of the hooked model (EMA-style) switches its own mode; its passes are not ours.
    (The copy's hook registrations hold the same TorchHook: `TorchHook.__deepcopy__` returns it.)"""
    sent, model, _, hook = _offloaded(5, 3)
    ema = copy.deepcopy(model)
    ema.eval()
    assert model.training and not ema.training
    model.eval()
    assert not model.training
    model.train()
    for step in (3, 4):  # copied while hooked (step 5 is saved): the copy's passes are ignored
        hook.step(step)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema(torch.randn(8, 10))
    model(torch.randn(8, 10)).sum().backward()
    hook.step(5)
    hook.close()
    assert [r.step for r in _records(sent)] == [0, 5]
    assert any(t.name.endswith("relu_output") for t in _records(sent)[1].tensors)


def test_a_saved_step_that_comes_while_unhooked_is_still_published() -> None:
    """Step numbers that skip (3, then 5) reach a saved step with the hooks off: its job goes at once."""
    sent, model, opt, hook = _offloaded(5, 4)  # steps 0-3
    assert _hooks_on(model, opt) == WATCH
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    hook.step(5)  # saved, seen without its forward pass
    assert hook._staged is None and len(hook._jobs) == 1
    opt.step()
    hook.close()
    got = {r.step: r for r in _records(sent)}
    assert sorted(got) == [0, 5]
    assert any(t.name == "gradient/0.weight" for t in got[5].tensors)


def test_finite_kernel_columns_encode_as_the_checked_path_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Columns marked finite (the fused kernel's) skip to_block's checks; the block must not change."""
    import dataclasses

    from tensorpulse.producers import stats_numba
    from tensorpulse.producers.stats_numpy import Columns

    if not stats_numba.enabled():
        pytest.skip("numba is not installed")
    taken: list[bool] = []
    same: list[bool] = []
    to_block = Columns.to_block

    def both_ways(cols: Columns, names, collections, tolerance=None):  # noqa: ANN001, ANN202
        block = to_block(cols, names, collections, tolerance)
        taken.append(cols.finite)
        if cols.finite:  # runs on the publisher thread, which logs exceptions: kept for below
            checked = to_block(dataclasses.replace(cols, finite=False), names, collections, tolerance)
            args = {"job": "j", "rank": 0, "world": 1, "step": 0, "mode": "train", "ts": 0.0}
            same.append(wire.encode(**args, tensors=block, sid=1) == wire.encode(**args, tensors=checked, sid=1))
            same.append(bool(block.activity) and not (block.quantiles or block.deltas or block.nan is not None))
        return block

    monkeypatch.setattr(Columns, "to_block", both_ways)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("fin", produce_fn=lambda t, v, k: None, offload=True, quantile_steps=2, delta_every=5)
    hook.attach(model, opt)
    _train(hook, model, opt, 12, "before", 3)
    hook.close()
    # the first two saves carry quantiles, every fifth weight deltas: their columns are checked
    assert len(taken) == 12 and not any(taken[:2]) and not taken[5] and not taken[10]
    assert sum(taken) == 8, taken
    assert len(same) == 16 and all(same), same


@pytest.mark.parametrize("offload", [True, False])
def test_the_hook_replaces_no_method_of_the_model_or_the_optimizer(offload: bool) -> None:
    """Attached (offloading or not), the model's and the optimizer's methods are their own: the
    hook uses their hooks only (model.train, zero_grad: the class's, not instance attributes)."""
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("own", produce_fn=lambda *a: None, offload=offload).attach(model, opt)
    for step in range(3):
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(torch.randn(16, 10)), torch.randint(0, 3, (16,))).backward()
        hook.step(step)
        opt.step()
    assert {"train", "eval", "zero_grad"}.isdisjoint(vars(model)) and "zero_grad" not in vars(opt)
    hook.close()
