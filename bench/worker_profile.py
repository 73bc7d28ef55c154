#!/usr/bin/env python
"""Where a stream worker's time per record goes: one worker under a steady load, sampled by py-spy.

One worker process (bench/designs.py: the working tree's by default, or the worker of
--baseline-rev) follows --jobs simulated jobs (bench/loadgen.py, --tensors statistics per record)
offered --rate records/s in total. After --warmup-s, py-spy samples the worker (`--rate-hz`
times a second, non-blocking: the worker is never paused) for --seconds while the load goes on,
and the script reads, over the same window:

  threads     CPU seconds of every thread of the worker from /proc/<pid>/task (exact, native
              librdkafka threads included, which py-spy cannot see), joined with py-spy's
              Python thread names, as microseconds of CPU per record evaluated
  parts       the Python samples of each thread, split by what they were doing (the categories
              below), as microseconds per record: samples / rate-hz / records
  functions   the top functions by self time (the innermost frame) and by cumulative time (any
              frame), and the top source lines by self time, in microseconds per record

Categories (first match, in this order): on the intake thread, by the line of stream/intake.py
it is on (consume, produce, flush, commit, discovery); on the Quix thread, inside
`Worker._process`: wire.decode, metrics.observe, each rule's class, JobStore/StoredSchemas
(state, with its json and Quix state calls apart), the evaluator's events, alerts; outside it:
Quix's own work (poll, produce, checkpoint/commit, the dataframe plumbing). py-spy counts a
thread only while it runs on a CPU (not while it waits for the GIL or a socket), so the parts
of a thread add up to about its CPU time; the rest of the worker's CPU is native threads.

    pip install py-spy                                  # not a dependency of tensorpulse
    python bench/worker_profile.py spy --broker kafka --rate 1000 --tensors 50 --seconds 60
    python bench/worker_profile.py spy --design baseline --broker kafka --rate 600
    python bench/worker_profile.py stages --tensors 50      # Worker._process in process, each stage timed
    python bench/worker_profile.py stages --designs 17dade3 current --rounds 6   # old and new, alternating
    python bench/worker_profile.py stages --designs 17dade3 current --instructions --records 500  # callgrind

The JSON report (every figure, and the raw collapsed stacks' path with --keep-raw; speedscope
and flamegraph.pl read them) goes to bench/results/worker-profile-<UTC time>.json unless --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from common import host_info, open_broker, utc, write_json
from designs import DEFAULT_BASELINE_REV, DESIGNS, prepare, print_imports, start_workers
from loadgen import LoadGenerator, create_topics, make_jobs
from loadwatch import check_alive, cpu_rss, read_all, stop_workers, wait_until
from worker_stages import one_round, print_designs, print_stages, run_designs, run_stages

REPO = Path(__file__).resolve().parents[1]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*):(?P<line>\d+)\)$")


# ---------------------------------------------------------------------- threads from /proc
def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (OS thread name, CPU seconds so far) of every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
            name = s[s.index("(") + 1 : s.rindex(")")]
            rest = s[s.rindex(")") + 2 :].split()
            out[int(tid)] = (name, (int(rest[11]) + int(rest[12])) / _CLK_TCK)
    return out


# ---------------------------------------------------------------------- py-spy's stacks
def parse_raw(path: Path) -> list[tuple[int, str, list[tuple[str, str, int]], int]]:
    """(tid, Python thread name, frames root->leaf as (function, file, line), samples) per line."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        head = parts[0]  # "thread (1234): name" (the name may hold ';'-free text only)
        m = re.match(r"thread \((?:0x)?([0-9a-fA-F]+)\)(?::\s*(.*))?", head)
        if m is None:
            continue
        tid = int(m.group(1), 16 if "0x" in head[:12] else 10)
        frames = []
        for fr in parts[1:]:
            fm = _FRAME.match(fr)
            if fm is None:
                frames.append((fr, "", 0))
            else:
                frames.append((fm["func"], fm["file"], int(fm["line"])))
        out.append((tid, (m.group(2) or "").strip(), frames, int(count)))
    return out


def _base(file: str) -> str:
    return file.replace("\\", "/").rsplit("/", 1)[-1]


def _in(file: str, folder: str) -> bool:
    f = file.replace("\\", "/")
    return f"/{folder}/" in f or f.startswith(f"{folder}/")


_SOURCE_CACHE: dict[str, list[str]] = {}


def source_line(file: str, line: int) -> str:
    """The text of a line of one of the package's files (found under the repository), or ''."""
    if file not in _SOURCE_CACHE:
        text: list[str] = []
        for candidate in (Path(file), REPO / file, *REPO.glob(f"*/{_base(file)}")):
            with contextlib.suppress(OSError):
                if candidate.is_file():
                    text = candidate.read_text(errors="replace").splitlines()
                    break
        _SOURCE_CACHE[file] = text
    lines = _SOURCE_CACHE[file]
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


_INTAKE_LINES = (
    ("consume(", "intake: Consumer.consume (fetch, C)"),
    ("producer.produce(", "intake: Producer.produce (copy, C)"),
    ("flush(", "intake: Producer.flush (wait for acks)"),
    ("commit(", "intake: commit source offsets"),
    ("poll(", "intake: poll (heartbeats, callbacks)"),
    ("discovery", "intake: job discovery (list topics)"),
    ("m.value()", "intake: per-message accessors"),
    ("m.topic()", "intake: per-message accessors"),
    ("m.key()", "intake: per-message accessors"),
    ("m.timestamp()", "intake: per-message accessors"),
    ("m.error()", "intake: per-message accessors"),
)


def classify(thread: str, frames: list[tuple[str, str, int]]) -> str:
    """The part of the worker a sample belongs to (see the module doc)."""
    funcs = [f for f, _, _ in frames]
    roots = ("_run_module_as_main", "Thread._bootstrap", "<module>")
    if frames and not any(f.startswith(roots) for f in funcs[:2]):
        # A stack py-spy read only in part (--nonblocking: the thread moved on meanwhile)
        leaf, file, _ = frames[-1]
        if leaf.startswith("StepRecord.select"):
            return "rule: StepRecord.select (partial stack)"
        if _in(file, "rules"):
            return f"rule: {leaf.split('.')[0]} (partial stack)"
        return f"partial stack ({leaf})"
    if "Intake.run" in funcs or thread == "tensorpulse-intake":
        for func, file, line in reversed(frames):
            if _base(file) == "intake.py":
                if func == "Intake._tick":
                    return "intake: clock ticks"
                if func in ("Intake._follow",) or "discovery" in file:
                    return "intake: job discovery (list topics)"
                if "JobDiscovery" in func:
                    return "intake: job discovery (list topics)"
                text = source_line(file, line)
                for needle, name in _INTAKE_LINES:
                    if needle in text:
                        return name
                if func == "Intake._delivered.<locals>.on_delivery" or "on_delivery" in func:
                    return "intake: delivery callbacks"
                return f"intake: {func} (own Python)"
            if "discovery" in _base(file):
                return "intake: job discovery (list topics)"
        return "intake: other"
    if "LagMonitor.poll" in funcs or thread == "tensorpulse-lag":
        return "lag monitor"
    if any("serve_forever" in f or "ThreadingHTTPServer" in f or "process_request" in f for f in funcs):
        return "metrics HTTP server (scrapes)"
    if "Worker._process" in funcs or "Worker.process_one" in funcs:
        for i, (func, file, _) in enumerate(frames):  # outermost first: what process_one called
            if func in ("decode",) and _base(file) == "wire.py":
                return "process: wire.decode"
            if func == "WorkerMetrics.observe":
                return "process: metrics.observe (prometheus)"
            if _in(file, "rules") and func.split(".")[0] not in ("RuleSpec",):
                cls = func.split(".")[0]
                return f"rule: {cls}"
            if func.startswith(("JobStore.", "StoredSchemas.")):
                inner = [(f, fl) for f, fl, _ in frames[i:]]
                if any(_in(fl, "json") or f.startswith(("dumps", "loads")) for f, fl in inner):
                    return f"state: {func} (json)"
                if any(_in(fl, "quixstreams") for _, fl in inner):
                    return f"state: {func} (Quix state get/set)"
                return f"state: {func} (own Python)"
            if func in ("JobEvaluator._transition", "JobEvaluator._event"):
                return "process: evaluator events (alert objects)"
            if func == "Worker._emit":
                return "process: emit alerts (encode, metrics, log)"
            if _in(file, "json") or func in ("dumps", "loads"):
                return "state: JSON of the job's whole state (baseline design)"
            if func.startswith("ClockMirror.") or func in ("deepcopy", "JobEvaluator.clock_slots"):
                return "process: clock mirror (baseline design)"
            if func == "JobEvaluator.process":
                continue  # its rules and events are matched further in
        leaf = frames[-1][0] if frames else "?"
        if "JobEvaluator.process" in funcs:
            return "process: evaluator loop (own Python)"
        return f"process: other ({leaf})"
    if any(_in(file, "quixstreams") for _, file, _ in frames):
        names = " ".join(funcs).lower()
        if "checkpoint" in names or "commit" in names or "flush" in names or "transaction" in names:
            return "quix: checkpoint/commit (state flush, changelog, transaction)"
        if "to_topic" in names or "produce" in names:
            return "quix: produce outputs"
        if "poll" in names or "consume" in names:
            return "quix: consumer poll"
        if "deserializ" in names:
            return "quix: deserialize"
        return "quix: other (dataframe plumbing, context)"
    return f"other: {thread or '?'}"


def summarise(
    stacks: list[tuple[int, str, list[tuple[str, str, int]], int]],
    hz: float,
    records: float,
    top: int,
    cpu_by_tid: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Parts, functions and lines in microseconds of CPU per record.

    A sample stands for 1/hz seconds of its thread; with `cpu_by_tid` (each thread's CPU seconds
    over the window, from /proc) a thread's samples are scaled to add up to its CPU time instead,
    so that time a thread spent runnable but off the CPU (a busy machine) or holding the GIL while
    preempted is spread over its code in proportion, not counted as work.
    """
    per_tid: Counter[int] = Counter()
    for tid, _, _, n in stacks:
        per_tid[tid] += n
    weight = {}
    for tid, n in per_tid.items():
        cpu = (cpu_by_tid or {}).get(tid)
        weight[tid] = cpu / n if cpu is not None and n else 1.0 / hz
    scale = 1e6 / max(records, 1.0)
    parts: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    raw_parts: Counter[str] = Counter()
    per_thread: Counter[tuple[int, str]] = Counter()
    self_f: Counter[str] = Counter()
    cum_f: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for tid, thread, frames, n in stacks:
        t = n * weight[tid]  # CPU seconds this line of samples stands for
        part = classify(thread, frames)
        parts[part] += t
        groups[part.split(":")[0].split(" (")[0]] += t
        raw_parts[part] += n
        per_thread[(tid, thread)] += t
        if not frames:
            continue
        func, file, line = frames[-1]
        self_f[f"{func} ({_base(file)})"] += t
        lines[f"{_base(file)}:{line} {source_line(file, line)[:90]}"] += t
        for key in {f"{f} ({_base(fl)})" for f, fl, _ in frames}:
            cum_f[key] += t

    def table(c: Counter[str], k: int | None = None) -> list[dict[str, Any]]:
        return [{"name": name, "us_per_record": round(v * scale, 1)} for name, v in c.most_common(k)]

    return {
        "samples": sum(per_tid.values()),
        "samples_cpu_s": round(sum(per_tid[t] * weight[t] for t in per_tid), 3),
        "samples_wall_s": round(sum(per_tid.values()) / hz, 3),
        "parts": [
            {
                **row,
                "samples": raw_parts[row["name"]],
                "us_per_record_unscaled": round(raw_parts[row["name"]] / hz * scale, 1),
            }
            for row in table(parts)
        ],
        "groups": table(groups),
        "threads": [
            {"tid": tid, "thread": name, "samples": per_tid[tid], "us_per_record": round(v * scale, 1)}
            for (tid, name), v in per_thread.most_common()
        ],
        "self": table(self_f, top),
        "cumulative": table(cum_f, top),
        "lines": table(lines, top),
    }


# ---------------------------------------------------------------------- the run
def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(args: argparse.Namespace) -> dict[str, Any]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy not found: pip install py-spy (into this venv)")
    tmp = Path(tempfile.mkdtemp(prefix="tp-profile-"))
    try:
        design = prepare(args.design, tmp, args.baseline_rev)
        print_imports(design)
        with open_broker(args.bootstrap, args.broker) as broker:
            print(f"broker: {broker.bootstrap} ({broker.what})", flush=True)
            return _measure(args, design, broker, py_spy, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args: argparse.Namespace, design: Any, broker: Any, py_spy: str, tmp: Path) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    prefix = f"load-{run_id}-"
    bs = broker.bootstrap
    jobs = make_jobs(run_id, args.jobs, args.tensors, args.seed)
    create_topics(bs, [j.topic for j in jobs])
    gen = LoadGenerator(
        bs, jobs, faults_per_s=args.faults_per_s, fault_jobs=max(1, args.jobs // 2), seed=args.seed
    )
    workdir = tmp / "work"
    workdir.mkdir()
    workers = start_workers(
        design,
        bs,
        1,
        group=f"profile-{run_id}",
        jobs_regex=f"^{prefix}",
        workdir=workdir,
        guarantee=args.guarantee,
    )
    w = workers[0]
    raw = Path(args.keep_raw) if args.keep_raw else tmp / "stacks.txt"
    try:
        wait_until(lambda: read_all(workers, prefix) is not None, 60, "the worker's /metrics", workers)
        gen.announce_all()
        wait_until(
            lambda: read_all(workers, prefix).processed >= len(jobs), 120, "the first records", workers
        )
        print(f"warm-up: {args.rate:g} records/s for {args.warmup_s:g}s", flush=True)
        gen.run(args.rate, args.warmup_s, 0)
        check_alive(workers)
        before, threads0, wcpu0 = read_all(workers, prefix), thread_cpu(w.proc.pid), cpu_rss(w.proc.pid)[0]
        children0 = _children_cpu()
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(w.proc.pid), "--duration", str(int(args.seconds)), "--rate"]
            + [
                str(int(args.rate_hz)),
                "--format",
                "raw",
                "--threads",
                "--gil",
                "--nonblocking",
                "-o",
                str(raw),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        load0, gcpu0 = os.getloadavg(), time.process_time()
        print(
            f"profiling {args.seconds:g}s at {args.rate:g} records/s (py-spy {args.rate_hz:g} Hz)", flush=True
        )
        sent, wall = gen.run(args.rate, args.seconds, 1)
        after, threads1, wcpu1 = read_all(workers, prefix), thread_cpu(w.proc.pid), cpu_rss(w.proc.pid)[0]
        gcpu1 = time.process_time()
        spy_out, _ = spy.communicate(timeout=60)
        spy_cpu = _children_cpu() - children0  # py-spy's own CPU (the only child reaped meanwhile)
        load1 = os.getloadavg()
        backlog = gen.sent - after.processed
    finally:
        gen.close()
        stop_workers(workers)
    if spy.returncode != 0 or not raw.exists():
        raise SystemExit(f"py-spy failed ({spy.returncode}):\n{spy_out[-3000:]}")
    records = after.processed - before.processed
    stacks = parse_raw(raw)
    cpu_by_tid = {tid: cpu1 - threads0.get(tid, (name, 0.0))[1] for tid, (name, cpu1) in threads1.items()}
    summary = summarise(stacks, args.rate_hz, records, args.top, cpu_by_tid)
    os_threads = []
    for tid, (name, cpu1) in sorted(threads1.items()):
        cpu0 = threads0.get(tid, (name, 0.0))[1]
        py_name = next((t for t_id, t, _, _ in stacks if t_id == tid and t), "")
        os_threads.append(
            {
                "tid": tid,
                "os_name": name,
                "python_name": py_name,
                "cpu_s": round(cpu1 - cpu0, 3),
                "cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
                "us_per_record": round(1e6 * (cpu1 - cpu0) / max(records, 1), 1),
            }
        )
    os_threads.sort(key=lambda t: -t["cpu_s"])
    return {
        "design": design.name,
        "design_source": design.describe(),
        "broker": broker.what,
        "config": {k: v for k, v in vars(args).items()},
        "window_s": round(wall, 2),
        "offered_rps": round(sent / wall, 1),
        "processed_rps": round(records / wall, 1),
        "records": int(records),
        "backlog_end": int(max(backlog, 0)),
        "worker_cpu_pct": round(100 * (wcpu1 - wcpu0) / wall, 1),
        "worker_cpu_us_per_record": round(1e6 * (wcpu1 - wcpu0) / max(records, 1), 1),
        "generator_cpu_pct": round(100 * (gcpu1 - gcpu0) / wall, 1),
        "profiler_cpu_pct": round(100 * spy_cpu / wall, 1),
        "loadavg": [round(load0[0], 2), round(load1[0], 2)],
        "os_threads": os_threads,
        "py_spy": summary,
        "raw_stacks": str(raw) if args.keep_raw else None,
        "py_spy_output": spy_out[-1500:],
    }


def print_report(r: dict[str, Any], top: int) -> None:
    s = r["py_spy"]
    print(
        f"\n{r['design']} worker ({r['design_source']['source']}), {r['broker']}: {r['window_s']:.0f}s window, "
        f"offered {r['offered_rps']:.0f}/s, processed {r['processed_rps']:.0f}/s ({r['records']} records, "
        f"backlog at end {r['backlog_end']}); worker CPU {r['worker_cpu_pct']:.0f}% = "
        f"{r['worker_cpu_us_per_record']:.0f} us/record; generator {r['generator_cpu_pct']:.0f}%; "
        f"load average {r['loadavg'][0]} -> {r['loadavg'][1]}"
    )
    print("\nthreads (CPU from /proc, us per record):")
    for t in r["os_threads"]:
        if t["cpu_s"] > 0:
            print(
                f"  {t['us_per_record']:>8.1f}  {t['cpu_pct']:>5.1f}%  {t['os_name']:<16} {t['python_name']}"
            )
    print(
        f"\nparts (py-spy: {s['samples']} samples of the thread holding the GIL = {s['samples_wall_s']:.1f}s, scaled to "
        f"those threads' {s['samples_cpu_s']:.1f}s of CPU; us of CPU per record, unscaled in brackets):"
    )
    print("  by group: " + ", ".join(f"{g['name']} {g['us_per_record']:.0f}" for g in s.get("groups", [])))
    for p in s["parts"]:
        print(f"  {p['us_per_record']:>8.1f}  ({p['us_per_record_unscaled']:>7.1f})  {p['name']}")
    for key, title in (
        ("self", "self time"),
        ("cumulative", "cumulative time"),
        ("lines", "self time by line"),
    ):
        print(
            f"\ntop {top} functions by {title} (us per record):" if key != "lines" else f"\ntop {top} lines:"
        )
        for p in s[key][:top]:
            print(f"  {p['us_per_record']:>8.1f}  {p['name']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--jobs", type=int, default=10)
    common.add_argument("--tensors", type=int, default=50)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument(
        "--out", help="JSON report (default bench/results/worker-profile-<mode>-<UTC time>.json)"
    )
    sp = sub.add_parser("spy", parents=[common], help="a worker process under load, sampled by py-spy")
    sp.add_argument(
        "--design", choices=DESIGNS, default="current", help="the worker profiled (default current)"
    )
    sp.add_argument("--baseline-rev", default=DEFAULT_BASELINE_REV)
    sp.add_argument("--rate", type=float, default=1000.0, help="records/s offered in total (default 1000)")
    sp.add_argument("--warmup-s", type=float, default=15.0)
    sp.add_argument("--seconds", type=float, default=60.0, help="the profiled window (default 60)")
    sp.add_argument("--rate-hz", type=float, default=200.0, help="py-spy samples per second (default 200)")
    sp.add_argument("--faults-per-s", type=float, default=2.0)
    sp.add_argument("--guarantee", default="exactly-once", choices=["exactly-once", "at-least-once"])
    sp.add_argument("--bootstrap", help="a Kafka cluster (default: $KAFKA_BOOTSTRAP, else --broker)")
    sp.add_argument("--broker", choices=["tansu", "kafka"], default="tansu")
    sp.add_argument("--top", type=int, default=25)
    sp.add_argument("--keep-raw", help="write py-spy's collapsed stacks here (default: a temp file)")
    rs = sub.add_parser(
        "resummarise",
        help="the parts of a `spy` report again from its kept stacks (--keep-raw), e.g. after new categories",
    )
    rs.add_argument("report", help="the JSON report of a spy run made with --keep-raw")
    rs.add_argument("--top", type=int, default=25)
    st = sub.add_parser(
        "stages", parents=[common], help="Worker._process in this process, each stage timed (CPU), no broker"
    )
    st.add_argument("--records", type=int, default=3000, help="measured records (default 3000)")
    st.add_argument("--warmup-records", type=int, default=500)
    st.add_argument("--rounds", type=int, default=3, help="untimed rounds for the plain total (default 3)")
    st.add_argument(
        "--checkpoint-every",
        type=int,
        default=250,
        help="records per Quix transaction (default 250: 0.25 s at 1000/s)",
    )
    st.add_argument(
        "--fault-every", type=int, default=500, help="a NaN record every N (default 500: 2/s at 1000/s)"
    )
    st.add_argument(
        "--designs",
        nargs="+",
        help="compare these instead (e.g. 17dade3 current): --rounds untimed rounds of each, one "
        "process per design and round, alternating; a revision is git archive'd (bench/designs.py)",
    )
    st.add_argument(
        "--instructions",
        action="store_true",
        help="with --designs: count instructions per record under valgrind's callgrind instead of "
        "timing rounds (load-independent; 50-100x slower: use --records 500)",
    )
    st.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)  # run_designs' child
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    load_start = list(os.getloadavg())
    if args.mode == "resummarise":
        report = json.loads(Path(args.report).read_text())
        cpu = {t["tid"]: t["cpu_s"] for t in report["os_threads"]}
        stacks = parse_raw(Path(report["raw_stacks"]))
        report["py_spy"] = summarise(stacks, report["config"]["rate_hz"], report["records"], args.top, cpu)
        print_report(report, args.top)
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nreport: {args.report} (rewritten)")
        return 0
    if args.mode == "spy":
        report = run(args)
        print_report(report, args.top)
    elif args.one_round:
        print(json.dumps(one_round(args)))
        return 0
    elif args.designs:
        report = run_designs(args)
        print_designs(report)
    else:
        report = run_stages(args)
        print_stages(report)
    report["started_utc"] = utc(started)
    report["host"] = host_info(loadavg_start=load_start, loadavg_end=list(os.getloadavg()))
    path = write_json(report, args.out, f"worker-profile-{args.mode}", started)
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
