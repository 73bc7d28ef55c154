"""Shared pieces of the benchmarks: the models of the peer measurements, a broker to publish to, and
probes of the machine (CPU used by others, peak memory, bytes on disk).

Only the standard library at import time (torch when a model is made): the smdebug cells run
this module from bench/.venv-smdebug, where tensorpulse is not installed, and the load benchmark
uses it without torch."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

#: the overhead table's models: the peer table's two, then issue 20's real ones (real_models.py)
MODELS = ("mlp", "cnn", "gpt", "resnet18")
KAFKA_LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka_local.py"


#: batch size per model: the peer table's 128 for the MLP and the CNN; the real models' are what a
#: step of about a second (GPT) or a third of one (ResNet-18) on one core of this machine allows
BATCH = {"mlp": 128, "cnn": 128, "gpt": 4, "resnet18": 32}


def make_model(kind: str) -> nn.Module:
    """The models of the overhead table: the peer measurements' MLP and small CNN, and the "real"
    ones of issue 20 (real_models.py: a 6-layer GPT, ResNet-18 for 64x64 images)."""
    from torch import nn

    if kind == "gpt":
        from real_models import GPT

        return GPT()
    if kind == "resnet18":
        from real_models import resnet18

        return resnet18()
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )
    raise ValueError(f"unknown model {kind!r}: mlp, cnn, gpt or resnet18")


def make_batches(kind: str, n: int = 8, batch: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` random batches (inputs, class targets) for `kind`; `batch` defaults to BATCH[kind]."""
    import torch

    batch = batch or BATCH[kind]
    g = torch.Generator().manual_seed(1234)
    if kind == "gpt":
        from real_models import gpt_batches

        return gpt_batches(n, batch, g)
    shape, classes = {"mlp": ((784,), 10), "cnn": ((3, 32, 32), 10), "resnet18": ((3, 64, 64), 200)}[kind]
    return [
        (torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n)
    ]


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    """The given cluster, $KAFKA_BOOTSTRAP, or an embedded Tansu broker for the run."""
    with open_broker(bootstrap, "tansu") as b:
        yield b.bootstrap


@dataclass(frozen=True)
class Broker:
    """A broker a benchmark runs against: its address, what it is, and its processes (if started here)."""

    bootstrap: str
    what: str
    pids: tuple[int, ...] = ()


def load_kafka_local() -> ModuleType:
    """deploy/kafka/kafka_local.py, imported by path (deploy/ is not a package)."""
    name = "tensorpulse_kafka_local"
    if name in sys.modules:
        return sys.modules[name]
    if not KAFKA_LOCAL.exists():
        raise SystemExit(
            f"--broker kafka needs {KAFKA_LOCAL} (KafkaCluster, fetch), which is not there; use "
            "--broker tansu, --bootstrap or $KAFKA_BOOTSTRAP"
        )
    spec = importlib.util.spec_from_file_location(name, KAFKA_LOCAL)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {KAFKA_LOCAL}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    if not hasattr(module, "KafkaCluster"):
        raise SystemExit(f"{KAFKA_LOCAL} has no KafkaCluster")
    return module


@contextlib.contextmanager
def open_broker(bootstrap: str | None, kind: str = "tansu") -> Iterator[Broker]:
    """`bootstrap`, else $KAFKA_BOOTSTRAP, else a broker started for the run: the embedded Tansu
    (`kind` "tansu") or a one-node Apache Kafka from deploy/kafka/kafka_local.py ("kafka")."""
    given = bootstrap or os.environ.get("KAFKA_BOOTSTRAP")
    if given:
        yield Broker(given, "given cluster")
        return
    if kind == "tansu":
        from tensorpulse.broker import EmbeddedBroker

        with EmbeddedBroker() as b:
            yield Broker(b.bootstrap, "embedded Tansu", (b.proc.pid,) if b.proc is not None else ())
        return
    if kind != "kafka":
        raise ValueError(f"unknown broker {kind!r}: tansu or kafka")
    kafka_local = load_kafka_local()
    fetch = getattr(kafka_local, "fetch", None)
    if callable(fetch) and not any(
        p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in inspect.signature(fetch).parameters.values()
    ):
        print("fetching Apache Kafka (deploy/kafka/kafka_local.py fetch())", flush=True)
        fetch()
    workdir = Path(tempfile.mkdtemp(prefix="tp-bench-kafka-"))
    try:
        with kafka_local.KafkaCluster(nodes=1, workdir=workdir) as cluster:
            pids = tuple(p.pid for p in getattr(cluster, "procs", []) if p is not None)
            yield Broker(cluster.bootstrap, "Apache Kafka, 1 node (deploy/kafka/kafka_local.py)", pids)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.median(values)


# ----------------------------------------------------------------------------- machine probes
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_NCPU = os.cpu_count() or 1


def _stat_fields(pid: int | str) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rfind(")") + 2 :].split()


def _descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _tree_ticks(root: int) -> int:
    """CPU ticks used so far by `root` (all threads, reaped children) and its live descendants."""
    total = sum(int(x) for x in _stat_fields(root)[11:15])  # utime, stime, cutime, cstime
    for pid in _descendants(root):
        # A child that exited meanwhile: its ticks reach `root` as cutime once reaped.
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += sum(int(x) for x in _stat_fields(pid)[11:13])
    return total


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal


@dataclass(frozen=True)
class CpuSnapshot:
    t: float
    busy: int
    own: int


def cpu_snapshot(root: int | None = None) -> CpuSnapshot:
    """Machine-wide busy ticks and those of the process tree under `root` (default: this process;
    the benchmark driver passes its own pid, so that the broker it started counts as ours)."""
    return CpuSnapshot(time.perf_counter(), _machine_busy_ticks(), _tree_ticks(root or os.getpid()))


def foreign_share(a: CpuSnapshot, b: CpuSnapshot) -> float:
    """Share of the whole machine (all cores) that processes outside the snapshots' process tree used
    between two snapshots: the noise a step-time ratio must not be trusted under. Kernel work
    done for our own I/O is counted as foreign too, so the figure errs on the side of dropping."""
    dt = b.t - a.t
    if dt <= 0:
        return 0.0
    return max(0.0, (b.busy - a.busy) - (b.own - a.own)) / (dt * _TICKS_PER_S * _NCPU)


def _status_kb(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), MiB."""
    return _status_kb("self", "VmHWM") / 1024


def children_rss_mb() -> float:
    """Resident memory of this process's live descendants (e.g. wandb's service process), MiB."""
    return sum(_status_kb(pid, "VmRSS") for pid in _descendants(os.getpid())) / 1024


def machine_info(repo_dir: str) -> dict[str, object]:
    """What the run's figures belong to: CPU model and count, load, the commit and whether the tree
    differed from it (the benchmark measures the working tree it runs from)."""
    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "node": os.uname().nodename,
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    git = ["git", "-C", repo_dir]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", ".."], capture_output=True, text=True)
        info["tree_dirty"] = bool(dirty.stdout.strip())
    return info


def dir_bytes(path: str) -> int:
    """Bytes of every file under `path` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


# ----------------------------------------------------------------------------- reports
RESULTS = Path(__file__).resolve().parent / "results"


def host_info(**extra: object) -> dict[str, object]:
    """What a JSON report says about the machine: CPU count, platform and Python, then `extra`
    (e.g. the load average at the start), in that order."""
    import platform

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **extra,
    }


def utc(t: float) -> str:
    """`t` (time.time()) as an ISO 8601 UTC timestamp, the reports' `started_utc`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def write_json(
    report: dict[str, object], out: str | None, name: str, started: float, *, allow_nan: bool = True
) -> Path:
    """Write `report` to `out`, else to bench/results/<name>-<UTC start time>.json; returns the path.
    `allow_nan=False` refuses inf/NaN (the reports that turn them into null first)."""
    path = (
        Path(out) if out else RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, allow_nan=allow_nan) + "\n")
    return path
