#!/usr/bin/env python3
"""Apache Kafka 4.x on loopback, straight from its Maven jars: no Docker, no Kafka download.

Why this exists: the integration tests (and anyone trying tensorpulse against the real thing) need
Apache Kafka, not a Kafka-compatible stand-in, and the machines that run them have Java and Maven
but no container engine. Maven Central already publishes the broker as jars, so `fetch()` asks
Maven for them once (about 45 MB into a cache directory) and `KafkaCluster` runs one JVM per node
in KRaft mode (each node is broker and controller) with its data under a work directory.

Standard library only and no tensorpulse imports, so that an operator can copy this folder
(kafka_local.py, kafka_fetch.py for the jars, kafka_config.py for the nodes' configuration, and
pom.xml) anywhere and run it:

    python deploy/kafka/kafka_local.py fetch                 # once: Maven into the cache
    python deploy/kafka/kafka_local.py run --nodes 3         # prints KAFKA_BOOTSTRAP=...; Ctrl-C stops
    python deploy/kafka/kafka_local.py run --secure          # TLS + SASL/SCRAM + ACLs (admin in secure.json)

or from Python:

    with KafkaCluster(nodes=3) as kafka:
        use(kafka.bootstrap)          # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        kafka.kill(1)                 # SIGKILL node 1 ...
        kafka.start_node(1)           # ... and bring it back on the same ports and data

Measured on a 2-core development machine (Java 17, Kafka 4.4.0, jars cached), from `start()` until
every node has logged "Kafka Server started", storage format included: one node 2.9-4.1 s; three
nodes 8-14 s (six JVM starts share two cores; the longer times with other tests running beside).
A killed node of three is back in 4-6 s. `stop()` of a temporary cluster is immediate (SIGKILL);
a graceful stop takes 0.4 s for one node and about 6 s for three (the last ones lose their quorum).

The JVMs run in their own sessions (a Ctrl-C in the terminal reaches only this script, which then
stops them) and, on Linux, are killed by the kernel if the thread that started them dies, so
that a test run killed by a timeout does not leave brokers holding ports. Start clusters from a
thread that outlives them (the main thread, as pytest fixtures and the CLI do).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling modules, also when this file is imported by path
    sys.path.insert(0, str(HERE))

from kafka_config import (  # noqa: E402
    ADMIN_USER,
    BROKER_USER,
    JVM_OPTS,
    LOG4J2,
    SASL_MECHANISM,
    SECRETS_FILE,
    load_or_make_secrets,
    make_certificate,
    secure_properties,
    server_properties,
)
from kafka_fetch import LIBS_ENV, KafkaUnavailable, fetch, java, ready  # noqa: E402

__all__ = ["KafkaCluster", "KafkaUnavailable", "fetch", "free_ports", "main"]

STARTED = "Kafka Server started"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free right now (all held open together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_id() -> str:
    # Kafka's own form: 16 random bytes, URL-safe base64 without padding; like Kafka's
    # Uuid.randomUuid, never one starting with '-' that a command line would take for an option.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux only: the kernel SIGKILLs the JVM when the thread that forked it exits, which covers the
    # cases atexit cannot (the test runner killed, os._exit from a timeout handler).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_LIVE: set[KafkaCluster] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    """A cluster nobody stopped (a crashed test session) must not outlive the interpreter."""
    with _LIVE_LOCK:
        clusters = list(_LIVE)
    for cluster in clusters:
        for i in range(cluster.nodes):
            with contextlib.suppress(Exception):
                cluster.kill(i)


class KafkaCluster:
    """`nodes` Kafka nodes on 127.0.0.1, each broker and controller (KRaft); a context manager.

    `workdir` holds each node's data, configuration and logs (`node-<i>/server.log`). Left out, a
    temporary directory is used and deleted by `stop()`; given, it is kept, and a later cluster
    with the same directory and node count reuses its data (topics survive). `port` fixes the
    first node's client port (the others take the next ones); otherwise free ports are picked.
    `log_level` is the level of everything Kafka logs into the node logs; `extra_config` adds or
    overrides server properties (the same for every node). `libs` is a directory of Kafka's jars
    (default: `fetch()`'s cache).

    `secure=True` serves clients on a TLS listener that takes SASL/SCRAM-SHA-512 only, with Kafka's
    standard ACL authorizer (no ACL, no access; `super.users` are the nodes and `admin`). The
    certificate (self-signed, for 127.0.0.1) is made with the JDK's keytool and the SCRAM users
    are written into the storage when it is formatted: `admin`, `broker` (random passwords) and
    `users` ({name: password}). Both are kept in the work directory (`secure.json`, `tls/`), so a
    reused directory needs the same `users`. `client_settings(user)` gives a client's librdkafka
    settings; `ca_path` is the certificate clients trust.
    """

    def __init__(
        self,
        nodes: int = 1,
        workdir: str | Path | None = None,
        *,
        log_level: str = "WARN",
        port: int | None = None,
        libs: str | Path | None = None,
        start_timeout: float = 90.0,
        extra_config: dict[str, str] | None = None,
        secure: bool = False,
        users: Mapping[str, str] | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        if users and not secure:
            raise ValueError("SCRAM users need a secured cluster: KafkaCluster(secure=True, users=...)")
        clash = {BROKER_USER, ADMIN_USER} & set(users or {})
        if clash:
            raise ValueError(f"user(s) {sorted(clash)} are the cluster's own; choose other names")
        self.secure = secure
        self._users = dict(users or {})
        #: SCRAM passwords by user name, once `start()` has prepared a secured cluster.
        self.passwords: dict[str, str] = {}
        self._keystore_password = ""
        self.nodes = nodes
        self.log_level = log_level.upper()
        self.start_timeout = start_timeout
        self.extra_config = dict(extra_config or {})
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="kafka-local-"))
        self._libs = Path(libs) if libs is not None else None
        if port:
            self.ports = [port + i for i in range(nodes)]
            picked = [p for p in free_ports(2 * nodes) if p not in self.ports]
        else:
            picked = free_ports(2 * nodes)
            self.ports, picked = picked[:nodes], picked[nodes:]
        self.controller_ports = picked[:nodes]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes
        self.started_s: float | None = None
        self._cp: str | None = None

    @property
    def bootstrap(self) -> str:
        """The client bootstrap list: every node, so that clients survive any single node's death."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node_dir(self, i: int) -> Path:
        return self.workdir / f"node-{i}"

    def log_path(self, i: int) -> Path:
        """Node `i`'s Kafka log; the first place to look when a node misbehaves."""
        return self.node_dir(i) / "server.log"

    # -- configuration -------------------------------------------------------------------------

    def _properties(self, i: int) -> dict[str, str]:
        props = server_properties(i, self.ports, self.controller_ports, self.node_dir(i) / "data")
        if self.secure:
            props.update(
                secure_properties(
                    i,
                    self.ports,
                    self.controller_ports,
                    self.passwords[BROKER_USER],
                    self._keystore_path,
                    self._keystore_password,
                    self.ca_path,
                )
            )
        props.update(self.extra_config)
        return props

    @property
    def ca_path(self) -> Path:
        """The certificate (PEM) that clients of a secured cluster trust."""
        return self.workdir / "tls" / "ca.pem"

    @property
    def _keystore_path(self) -> Path:
        return self.workdir / "tls" / "node.p12"

    def client_settings(self, user: str = ADMIN_USER) -> dict[str, str]:
        """librdkafka settings (all but bootstrap.servers) for `user` on a secured cluster."""
        if not self.secure:
            raise ValueError("client_settings() is for a secured cluster: KafkaCluster(secure=True)")
        if user not in self.passwords:
            known = ", ".join(sorted(self.passwords)) or "none yet: call start() first"
            raise KeyError(f"no SCRAM user {user!r} on this cluster (users: {known})")
        return {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": SASL_MECHANISM,
            "sasl.username": user,
            "sasl.password": self.passwords[user],
            "ssl.ca.location": str(self.ca_path),
        }

    def _prepare_secure(self) -> None:
        """The SCRAM passwords and the certificate: made on first use of the work directory, then reused."""
        self.passwords, self._keystore_password = load_or_make_secrets(self.workdir, self._users)
        if not self._keystore_path.exists() or not self.ca_path.exists():
            make_certificate(self._keystore_path, self.ca_path, self._keystore_password, self.start_timeout)

    def _write_config(self, i: int) -> Path:
        d = self.node_dir(i)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "server.properties"
        body = "".join(f"{k}={v}\n" for k, v in self._properties(i).items())
        path.write_text("# written by kafka_local.py; rewritten at every start\n" + body)
        return path

    def _prepare(self) -> str:
        """Config files for every node, and the cluster id: reused from the work directory if any."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            self._prepare_secure()
        state = self.workdir / "cluster.id"
        if state.exists():
            cluster_id, _, count = state.read_text().strip().partition(" ")
            if count and int(count) != self.nodes:
                raise KafkaUnavailable(
                    f"{self.workdir} holds a {count}-node cluster, not {self.nodes}: use another directory"
                )
        else:
            cluster_id = _cluster_id()
            state.write_text(f"{cluster_id} {self.nodes}\n")
        (self.workdir / "log4j2.properties").write_text(LOG4J2.format(level=self.log_level))
        for i in range(self.nodes):
            self._write_config(i)
        return cluster_id

    def _classpath(self) -> str:
        libs = self._libs if self._libs is not None else fetch()
        if not ready(libs):
            raise KafkaUnavailable(f"{libs} holds no Kafka jars: run `python {Path(__file__)} fetch`")
        return str(libs / "*")

    def _java(self, i: int, main: str, *args: str, tool: bool = False) -> list[str]:
        # A short-lived tool starts faster with the quick JIT only; the broker wants the full one.
        return [
            java(),
            *JVM_OPTS,
            *(["-XX:TieredStopAtLevel=1"] if tool else []),
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            f"-Dtensorpulse.kafka.log={self.log_path(i)}",
            f"-Dkafka.logs.dir={self.node_dir(i)}",
            "-cp",
            self._cp or self._classpath(),
            main,
            *args,
        ]

    def _format(self, i: int, cluster_id: str) -> None:
        if (self.node_dir(i) / "data" / "meta.properties").exists():
            return
        cfg = str(self.node_dir(i) / "server.properties")
        cmd = self._java(i, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", cfg, tool=True)
        for user, password in self.passwords.items():  # SCRAM credentials go into the initial metadata
            cmd += ["--add-scram", f"{SASL_MECHANISM}=[name={user},password={password}]"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=self.start_timeout)
        if run.returncode != 0:
            raise KafkaUnavailable(
                f"formatting node {i}'s storage failed (exit {run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}"
            )

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> KafkaCluster:
        """Format (first time only) and start every node; returns once all of them serve clients."""
        t0 = time.monotonic()
        self._cp = self._classpath()
        cluster_id = self._prepare()
        with ThreadPoolExecutor(self.nodes) as pool:  # the JVMs start in parallel: they are most of the wait
            list(pool.map(lambda i: self._format(i, cluster_id), range(self.nodes)))
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            offsets = [self._launch(i) for i in range(self.nodes)]
            # Each node reports "started" only after the quorum has elected a leader and unfenced it,
            # so the last of these lines means a cluster that accepts topics with full replication.
            for i, offset in enumerate(offsets):
                self._await_started(i, offset, t0 + self.start_timeout)
        except BaseException:
            self.stop(timeout=5)
            raise
        self.started_s = time.monotonic() - t0
        return self

    def _launch(self, i: int) -> int:
        log = self.log_path(i)
        offset = log.stat().st_size if log.exists() else 0
        cfg = str(self.node_dir(i) / "server.properties")
        out = open(self.node_dir(i) / "stdout.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            self.procs[i] = subprocess.Popen(
                self._java(i, "kafka.Kafka", cfg),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            out.close()
        return offset

    def _await_started(self, i: int, offset: int, deadline: float) -> None:
        proc = self.procs[i]
        assert proc is not None
        log = self.log_path(i)
        while True:
            if log.exists():
                with open(log, "rb") as f:
                    f.seek(offset)
                    if STARTED.encode() in f.read():
                        return
            if proc.poll() is not None:
                raise KafkaUnavailable(f"Kafka node {i} exited with code {proc.returncode}:\n{self._tail(i)}")
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"Kafka node {i} did not start within {self.start_timeout:.0f}s:\n{self._tail(i)}"
                )
            time.sleep(0.05)  # polling a file: there is no event to wait on

    def _tail(self, i: int) -> str:
        parts = []
        for name in ("stdout.log", "server.log"):
            p = self.node_dir(i) / name
            if p.exists():
                parts.append(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts) or "(no log)"

    def alive(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL node `i`, as a crashed machine would die: no controlled shutdown, no flush."""
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def start_node(self, i: int, timeout: float | None = None) -> None:
        """(Re)start node `i` on its old ports and data; returns once it serves clients again."""
        if self.alive(i):
            return
        self._write_config(i)
        offset = self._launch(i)
        self._await_started(i, offset, time.monotonic() + (timeout or self.start_timeout))

    def stop(self, timeout: float = 20.0, *, graceful: bool | None = None) -> None:
        """Stop every node and wait for them; a temporary work directory is deleted.

        Graceful: SIGTERM (Kafka's controlled shutdown, so that the next start on the same data needs
        no log recovery), then SIGKILL for whatever outlasts `timeout`. Otherwise SIGKILL at once:
        a graceful stop of three nodes that lose their quorum on the way down takes 5 s, for nothing
        when the data is thrown away. Left out, graceful is chosen when the work directory is kept.
        """
        running = [p for p in self.procs if p is not None and p.poll() is None]
        if graceful is None:
            graceful = not self._own_workdir
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + timeout
        for p in running:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- command line ------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    fetch(quiet=False)
    cluster = KafkaCluster(args.nodes, args.dir, port=args.port, log_level=args.log_level, secure=args.secure)
    print(f"starting {args.nodes} Kafka node(s) in {cluster.workdir} ...", file=sys.stderr, flush=True)
    try:
        cluster.start()
    except KafkaUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(
            f"ready in {cluster.started_s:.1f}s; logs: {cluster.workdir}/node-*/server.log", file=sys.stderr
        )
        if cluster.secure:
            print(
                f"secured: SASL_SSL with {SASL_MECHANISM}, ACLs enforced; CA {cluster.ca_path}; "
                f"SCRAM passwords (user {ADMIN_USER} is a super user) in {cluster.workdir / SECRETS_FILE}",
                file=sys.stderr,
            )
        print(f"KAFKA_BOOTSTRAP={cluster.bootstrap}", flush=True)
        reported: set[int] = set()
        while not stop.wait(1.0):
            for i in range(cluster.nodes):
                if not cluster.alive(i) and i not in reported:
                    reported.add(i)
                    print(f"warning: node {i} exited; see {cluster.log_path(i)}", file=sys.stderr, flush=True)
            if len(reported) == cluster.nodes:
                return 1
        print("stopping ...", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    return 0


def _fetch(args: argparse.Namespace) -> int:
    try:
        libs = fetch(quiet=False)
    except KafkaUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(libs)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `fetch` the jars, or `run` a cluster in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="kafka_local.py",
        description=(
            "Run Apache Kafka (KRaft, from Maven Central's jars) on 127.0.0.1 for development and tests. "
            "Needs Java 17+ and Maven; jars are cached in "
            f"~/.cache/tensorpulse/kafka-<version>/libs (override with ${LIBS_ENV})."
        ),
        epilog=(
            "examples:\n"
            "  kafka_local.py fetch                        download the jars once (about 45 MB)\n"
            "  kafka_local.py run                          one node on a free port, ready in about 4 s\n"
            "  kafka_local.py run --nodes 3 --port 9092    three nodes on 9092-9094\n"
            "  kafka_local.py run --dir ~/kafka-data       topics survive until the next run\n"
            "\n"
            "`run` writes only the KAFKA_BOOTSTRAP=... line to stdout (progress goes to stderr), so a script\n"
            "can start it in the background, wait for that line, and stop it with SIGTERM:\n"
            "  kafka_local.py run > kafka.env & until grep -q KAFKA_BOOTSTRAP kafka.env; do sleep 1; done\n"
            "Node logs: <dir>/node-<i>/server.log."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "fetch", help="download Kafka's jars with Maven into the cache (idempotent); prints the directory"
    )
    f.set_defaults(func=_fetch)
    r = sub.add_parser(
        "run",
        help="start a cluster in the foreground; prints KAFKA_BOOTSTRAP=host:port,... and stops on Ctrl-C/SIGTERM",
    )
    r.add_argument(
        "--nodes", type=int, default=1, help="number of nodes, each broker and controller (default 1)"
    )
    r.add_argument(
        "--port",
        type=int,
        default=None,
        help="client port of the first node; node i gets PORT+i (default: free ports)",
    )
    r.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="work directory for data and logs, kept after exit and reused by the next run (default: a temporary one, deleted)",
    )
    r.add_argument(
        "--log-level", default="WARN", help="level of the node logs, e.g. INFO or DEBUG (default WARN)"
    )
    r.add_argument(
        "--secure",
        action="store_true",
        help=f"clients on TLS with SASL/{SASL_MECHANISM} only, ACLs enforced; users and CA in the work directory",
    )
    r.set_defaults(func=_run)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
