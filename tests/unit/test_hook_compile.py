"""TorchHook on a torch.compile'd model: same records and names as eager, no recompiles, no graph breaks."""

from __future__ import annotations

import shutil

import pytest

from tensorpulse import wire

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402 - dynamo's public counters

from tensorpulse.producers.torch import TorchHook  # noqa: E402

STEPS = 7


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small GPT-style language model: token and position embeddings, two blocks, a head."""

    def __init__(self, vocab: int = 32, d: int = 16, block: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList([Block(d), Block(d)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        return self.head(self.ln(x))


def _run(order: str, backend: str | None, offload: bool, interval: int) -> list[wire.StepRecord]:
    """STEPS steps of TinyGPT with the hook attached before or after compiling (or never)."""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sent: list[bytes] = []
    hook = TorchHook("compiled", produce_fn=lambda t, v, k: sent.append(v), offload=offload, save_interval=interval)
    if order == "attach_first":
        hook.attach(model, opt)
        run = torch.compile(model, backend=backend)
    elif order == "compile_first":
        run = torch.compile(model, backend=backend)
        hook.attach(run, opt)
    else:
        run = model
        hook.attach(model, opt)
    g = torch.Generator().manual_seed(1)
    try:
        for step in range(STEPS):
            if step == 2 and order != "eager":
                # Compiled by now (a saved step and one that is not): from here on a recompile
                # raises (fail_on_recompile fails any compile) instead of passing unnoticed.
                torch.compiler.set_stance("fail_on_recompile")
            idx = torch.randint(0, 32, (2, 8), generator=g)
            loss = nn.functional.cross_entropy(run(idx).flatten(0, 1), idx.flatten())
            loss.backward()
            hook.step(step, loss=loss)
            opt.step()
            opt.zero_grad()
    finally:
        torch.compiler.set_stance("default")
    hook.close()
    assert hook.stats()["errors"] == 0
    schemas = wire.SchemaCache()
    return [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"]


BACKENDS = ["eager", "aot_eager"]
if shutil.which("g++") or shutil.which("c++"):
    BACKENDS.append("inductor")  # the default backend; it needs a C++ compiler on the CPU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["attach_first", "compile_first"])
def test_compiled_model_is_captured_with_eager_names_and_no_recompiles(order: str, backend: str) -> None:
    """Either order: records at every saved step under the eager run's names, one graph, no graph break."""
    torch._dynamo.reset()
    counters.clear()
    eager = _run("eager", None, offload=True, interval=2)
    compiled = _run(order, backend, offload=True, interval=2)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # the model's forward, whole
    assert [(r.step, r.mode) for r in compiled] == [(r.step, r.mode) for r in eager]
    eager_names = {t.name for r in eager for t in r.tensors if not t.collection.startswith("activation")}
    compiled_names = {t.name for r in compiled for t in r.tensors}
    assert compiled_names == eager_names  # activations excepted: not captured under compile
    assert "h.0.attn.in_proj_weight" in compiled_names and "gradient/head.weight" in compiled_names
    assert all("loss" in r.scalars for r in compiled)


@pytest.mark.parametrize("order", ["attach_first", "compile_first"])
@pytest.mark.parametrize("offload", [True, False])
def test_compiled_model_every_step_without_offload_and_with(order: str, offload: bool) -> None:
    """Saving every step, on the training thread or offloaded: every step recorded, nothing raised."""
    torch._dynamo.reset()
    counters.clear()
    records = _run(order, "eager", offload=offload, interval=1)
    assert dict(counters["graph_break"]) == {}
    assert [r.step for r in records if r.mode == "train"] == list(range(STEPS))
    grads = [t for t in records[-1].tensors if t.collection == "gradients"]
    assert grads and all(t.nan == 0 for t in grads)


def test_a_submodule_compiled_alone_keeps_its_names() -> None:
    """model.h[0] = torch.compile(model.h[0]): its parameters keep their eager names, no recompiles."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = TinyGPT()
    model.h[0] = torch.compile(model.h[0], backend="eager")
    sent: list[bytes] = []
    hook = TorchHook("block", produce_fn=lambda t, v, k: sent.append(v), save_interval=2).attach(model)
    g = torch.Generator().manual_seed(1)
    try:
        for step in range(4):
            if step == 2:
                torch.compiler.set_stance("fail_on_recompile")
            idx = torch.randint(0, 32, (2, 8), generator=g)
            nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
            hook.step(step)
            model.zero_grad()
    finally:
        torch.compiler.set_stance("default")
    hook.close()
    schemas = wire.SchemaCache()
    names = {t.name for p in sent if (r := wire.decode(p, schemas)).kind == "step" for t in r.tensors}
    assert "h.0.ln1.weight" in names and "gradient/h.0.mlp.0.weight" in names
    assert not any("_orig_mod" in n for n in names)
    assert "h.1.mlp.1/gelu_output" in names and "h.0.mlp.1/gelu_output" not in names
    assert dict(counters["graph_break"]) == {}


def test_no_dynamo_until_the_user_compiles_then_attach_first_still_clean() -> None:
    """In a fresh interpreter: the hook itself never imports torch._dynamo (about 140 MiB of resident
    memory; torch's own optimizers import it, so the model here is updated by hand); compiling after
    attaching then works with no graph break, no recompile and the eager names."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        from tensorpulse import wire
        from tensorpulse.producers.torch import TorchHook

        torch.manual_seed(0)
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 32)

            def forward(self, x):
                return self.fc2(self.act(self.fc1(x)))

        model = Net()
        sent = []
        hook = TorchHook("lazy", produce_fn=lambda t, v, k: sent.append(v), offload=False).attach(model)
        g = torch.Generator().manual_seed(1)

        def train(run, step):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 32, (4,), generator=g)
            loss = nn.functional.cross_entropy(run(x), y)
            loss.backward()
            hook.step(step, loss=loss)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-3 * p.grad
                    p.grad = None

        for step in range(2):
            train(model, step)
        assert "torch._dynamo" not in sys.modules, "the hook imported torch._dynamo"
        run = torch.compile(model, backend="eager")
        from torch._dynamo.utils import counters
        for step in range(2, 8):
            if step == 4:
                torch.compiler.set_stance("fail_on_recompile")
            train(run, step)
        torch.compiler.set_stance("default")
        hook.close()
        assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
        assert hook.stats()["errors"] == 0, hook.stats()
        schemas = wire.SchemaCache()
        recs = [r for r in (wire.decode(p, schemas) for p in sent) if r.kind == "step"]
        assert [r.step for r in recs] == list(range(8)), [r.step for r in recs]
        names = {t.name for t in recs[-1].tensors}
        assert "fc2.weight" in names and not any("_orig_mod" in n for n in names), sorted(names)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
