"""The `stages` part of bench/worker_profile.py: `Worker._process` driven in this process over an
in-memory Quix store, no broker, each stage's CPU per record timed.

Apart from worker_profile.py, which samples a worker process under load with py-spy: the two
share only their command line and report file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from designs import tree_state
from loadgen import make_jobs

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- stages (in process, no broker)
class _Timers:
    """Exclusive CPU time (thread_time_ns) and calls per label; nested timed calls are subtracted."""

    def __init__(self) -> None:
        self.ns: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._stack: list[int] = []

    def wrap(self, label: str, fn: Any) -> Any:
        clock = time.thread_time_ns

        def timed(*a: Any, **k: Any) -> Any:
            self._stack.append(0)
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                elapsed = clock() - t0
                children = self._stack.pop()
                self.ns[label] += elapsed - children
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1] += elapsed

        return timed


def _quiet_worker(tmp: Path) -> Any:
    """A Worker object that never runs: its `_process` is driven by hand (no broker is contacted)."""
    from tensorpulse.stream.settings import WorkerSettings
    from tensorpulse.stream.worker import Worker

    settings = WorkerSettings(
        bootstrap="127.0.0.1:9",
        group="profile-stages",
        metrics_port=None,
        state_dir=tmp / "state",
        kafka_config={"log_level": 0},
    )
    return Worker(settings)


def _records(args: argparse.Namespace, n: int) -> list[tuple[str, bytes, int]]:
    """(job, payload, source offset) for `n` records of --jobs jobs round robin, a NaN fault every
    --fault-every records (ExplodingTensor fires, then resolves: alerts are part of the cost)."""
    jobs = make_jobs(uuid.uuid4().hex[:8], args.jobs, args.tensors, args.seed)
    out = []
    for i in range(n):
        job = jobs[i % len(jobs)]
        if args.fault_every and i % args.fault_every == args.fault_every // 2:
            job.pending_fault = True
        payload, step, _, _ = job.next_record()
        out.append((job.job, payload, step))
    return out


def _drive(
    worker: Any, records: list[tuple[str, bytes, int]], every: int, timers: _Timers | None
) -> dict[str, Any]:
    """Feed `records` to `worker._process` in Quix transactions of `every` records over an in-memory
    Quix store partition (the same State API as RocksDB's; no disk, no changelog)."""
    from quixstreams.context import set_message_context
    from quixstreams.models import MessageContext
    from quixstreams.state.memory import MemoryStorePartition

    from tensorpulse.stream import worker as worker_mod
    from tensorpulse.stream.intake import SOURCE_HEADER

    partition = MemoryStorePartition(changelog_producer=None)
    options = getattr(worker_mod, "ROCKSDB_OPTIONS", None)  # the worker's own value serialisation
    if options is not None:
        partition._dumps, partition._loads = options.dumps, options.loads
    process = (
        worker._process if timers is None else timers.wrap("Worker._process (own code)", worker._process)
    )
    cpu = flush_ns = 0
    outputs = 0
    tx = None
    states: dict[str, Any] = {}
    for i, (job, payload, offset) in enumerate(records):
        if i % every == 0:
            if tx is not None:
                t0 = time.thread_time_ns()
                tx.prepare(processed_offsets=None)
                tx.flush()
                flush_ns += time.thread_time_ns() - t0
            tx = partition.begin()
            states = {}
        state = states.get(job)
        if state is None:
            state = states[job] = tx.as_state(prefix=job.encode())
        headers = [(SOURCE_HEADER, f"0:{offset}".encode())]
        set_message_context(MessageContext("steps", 0, i, len(payload)))  # as Quix sets it per message
        t0 = time.thread_time_ns()
        out = process(payload, job.encode(), 0, headers, state)
        cpu += time.thread_time_ns() - t0
        outputs += len(out[0])
    if tx is not None:
        t0 = time.thread_time_ns()
        tx.prepare(processed_offsets=None)
        tx.flush()
        flush_ns += time.thread_time_ns() - t0
    return {"cpu_ns": cpu, "flush_ns": flush_ns, "alerts": outputs, "partition": partition}


def _instrument(worker: Any, timers: _Timers) -> contextlib.ExitStack:
    """Wrap the stages of a record's path in timers (undone when the returned stack closes)."""
    from tensorpulse import wire
    from tensorpulse.sinks.prometheus import WorkerMetrics
    from tensorpulse.stream import evaluator as evaluator_mod
    from tensorpulse.stream import state as state_mod
    from tensorpulse.stream import worker as worker_mod

    stack = contextlib.ExitStack()

    def patch(owner: Any, name: str, label: str) -> None:
        old = getattr(owner, name, None)
        if old is None:  # not in this version of the code
            return
        setattr(owner, name, timers.wrap(label, old))
        stack.callback(setattr, owner, name, old)

    import json as json_mod

    from quixstreams.state.base.state import TransactionState

    patch(wire, "decode", "wire.decode")
    patch(json_mod, "dumps", "json.dumps (stdlib; state entries, alert events)")
    patch(json_mod, "loads", "json.loads (stdlib; state entries)")
    for m in ("get", "set", "delete", "get_bytes", "set_bytes"):
        patch(TransactionState, m, f"Quix State.{m} (serialising the value, key, transaction cache)")
    patch(WorkerMetrics, "observe", "metrics.observe (prometheus)")
    for m in (
        "__init__",
        "seen_offset",
        "set_offset",
        "add_rank",
        "load",
        "save",
        "rule_states",
        "mark_ended",
        "_get",
    ):
        patch(state_mod.JobStore, m, f"state: JobStore.{m}")
    patch(state_mod.StoredSchemas, "__getitem__", "state: StoredSchemas lookups")
    patch(state_mod.StoredSchemas, "__setitem__", "state: StoredSchemas lookups")
    patch(evaluator_mod.JobEvaluator, "process", "evaluator: loop (own code)")
    patch(evaluator_mod.JobEvaluator, "_transition", "evaluator: transitions and alert events")
    patch(worker_mod.Worker, "_emit", "worker: emit alerts (JSON, metrics, log)")
    patch(worker_mod.Worker, "_too_large", "worker: _too_large")
    try:  # since the worker's split: stream/outcomes.py
        from tensorpulse.stream import outcomes as outcomes_mod
    except ImportError:
        outcomes_mod = None
    if outcomes_mod is not None:
        patch(outcomes_mod.Outcomes, "emit", "worker: emit alerts (JSON, metrics, log)")
        patch(outcomes_mod.Outcomes, "too_large", "worker: _too_large")
    patch(worker_mod.Worker, "_forwards", "worker: cross-run forwards")
    seen: set[int] = set()
    for spec in worker.specs:
        rule = spec.rule
        if id(rule) in seen:
            continue
        seen.add(id(rule))
        for method in ("update", "job_summary"):
            if hasattr(rule, method):
                try:
                    patch(rule, method, f"rule: {type(rule).__name__}.{method}")
                except (AttributeError, TypeError):  # slots or frozen: time the class instead
                    patch(type(rule), method, f"rule: {type(rule).__name__}.{method}")
    return stack


def run_stages(args: argparse.Namespace) -> dict[str, Any]:
    """CPU per record of each stage of `Worker._process`, in process, over the same records.

    Each round is a fresh Worker object fed the warm-up records (evaluators, schemas and states
    made) and then the measured ones; the last round runs with every stage wrapped in a timer.
    """
    tmp = Path(tempfile.mkdtemp(prefix="tp-stages-"))
    try:
        warm = _records(args, args.warmup_records)
        recs = _records(args, args.records)
        n = len(recs)
        plain_us = []
        for r in range(args.rounds):
            w = _quiet_worker(tmp / f"plain{r}")
            _drive(w, warm, args.checkpoint_every, None)
            plain_us.append(_drive(w, recs, args.checkpoint_every, None)["cpu_ns"] / 1e3 / n)
        timers = _Timers()
        w = _quiet_worker(tmp / "timed")
        _drive(w, warm, args.checkpoint_every, None)
        with _instrument(w, timers):
            timed = _drive(w, recs, args.checkpoint_every, timers)
        state = timed["partition"].begin().as_state(prefix=recs[-1][0].encode())
        sizes = {}
        for key in ("rank:0", "clock:0", "ranks", "src:0"):
            v = state.get_bytes(key)
            if v is not None:
                sizes[key] = len(v)
        what_if = {}
        for name, patcher in WHAT_IF.items():
            us = []
            for r in range(args.rounds):
                with patcher():
                    w = _quiet_worker(tmp / f"{name}{r}")
                    _drive(w, warm, args.checkpoint_every, None)
                    us.append(_drive(w, recs, args.checkpoint_every, None)["cpu_ns"] / 1e3 / n)
            what_if[name] = [round(x, 1) for x in us]
        serial = _serialisation(state.get("rank:0"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stages = [
        {
            "stage": k,
            "us_per_record": round(v / 1e3 / n, 1),
            "calls_per_record": round(timers.calls[k] / n, 2),
        }
        for k, v in timers.ns.most_common()
    ]
    return {
        "mode": "stages",
        "source": f"working tree {REPO}{tree_state()}",
        "records": n,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "plain_us_per_record": [round(x, 1) for x in plain_us],
        "timed_us_per_record": round(timed["cpu_ns"] / 1e3 / n, 1),
        "flush_us_per_record": round(timed["flush_ns"] / 1e3 / n, 1),
        "alerts": timed["alerts"],
        "stages": stages,
        "state_entry_bytes": sizes,
        "what_if_us_per_record": what_if,
        "serialisation_us_per_entry": serial,
    }


def one_round(args: argparse.Namespace) -> dict[str, Any]:
    """One untimed round (warm-up records, then the measured ones) of the `tensorpulse` this
    process imports: what `run_designs` runs once per design and round, in a process of its own."""
    import tensorpulse

    tmp = Path(tempfile.mkdtemp(prefix="tp-stages-"))
    try:
        w = _quiet_worker(tmp / "plain")
        _drive(w, _records(args, args.warmup_records), args.checkpoint_every, None)
        recs = _records(args, args.records)
        done = _drive(w, recs, args.checkpoint_every, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "us_per_record": done["cpu_ns"] / 1e3 / len(recs),
        "alerts": done["alerts"],
        "tensorpulse": tensorpulse.__file__,
    }


def run_designs(args: argparse.Namespace) -> dict[str, Any]:
    """`Worker._process`'s CPU per record for each of --designs (`current`, or a git revision
    `git archive`d by bench/designs.py, with `:setting=value` as there), one process per design
    and round, the designs' order alternating from round to round, the same records (--seed)."""
    from designs import prepare_variant

    tmp = Path(tempfile.mkdtemp(prefix="tp-stages-designs-"))
    script = Path(__file__).with_name("worker_profile.py")
    flags = [
        f"--jobs={args.jobs}",
        f"--tensors={args.tensors}",
        f"--seed={args.seed}",
        f"--records={args.records}",
        f"--warmup-records={args.warmup_records}",
        f"--checkpoint-every={args.checkpoint_every}",
        f"--fault-every={args.fault_every}",
    ]
    try:
        designs = []
        for i, name in enumerate(args.designs):
            (tmp / f"design{i}").mkdir()
            designs.append(prepare_variant(name, tmp / f"design{i}"))
        rows: dict[str, list[float]] = {d.name: [] for d in designs}
        alerts: dict[str, set[int]] = {d.name: set() for d in designs}
        files: dict[str, str] = {}
        if getattr(args, "instructions", False):
            return _instructions(args, designs, script, flags, tmp)
        for r in range(args.rounds):
            for d in designs if r % 2 == 0 else designs[::-1]:
                done = subprocess.run(
                    [sys.executable, str(script), "stages", "--one-round", *flags],
                    env=d.env,
                    cwd=tmp,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    raise SystemExit(f"design {d.name}, round {r}: {done.stderr[-2000:]}")
                out = json.loads(done.stdout.strip().splitlines()[-1])
                rows[d.name].append(round(out["us_per_record"], 1))
                alerts[d.name].add(out["alerts"])
                files[d.name] = out["tensorpulse"]
                print(f"round {r}: {d.name} {out['us_per_record']:.0f} us per record", flush=True)
        sources = {d.name: d.source for d in designs}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "mode": "stages-designs",
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "us_per_record": rows,
        "alerts": {k: sorted(v) for k, v in alerts.items()},
        "sources": sources,
        "imported": files,
    }


#: Records of the shorter of the two runs under callgrind (`--instructions`): their difference,
#: --records records, is what is counted, start-up and warm-up excluded.
_SHORT_RUN = 100


def _instructions(
    args: argparse.Namespace, designs: list[Any], script: Path, flags: list[str], tmp: Path
) -> dict[str, Any]:
    """Instructions executed per record (valgrind's callgrind, `Ir`) for each design: one run of
    _SHORT_RUN records and one of _SHORT_RUN + --records, the difference over --records.

    Why: on a shared machine CPU time per record moves by 10-30 % from round to round with other
    people's work (caches, the other hyperthread), so changes of a few per cent do not show in
    `stages --designs`; the count of instructions does not depend on the load (only the random job
    ids and clock readings differ between runs), at 50-100x the run time. It weighs every
    instruction alike: a cache miss counts as one."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    rows: dict[str, float] = {}
    no_gc: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    gc: dict[str, list[int]] = {}
    base = [f for f in flags if not f.startswith("--records=")]
    for d in designs:
        counts[d.name], gc[d.name] = [], []
        for n in (_SHORT_RUN, _SHORT_RUN + args.records):
            out = tmp / f"callgrind-{len(counts)}-{n}.out"
            done = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, str(script)]
                + ["stages", "--one-round", *base, f"--records={n}"],
                env=d.env,
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )
            found = re.search(r"Collected : (\d+)", done.stderr)
            if done.returncode != 0 or found is None:
                raise SystemExit(f"design {d.name}, {n} records under callgrind: {done.stderr[-2000:]}")
            counts[d.name].append(int(found.group(1)))
            gc[d.name].append(_gc_instructions(out))
        rows[d.name] = (counts[d.name][1] - counts[d.name][0]) / args.records
        no_gc[d.name] = rows[d.name] - (gc[d.name][1] - gc[d.name][0]) / args.records
        print(
            f"{d.name}: {rows[d.name] / 1e6:.3f} M instructions per record, "
            f"{no_gc[d.name] / 1e6:.3f} M without the garbage collector's",
            flush=True,
        )
    return {
        "mode": "stages-instructions",
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "instructions_per_record": rows,
        "instructions_per_record_without_gc": no_gc,
        "instructions_total": counts,
        "gc_instructions_total": gc,
        "sources": {d.name: d.source for d in designs},
    }


def _gc_instructions(out: Path) -> int:
    """Instructions inside CPython's garbage collector (gc_collect_main, inclusive) in a callgrind
    file: a full collection walks every object of the process, and whether one falls among the
    counted records is a matter of where the allocation thresholds fall (0 or 1 per 500 records
    here, 40 M instructions each), so the report gives the count without it too."""
    done = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(out)], capture_output=True, text=True, check=False
    )
    found = re.search(r"^\s*([\d,]+) .*gc_collect_main", done.stdout, re.MULTILINE)
    return int(found.group(1).replace(",", "")) if found else 0


def print_designs(r: dict[str, Any]) -> None:
    """One line per design: each round's CPU per record, the median, and the ratio to the first
    (with --instructions: instructions per record and the ratio to the first)."""
    if "instructions_per_record" in r:
        rows, no_gc = r["instructions_per_record"], r["instructions_per_record_without_gc"]
        first = next(iter(rows))
        for name, ir in rows.items():
            print(
                f"{name:>24}: {ir / 1e6:.3f} M instructions per record ({ir / rows[first]:.3f} of the "
                f"first), {no_gc[name] / 1e6:.3f} M without the garbage collector's "
                f"({no_gc[name] / no_gc[first]:.3f}); {r['sources'][name]}"
            )
        return
    names = list(r["us_per_record"])
    first = sorted(r["us_per_record"][names[0]])
    for name in names:
        us = sorted(r["us_per_record"][name])
        median = us[len(us) // 2]
        ratio = median / first[len(first) // 2]
        print(
            f"{name:>24}: median {median:.0f} us per record (rounds {us[0]:.0f}-{us[-1]:.0f}, "
            f"{', '.join(f'{x:.0f}' for x in r['us_per_record'][name])}); {ratio:.2f} of {names[0]}; "
            f"alert events {r['alerts'][name]}; {r['sources'][name]}"
        )


@contextlib.contextmanager
def _thawed_tensor_stats() -> Any:
    """wire.decode building its 50 TensorStats per record as a plain slotted dataclass: a frozen
    dataclass's __init__ sets each of its 14 fields through object.__setattr__."""
    import dataclasses

    from tensorpulse import wire

    old = wire.TensorStats
    namespace = {
        k: v
        for k, v in vars(old).items()
        if not k.startswith("__") and k not in {f.name for f in dataclasses.fields(old)}
    }
    thawed = dataclasses.make_dataclass(
        "TensorStats",
        [(f.name, f.type, f) for f in dataclasses.fields(old)],
        namespace=namespace,
        slots=True,
    )
    thawed.__module__ = old.__module__
    wire.TensorStats = thawed
    try:
        yield
    finally:
        wire.TensorStats = old


#: Throwaway variants measured beside the plain path (patched in this process only).
WHAT_IF = {"TensorStats not frozen": _thawed_tensor_stats}


def _serialisation(value: Any, reps: int = 2000) -> dict[str, float]:
    """One rank entry written and read back: JSON text (JobStore until 7958ac8, then Quix serialising
    that text again), msgpack (the store's serialiser since), orjson; us each."""
    import msgpack
    import orjson
    from quixstreams.utils.json import dumps as qdumps
    from quixstreams.utils.json import loads as qloads

    if not value:
        return {}
    obj = json.loads(value) if isinstance(value, str) else value
    text = json.dumps(obj, separators=(",", ":"))

    def timeit(fn: Any) -> float:
        t0 = time.thread_time_ns()
        for _ in range(reps):
            fn()
        return round((time.thread_time_ns() - t0) / 1e3 / reps, 2)

    packed = msgpack.packb(obj)
    quixed = qdumps(text)
    return {
        "bytes_json": len(text),
        "bytes_msgpack": len(packed),
        "json.dumps (JobStore.save until 7958ac8)": timeit(lambda: json.dumps(obj, separators=(",", ":"))),
        "json.loads (JobStore.load until 7958ac8)": timeit(lambda: json.loads(text)),
        "Quix State.set serialising the JSON text again (orjson of a str)": timeit(lambda: qdumps(text)),
        "Quix State.get deserialising it (orjson)": timeit(lambda: qloads(quixed)),
        "msgpack.packb (NaN/inf kept; the store's serialiser since 7958ac8)": timeit(
            lambda: msgpack.packb(obj)
        ),
        "msgpack.unpackb": timeit(lambda: msgpack.unpackb(packed)),
        "orjson.dumps (NaN/inf become null: not usable as is)": timeit(lambda: orjson.dumps(obj)),
        "orjson.loads": timeit(lambda: orjson.loads(orjson.dumps(obj))),
    }


def print_stages(r: dict[str, Any]) -> None:
    print(
        f"\n{r['source']}: {r['records']} records through Worker._process in process (in-memory Quix state): "
        f"{' / '.join(f'{x:.0f}' for x in r['plain_us_per_record'])} us of CPU per record "
        f"(rounds); with the timers {r['timed_us_per_record']:.0f}; Quix state flush "
        f"{r['flush_us_per_record']:.1f} us/record (memory store: no RocksDB, no changelog); "
        f"{r['alerts']} alert events"
    )
    print("\nstage (exclusive CPU, us per record; calls per record):")
    for x in r["stages"]:
        print(f"  {x['us_per_record']:>8.1f}  {x['calls_per_record']:>6.2f}  {x['stage']}")
    print(f"\nstate entries (bytes as stored): {r['state_entry_bytes']}")
    for name, us in r["what_if_us_per_record"].items():
        print(f"what if {name}: {' / '.join(f'{x:.0f}' for x in us)} us of CPU per record")
    print("\none rank entry, written or read once (us):")
    for name, us in r["serialisation_us_per_entry"].items():
        print(f"  {us:>8}  {name}")
