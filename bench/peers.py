"""The tools the overhead benchmark puts side by side: no hook, tensorpulse's TorchHook, and the
peers (TensorBoard histograms, wandb.watch, smdebug), each behind one small adapter.

An adapter is built on the instrumented copy of the model and is called once per training step,
after backward and before the optimizer step, which is where each tool's documentation puts its
call. Every tool records the loss on its saved steps and the weights and gradients of every
parameter. Tool packages are imported only when their adapter is built, so that a peer which is
not installed is reported as such (NotInstalled) instead of breaking the run; the smdebug cells
run this module from their own venv, without tensorpulse.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from common import dir_bytes
from torch import nn


class NotInstalled(RuntimeError):
    """The tool's package cannot be imported here; the message says why."""


class Tool:
    """No instrumentation: the A/A check (its ratio shows the method's own noise)."""

    name = "no-hook"

    def __init__(self, model: nn.Module, loss_fn: nn.Module, opt: Any, workdir: str, interval: int) -> None:
        self.model, self.loss_fn, self.opt = model, loss_fn, opt
        self.workdir, self.interval = workdir, interval

    def after_backward(self, step: int, loss: Any) -> None:
        """Called on every step; the tool decides whether the step is saved."""

    def bytes_written(self) -> int:
        """Bytes the tool has produced so far (files, or records handed to the transport)."""
        return 0

    def flush(self) -> None:
        """Write out what is buffered, so that bytes_written() counts every step run so far."""

    def close(self) -> None:
        """Flush and stop; bytes_written() is final afterwards."""

    def versions(self) -> dict[str, str]:
        return {}


class TensorPulse(Tool):
    """TorchHook with its defaults (weights, biases, gradients, activations, loss, lr).

    Without a bootstrap the records go to a counting `produce_fn` (encoded on the hook's
    publisher thread exactly as for Kafka, then counted: key + value bytes, before broker
    compression). With one, they are really published, and counted by reading the topic back.
    """

    name = "tensorpulse"

    def __init__(
        self, *args: Any, bootstrap: str | None = None, plain: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        try:
            import tensorpulse
            from tensorpulse.producers.torch import TorchHook
        except ImportError as exc:
            raise NotInstalled(f"tensorpulse is not importable: {exc}") from exc
        if plain is not None:
            _plain_path(plain)
        self._version = getattr(tensorpulse, "__version__", "?")
        self.bootstrap = bootstrap
        self._bytes = 0
        job = f"bench-{uuid.uuid4().hex[:8]}"
        if bootstrap is None:
            self.hook = TorchHook(
                job, save_interval=self.interval, listen_for_actions=False, produce_fn=self._count
            )
        else:
            self.hook = TorchHook(job, bootstrap, save_interval=self.interval)
        self.hook.attach(self.model, self.opt)

    def _count(self, topic: str, value: bytes, key: bytes) -> None:
        self._bytes += len(value) + len(key or b"")

    def after_backward(self, step: int, loss: Any) -> None:
        self.hook.step(step, loss=loss)

    def bytes_written(self) -> int:
        return self._bytes  # up to date after flush() and close() (which read the topic back when publishing)

    def flush(self) -> None:
        self.hook.flush(30)
        if self.bootstrap is not None:
            self._bytes = topic_bytes(self.bootstrap, self.hook.topic)

    def close(self) -> None:
        self.flush()
        self.hook.close(10)

    def versions(self) -> dict[str, str]:
        return {"tensorpulse": self._version}


def _plain_path(which: str) -> None:
    """Swap one of the hook's speed paths for the plain way, in this (child) process only, so that
    a row beside "tensorpulse" shows what the speed path earns (bench/README.md, "Speed paths"):

    - "numba": torch ops instead of the numba kernels (TENSORPULSE_NUMBA=0, the users' switch);
    - "pool": a ThreadPoolExecutor, woken by a system call for each job, instead of the polling
      worker of producers/worker.py.
    """
    import concurrent.futures

    from tensorpulse.producers import offload

    if which == "numba":
        os.environ["TENSORPULSE_NUMBA"] = "0"
    elif which == "pool":
        offload.PollingWorker = lambda name: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)  # type: ignore[misc]
    else:
        raise ValueError(f"unknown plain path {which!r}")


def topic_bytes(bootstrap: str, topic: str, idle_s: float = 2.0) -> int:
    """Key + value bytes of every record in `topic`, read back from the beginning."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}"})
    try:
        meta = c.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        total, last = 0, time.monotonic()
        while time.monotonic() - last < idle_s:
            msgs = c.consume(1000, 0.2)
            for m in msgs:
                if m.error() is None:
                    total += len(m.value() or b"") + len(m.key() or b"")
            if msgs:
                last = time.monotonic()
        return total
    finally:
        c.close()


class TensorBoard(Tool):
    """SummaryWriter: add_histogram of every parameter and its gradient, add_scalar of the loss."""

    name = "tensorboard"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            import tensorboard
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise NotInstalled(f"tensorboard is not importable: {exc}") from exc
        self._version = tensorboard.__version__
        self.writer = SummaryWriter(log_dir=self.workdir)
        self.params = list(self.model.named_parameters())

    def after_backward(self, step: int, loss: Any) -> None:
        if step % self.interval:
            return
        for name, p in self.params:
            self.writer.add_histogram(f"weights/{name}", p.detach(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", p.grad, step)
        self.writer.add_scalar("loss", loss.item(), step)

    def bytes_written(self) -> int:
        return dir_bytes(self.workdir)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def versions(self) -> dict[str, str]:
        return {"tensorboard": self._version}


class Wandb(Tool):
    """wandb offline: wandb.watch(model, log="all", log_freq=interval), loss logged on the same steps.

    watch's hooks act on the interval-th call of each interval (1-based) and leave their
    histograms pending until the next wandb.log, so the loss is logged on those steps.
    """

    name = "wandb"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        os.makedirs(self.workdir, exist_ok=True)
        os.environ.update(
            WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DIR=self.workdir
        )
        try:
            import wandb
        except ImportError as exc:
            raise NotInstalled(f"wandb is not importable: {exc}") from exc
        self.wandb = wandb
        self.run = wandb.init(project="tensorpulse-bench", mode="offline", dir=self.workdir)
        wandb.watch(self.model, log="all", log_freq=self.interval)
        time.sleep(2.0)  # let the run's header files reach disk before the byte count starts

    def after_backward(self, step: int, loss: Any) -> None:
        if (step + 1) % self.interval == 0:
            self.wandb.log({"loss": loss.item()})

    def bytes_written(self) -> int:
        return dir_bytes(self.workdir)

    def close(self) -> None:
        self.wandb.finish()

    def versions(self) -> dict[str, str]:
        return {"wandb": self.wandb.__version__}


class Smdebug(Tool):
    """smdebug.pytorch.Hook on weights, biases, gradients and losses, saving every `interval` steps:
    with reductions (mean, std, min, max, L2 norm) or full tensors."""

    def __init__(self, *args: Any, reductions: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = "smdebug-reductions" if reductions else "smdebug-full"
        try:
            import smdebug
            from smdebug.pytorch import Hook, ReductionConfig, SaveConfig
        except Exception as exc:  # noqa: BLE001 - a broken install (protobuf/numpy) raises others
            raise NotInstalled(f"smdebug is not importable: {type(exc).__name__}: {exc}") from exc
        self._version = smdebug.__version__
        options: dict[str, Any] = {
            "out_dir": self.workdir,
            "save_config": SaveConfig(save_interval=self.interval),
            "include_collections": ["weights", "biases", "gradients", "losses"],
        }
        if reductions:
            options["reduction_config"] = ReductionConfig(
                reductions=["mean", "std", "min", "max"], norms=["l2"]
            )
        self.hook = Hook(**options)
        self.hook.register_module(self.model)
        self.hook.register_loss(self.loss_fn)

    def bytes_written(self) -> int:
        return dir_bytes(self.workdir)

    def close(self) -> None:
        self.hook.close()

    def versions(self) -> dict[str, str]:
        return {"smdebug": self._version}


#: tool name -> (adapter, keyword arguments); the order is the table's.
TOOLS: dict[str, tuple[type[Tool], dict[str, Any]]] = {
    "no-hook": (Tool, {}),
    "tensorpulse": (TensorPulse, {}),
    # the hook with one speed path swapped for the plain way (`_plain_path`)
    "tensorpulse-no-numba": (TensorPulse, {"plain": "numba"}),
    "tensorpulse-pool": (TensorPulse, {"plain": "pool"}),
    "tensorboard": (TensorBoard, {}),
    "wandb": (Wandb, {}),
    "smdebug-reductions": (Smdebug, {"reductions": True}),
    "smdebug-full": (Smdebug, {"reductions": False}),
}

#: the tools that are compared with tensorpulse in the "5x less overhead" check
PEERS = ("tensorboard", "wandb", "smdebug-reductions", "smdebug-full")


def needs_smdebug_env(tool: str) -> bool:
    """smdebug cannot share the project environment (protobuf<=3.20.3, numpy<2)."""
    return tool.startswith("smdebug")


def make_tool(
    name: str,
    model: nn.Module,
    loss_fn: nn.Module,
    opt: Any,
    workdir: str,
    interval: int,
    bootstrap: str | None = None,
) -> Tool:
    try:
        cls, kwargs = TOOLS[name]
    except KeyError:
        raise ValueError(f"unknown tool {name!r}: one of {', '.join(TOOLS)}") from None
    if cls is TensorPulse:
        kwargs = {**kwargs, "bootstrap": bootstrap}
    return cls(model, loss_fn, opt, workdir, interval, **kwargs)
