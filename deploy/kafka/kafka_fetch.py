"""Kafka's jars for deploy/kafka/kafka_local.py: which version pom.xml asks for, where the jars are
cached, and `fetch()`, which has Maven copy them there once.

Split from kafka_local.py so that getting the jars (Maven, a cache, a lock) is apart from running
nodes; standard library only, like the rest of this folder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LIBS_ENV = "TENSORPULSE_KAFKA_LIBS"
MARKER = ".tensorpulse-fetched"


class KafkaUnavailable(RuntimeError):
    """Java or Maven is missing, the fetch failed, or a node did not come up; the message says which."""


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version pom.xml asks for: the pom is the one place where it is written."""
    root = ET.parse(pom).getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = root.find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise KafkaUnavailable(f"{pom} has no <kafka.version> property")
    return node.text.strip()


def libs_dir() -> Path:
    """Where the jars live: $TENSORPULSE_KAFKA_LIBS, else a per-version directory in the user's cache."""
    env = os.environ.get(LIBS_ENV)
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tensorpulse" / f"kafka-{kafka_version()}" / "libs"


def _tool(name: str, how: str) -> str:
    if name == "java" and os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if candidate.exists():
            return str(candidate)
    path = shutil.which(name)
    if path is None:
        raise KafkaUnavailable(f"'{name}' is not on PATH: {how}")
    return path


def java() -> str:
    """The `java` to run Kafka with ($JAVA_HOME first), or KafkaUnavailable saying how to get one."""
    return _tool("java", "Kafka 4 needs Java 17 or newer (e.g. apt-get install openjdk-17-jre-headless)")


def fetch(libs: Path | None = None, *, quiet: bool = True) -> Path:
    """Copy Kafka's jars and their dependencies into `libs` (default `libs_dir()`); returns it.

    Runs Maven only when the directory lacks its marker file, so calling it before every start is
    cheap. Maven writes into a temporary sibling that is renamed into place, so an interrupted fetch
    never leaves a half-filled class path behind; a lock keeps concurrent fetches from racing.
    A directory that already holds Kafka's jars without the marker (say $TENSORPULSE_KAFKA_LIBS
    pointing at a Kafka distribution's libs/) is used as it is and never written to.
    """
    libs = Path(libs) if libs is not None else libs_dir()
    if ready(libs):
        return libs
    if libs.is_dir() and any(libs.iterdir()):
        raise KafkaUnavailable(f"{libs} holds files but no Kafka jars: empty it, or set {LIBS_ENV} elsewhere")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / f".{libs.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(libs):  # another process fetched while we waited
            return libs
        mvn = _tool(
            "mvn",
            "install Maven (e.g. apt-get install maven), or set KAFKA_BOOTSTRAP to use a running broker",
        )
        _tool("java", "Maven and Kafka need Java 17 or newer (e.g. apt-get install openjdk-17-jdk-headless)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{libs.name}-", dir=libs.parent))
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
        if not quiet:
            print(
                f"fetching Apache Kafka {kafka_version()} jars into {libs} ...", file=sys.stderr, flush=True
            )
        started = time.monotonic()
        try:
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0 or not list(tmp.glob("kafka_*.jar")):
                raise KafkaUnavailable(
                    f"Maven could not fetch Kafka (exit {run.returncode}): {' '.join(cmd)}\n"
                    f"{(run.stdout + run.stderr)[-3000:]}"
                )
            (tmp / MARKER).write_text(f"kafka {kafka_version()}\n")
            if libs.exists():
                libs.rmdir()  # empty, as checked above
            tmp.rename(libs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not quiet:
            n = len(list(libs.glob("*.jar")))
            print(f"fetched {n} jars in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return libs


def ready(libs: Path) -> bool:
    """Whether `libs` holds Kafka's jars (fetched here, or a distribution's libs/)."""
    return (libs / MARKER).exists() or any(libs.glob("kafka_2.*.jar"))
