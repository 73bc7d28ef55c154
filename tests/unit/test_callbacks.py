"""Framework callbacks without a broker: real tiny Lightning, Trainer and Keras runs on the CPU whose
records go to a list (the hook's `produce_fn`), and the shared core's handling of bad input."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import pytest

from tensorpulse.producers.callbacks import CallbackCore, never_raises
from tensorpulse.producers.hook import Hook

torch = pytest.importorskip("torch")
from memory_sink import MemorySink  # noqa: E402
from torch import nn  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402

LOGGER = "tensorpulse.producers"


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# ---------------------------------------------------------------------- TorchHook.step(hold=True)
@pytest.mark.parametrize("offload", [False, True])
def test_held_record_gets_late_scalars(offload: bool) -> None:
    """Scalars recorded after step(hold=True) join that step's record; release publishes one record per step."""
    sink = MemorySink()
    hook = TorchHook("hold-unit", produce_fn=sink, offload=offload)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.attach(model, opt)
    for step in range(6):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        hook.step(step, hold=True)
        opt.zero_grad()  # the gradients are gone before the late scalars come
        if step % 2:
            hook.record_scalars(step, {"late": float(step)})
        hook.release(step)
    hook.close()
    records = sink.records()
    assert [r.step for r in records] == list(range(6))
    assert [r.scalars.get("late") for r in records] == [None, 1.0, None, 3.0, None, 5.0]
    assert all(any(t.collection == "gradients" for t in r.tensors) for r in records)


# ---------------------------------------------------------------------- the shared core
def test_core_rejects_bad_options_at_construction() -> None:
    """A bad job id or save interval raises where the callback is made, not during training."""
    from tensorpulse.errors import ConfigError

    with pytest.raises(ConfigError):
        CallbackCore("Test", "bad job id!", None, 1, {}, Hook)
    with pytest.raises(ConfigError):
        CallbackCore("Test", "job", None, 0, {}, Hook)


def test_core_scalars_keep_numbers_and_say_once(caplog: pytest.LogCaptureFixture) -> None:
    """Numbers and one-element tensors pass; a string or a vector is left out with one warning per name."""
    import numpy as np

    core = CallbackCore("Test", "job", None, 1, {"produce_fn": MemorySink()}, Hook)
    caplog.set_level(logging.WARNING, LOGGER)
    values: dict[str, Any] = {
        "loss": 0.5,
        "count": 3,
        "np": np.float32(1.5),
        "t": torch.tensor(2.0),
        "note": "hello",
        "vec": torch.ones(3),
        "eval_acc": np.array([0.25]),
    }
    for _ in range(2):
        out = core.scalars(values, strip="eval_")
    assert set(out) == {"loss", "count", "np", "t", "acc"}
    assert out["acc"] == 0.25 and isinstance(out["t"], torch.Tensor)
    assert len(_warnings(caplog, "'note' is not a number")) == 1
    assert len(_warnings(caplog, "'vec' is not a number")) == 1


def test_core_version_and_parameters_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """An unsupported version, a model without parameters and a frozen model each get one clear warning."""
    core = CallbackCore("Test", "job", None, 1, {"produce_fn": MemorySink()}, Hook)
    caplog.set_level(logging.WARNING, LOGGER)
    for _ in range(2):
        core.check_version("lightning", "1.9.5", (2, 0), (3,))
        core.check_version("lightning", "2.6.1rc0+cu121", (2, 0), (3,))  # in range: silent
        core.check_parameters([])
    assert _warnings(caplog, "1.9.5 is outside the range") and len(_warnings(caplog, "outside")) == 1
    assert len(_warnings(caplog, "has no parameters")) == 1
    core2 = CallbackCore("Test", "job", None, 1, {"produce_fn": MemorySink()}, Hook)
    core2.check_parameters([("w", False), ("b", False)])
    assert len(_warnings(caplog, "is frozen")) == 1


def test_never_raises_logs_once_and_returns_none(caplog: pytest.LogCaptureFixture) -> None:
    """A failing callback method returns None and logs one warning, however often it fails."""

    class Broken:
        core = CallbackCore("Test", "job", None, 1, {"produce_fn": MemorySink()}, Hook)

        @never_raises
        def on_step(self) -> int:
            raise RuntimeError("framework object shaped unexpectedly")

    caplog.set_level(logging.WARNING, LOGGER)
    assert [Broken().on_step() for _ in range(3)] == [None, None, None]
    assert len(_warnings(caplog, "framework object shaped unexpectedly")) == 1


# ---------------------------------------------------------------------- Lightning
def _lightning_run(sink: MemorySink, *, frozen: bool = False, max_epochs: int = 2) -> Any:
    L = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (tensorpulse[lightning])")
    from torch.utils.data import DataLoader, TensorDataset

    from tensorpulse.producers.lightning import TensorPulseCallback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
            self.bias = nn.Parameter(torch.zeros(1))  # keeps the loss differentiable when frozen
            if frozen:
                self.net.requires_grad_(False)

        def forward(self, x):
            return self.net(x) + self.bias

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("train_mse", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    train = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    val = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    callback = TensorPulseCallback("pl-unit", produce_fn=sink)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accumulate_grad_batches=2,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))
    return trainer


def test_lightning_counts_optimizer_steps_and_records_validation() -> None:
    """With 2 micro-batches per step: one train record per optimizer step, with loss, lr and logged
    metrics; one eval record per validation run at the optimizer steps done, with the val loss."""
    sink = MemorySink()
    trainer = _lightning_run(sink)
    assert trainer.global_step == 8  # 64 rows / 8 per batch / 2 per step, 2 epochs
    train = sink.records("train")
    assert [r.step for r in train] == list(range(8))
    assert all({"loss", "lr", "train_mse"} <= set(r.scalars) for r in train)
    names = {t.name for t in train[0].tensors}
    assert {"net.0.weight", "gradient/net.0.weight", "net.1/relu_output"} <= names
    evals = sink.records("eval")
    assert [r.step for r in evals] == [4, 8]  # not the sanity check
    assert all(r.scalars["loss"] == r.scalars["val_loss"] for r in evals)
    assert not any("val_loss" in r.scalars for r in train)
    assert sink.records()[-1].step == 8 and sink.decoded()[-1].kind == "end"


def test_lightning_partly_frozen_model_trains() -> None:
    """A frozen network with a trainable output bias: weights of both sent, gradients of the bias only."""
    sink = MemorySink()
    trainer = _lightning_run(sink, frozen=True, max_epochs=1)
    assert trainer.global_step == 4
    train = sink.records("train")
    assert len(train) == 4
    names = {t.name for t in train[-1].tensors}
    assert {"net.0.weight", "bias", "gradient/bias"} <= names and "gradient/net.0.weight" not in names


# ---------------------------------------------------------------------- Hugging Face Trainer
def test_transformers_logs_join_their_step_and_eval_is_renamed() -> None:
    """Trainer with 2 accumulation steps and logging_steps=1: one train record per optimizer step
    carrying the logged loss; one eval record per evaluation, "eval_loss" as "loss"."""
    pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate is not installed (tensorpulse[transformers])")
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from tensorpulse.producers.transformers import TensorPulseCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int):
            ids = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
        )
    )
    sink = MemorySink()
    args = TrainingArguments(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "hf-unit"),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    callback = TensorPulseCallback("hf-unit", produce_fn=sink, offload=False)
    Trainer(
        model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(), callbacks=[callback]
    ).train()
    train = sink.records("train")
    assert [r.step for r in train] == [0, 1, 2, 3]
    assert all({"loss", "grad_norm", "learning_rate"} <= set(r.scalars) for r in train)
    assert any(t.name == "gradient/transformer.h.0.mlp.c_fc.weight" for t in train[0].tensors)
    evals = sink.records("eval")
    assert [r.step for r in evals] == [2, 4]
    assert all("loss" in r.scalars and "eval_loss" not in r.scalars for r in evals)
    assert callback.hook is None  # closed at the end of training


# ---------------------------------------------------------------------- Keras
def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="Keras 3 is not installed (tensorpulse[keras])")
    if keras.backend.backend() != "torch":
        pytest.skip(f"Keras runs on the {keras.backend.backend()} backend here; these tests need torch")
    return keras


def test_keras_records_weights_gradients_logs_and_eval() -> None:
    """Keras on torch: weights and gradients by Keras path, loss/metrics/lr per optimizer step, and
    one eval record per validation at the optimizer steps done."""
    keras = _keras()
    import numpy as np

    from tensorpulse.producers.keras import TensorPulseCallback

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, name="hidden"), keras.layers.Dense(1, name="out")],
        name="net",  # Keras numbers unnamed models per process: sequential_1, ...
    )
    model.compile(keras.optimizers.SGD(0.05), "mse", metrics=["mae"])
    sink = MemorySink()
    rng = np.random.default_rng(0)
    model.fit(
        rng.normal(size=(32, 4)),
        rng.normal(size=(32, 1)),
        batch_size=8,
        epochs=2,
        verbose=0,
        validation_data=(rng.normal(size=(8, 4)), rng.normal(size=(8, 1))),
        callbacks=[TensorPulseCallback("keras-unit", produce_fn=sink)],
    )
    train = sink.records("train")
    assert [r.step for r in train] == list(range(8))
    by_name = {t.name: t.collection for t in train[0].tensors}
    assert by_name["net/hidden/kernel"] == "weights" and by_name["net/hidden/bias"] == "biases"
    assert by_name["gradient/net/out/kernel"] == "gradients"
    assert all({"loss", "mae", "lr"} <= set(r.scalars) for r in train)
    assert [r.step for r in sink.records("eval")] == [4, 8]


def test_keras_model_without_trainable_weights_warns_once_and_runs(caplog: pytest.LogCaptureFixture) -> None:
    """A model with nothing to train: one warning, the run goes on, loss and weights per batch."""
    keras = _keras()
    import numpy as np

    from tensorpulse.producers.keras import TensorPulseCallback

    caplog.set_level(logging.WARNING, LOGGER)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="out")])
    model.trainable = False
    model.compile(keras.optimizers.SGD(0.05), "mse")
    sink = MemorySink()
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras's own "no trainable weights", at every batch
        model.fit(
            rng.normal(size=(16, 4)),
            rng.normal(size=(16, 1)),
            batch_size=4,
            epochs=1,
            verbose=0,
            callbacks=[TensorPulseCallback("keras-frozen", produce_fn=sink)],
        )
    train = sink.records("train")
    assert [r.step for r in train] == [0, 1, 2, 3]
    assert all("loss" in r.scalars for r in train)
    assert not any(t.collection == "gradients" for r in train for t in r.tensors)
    assert len(_warnings(caplog, "is frozen")) == 1
