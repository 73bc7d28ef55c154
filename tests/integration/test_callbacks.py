"""The framework callbacks in real tiny trainings on the CPU, through a real broker and worker.

One worker, with ExplodingTensor's action set to "stop", serves the three frameworks. Each run
injects a NaN into a weight at optimizer step NAN_STEP; from NAN_STEP + 2 on, the training waits
(up to WAIT seconds) for the stop action the alert publishes, and the callback must then stop the
trainer the framework's own way. So one run shows both halves: the NaN reaches the worker as an
ExplodingTensor alert at the step it was injected, and a stop action ends the training early.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorpulse.events import AlertEvent
from tensorpulse.topics import ALERTS_TOPIC

from .helpers import read_topic, wait_for, worker_process

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.integration

NAN_STEP = 5
MAX_STEPS = 200  # far more than a run that stops takes
WAIT = 30.0  # for the stop action, once the NaN has been published

RULES = """\
defaults: false
rules:
  - rule: ExplodingTensor
    action: stop
"""


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker for the jobs of this module (prefix returned), ExplodingTensor with action stop."""
    tag = uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("callbacks")
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    with worker_process(kafka_bootstrap, tmp, group=f"g-cb-{tag}", rules=rules, jobs_regex=f"^cb-{tag}-"):
        yield f"cb-{tag}"


def _exploding(bootstrap: str, job: str) -> list[AlertEvent]:
    events = [AlertEvent.from_json(m.value()) for m in read_topic(bootstrap, ALERTS_TOPIC, timeout=1)]
    return [e for e in events if e.job == job and e.rule == "ExplodingTensor" and e.status == "firing"]


def _wait_for_stop(callback) -> float:
    """Block the training until the callback's hook has seen the stop action; seconds waited."""
    t0 = time.monotonic()
    wait_for(lambda: callback.hook is not None and callback.hook.should_stop, WAIT, "the stop action")
    return time.monotonic() - t0


def _check_alert(bootstrap: str, job: str, parameter: str) -> None:
    """The first ExplodingTensor alert of `job` is at NAN_STEP and names `parameter` (or its gradient)."""
    events = wait_for(lambda: _exploding(bootstrap, job), 20, f"an ExplodingTensor alert for {job}")
    assert events[0].step == NAN_STEP, [(e.step, e.tensors) for e in events]
    assert any(parameter in t for t in events[0].tensors), events[0].tensors


def test_lightning_nan_alert_and_stop(kafka_bootstrap: str, worker: str) -> None:
    """Lightning: a NaN at optimizer step 5 of a 2-micro-batch accumulation raises ExplodingTensor at
    step 5, and the stop action it publishes ends `fit` long before max_steps."""
    L = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (tensorpulse[lightning])")
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from tensorpulse.producers.lightning import TensorPulseCallback

    job = f"{worker}-lightning"
    callback = TensorPulseCallback(job, kafka_bootstrap)
    waited = []

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, x):
            return self.net(x)

        def on_train_batch_start(self, batch, batch_idx):
            step = self.trainer.global_step
            if step == NAN_STEP and batch_idx % 2 == 0:
                with torch.no_grad():
                    self.net[0].weight[0, 0] = float("nan")
            if step >= NAN_STEP + 2 and not waited:
                waited.append(_wait_for_stop(callback))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("train_mse", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(2 * MAX_STEPS * 4, 8), torch.randn(2 * MAX_STEPS * 4, 1))
    trainer = L.Trainer(
        max_steps=MAX_STEPS,
        accumulate_grad_batches=2,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(), DataLoader(data, batch_size=4))
    assert waited and trainer.should_stop
    assert trainer.global_step <= NAN_STEP + 3, trainer.global_step
    print(f"\nLightning: stop action {waited[0]:.2f} s after step {NAN_STEP + 1} was published")
    _check_alert(kafka_bootstrap, job, "net.0.weight")


def test_transformers_nan_alert_and_stop(kafka_bootstrap: str, worker: str) -> None:
    """Hugging Face Trainer: a tiny GPT-2 built from a config; a NaN at optimizer step 5 raises
    ExplodingTensor at step 5, and the stop action sets control.should_training_stop."""
    transformers = pytest.importorskip(
        "transformers", reason="Hugging Face transformers is not installed (tensorpulse[transformers])"
    )
    pytest.importorskip("accelerate", reason="accelerate is not installed (tensorpulse[transformers])")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from tensorpulse.producers.transformers import TensorPulseCallback

    job = f"{worker}-transformers"
    callback = TensorPulseCallback(job, kafka_bootstrap)
    waited = []

    class Inject(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == NAN_STEP:
                with torch.no_grad():
                    model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
            if state.global_step >= NAN_STEP + 2 and not waited:
                waited.append(_wait_for_stop(callback))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4 * MAX_STEPS

        def __getitem__(self, i: int):
            ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
        )
    )
    args = TrainingArguments(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"hf-{job}"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[Inject(), callback])
    trainer.train()
    assert waited
    assert trainer.state.global_step <= NAN_STEP + 3, trainer.state.global_step
    print(f"\nTrainer: stop action {waited[0]:.2f} s after step {NAN_STEP + 1} was published")
    _check_alert(kafka_bootstrap, job, "transformer.h.0.mlp.c_fc.weight")


def test_keras_nan_alert_and_stop(kafka_bootstrap: str, worker: str) -> None:
    """Keras 3 on the torch backend: a NaN kernel at optimizer step 5 raises ExplodingTensor at step
    5 (weights and gradients by Keras path), and the stop action sets model.stop_training."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="Keras 3 is not installed (tensorpulse[keras])")
    if keras.backend.backend() != "torch":
        pytest.skip(f"Keras runs on the {keras.backend.backend()} backend here; this test needs torch")
    import numpy as np

    from tensorpulse.producers.keras import TensorPulseCallback

    job = f"{worker}-keras"
    callback = TensorPulseCallback(job, kafka_bootstrap)
    waited = []

    class Inject(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if step == NAN_STEP:
                kernel = self.model.get_layer("hidden").kernel
                value = keras.ops.convert_to_numpy(kernel)
                value[0, 0] = np.nan
                kernel.assign(value)
            if step >= NAN_STEP + 2 and not waited:
                waited.append(_wait_for_stop(callback))

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="hidden"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4 * MAX_STEPS, 8)), rng.normal(size=(4 * MAX_STEPS, 1))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[Inject(), callback])
    assert waited and model.stop_training
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    assert steps <= NAN_STEP + 3, steps
    print(f"\nKeras: stop action {waited[0]:.2f} s after step {NAN_STEP + 1} was published")
    _check_alert(kafka_bootstrap, job, "hidden/kernel")


@pytest.mark.parametrize(
    ("example", "package", "parameter"),
    [
        ("lightning_callback.py", "lightning", "net.0.weight"),
        ("transformers_callback.py", "transformers", "transformer.h.0.mlp.c_fc.weight"),
        ("keras_callback.py", "keras", "hidden/kernel"),
    ],
)
def test_example_runs_and_its_nan_alerts(
    kafka_bootstrap: str, worker: str, example: str, package: str, parameter: str
) -> None:
    """Each example in examples/ trains as its docstring says, and `--nan-step 10` raises ExplodingTensor at step 10."""
    pytest.importorskip(package, reason=f"{package} is not installed (tensorpulse[{package}])")
    job = f"{worker}-example-{package}"
    script = Path(__file__).resolve().parents[2] / "examples" / example
    env = {**os.environ, "KERAS_BACKEND": "torch", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--bootstrap",
            kafka_bootstrap,
            "--job",
            job,
            "--steps",
            "20",
            "--nan-step",
            "10",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = wait_for(lambda: _exploding(kafka_bootstrap, job), 20, f"an ExplodingTensor alert for {job}")
    assert events[0].step == 10 and any(parameter in t for t in events[0].tensors), events[0]
