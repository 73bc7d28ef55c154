"""Worker designs side by side: the working tree's `tensorpulse stream` and the worker of a git revision.

Shared by the benchmarks that compare the stream worker before and after a change
(`job_start.py`, `load.py knee --designs`):

  baseline  the worker of a git revision (`--baseline-rev`, 9382ccd by default: the last commit
            before the worker rewrite). `git archive` extracts it into a temp dir, laid out as the
            `tensorpulse` package (pyproject's package-dir: stream/, rules/, sinks/ and producers/
            linked into a copy of tensorpulse/), run as `python -m tensorpulse.cli stream` with
            PYTHONPATH pointing there. `prepare_baseline` runs the import check below and stops
            if a worker process would import anything but the revision's files.
  current   the working tree, as installed (the editable install), started as the project starts
            workers (stream/process.py's worker_command).

Both are started from a work directory, never from the repository root: `python -m` puts the
current directory first on sys.path, and from the root that would be the working tree's
tensorpulse/, whatever PYTHONPATH says. The benchmark's own side (generator, alert reader,
metrics scrapes) always runs the working tree's code.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from loadwatch import WorkerProc

from tensorpulse.broker import free_port
from tensorpulse.stream.process import worker_command

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the package-dir table falls back to PACKAGE_DIR
    tomllib = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[1]
DESIGNS = ("baseline", "current")
#: The revision before the stream worker rewrite (fec6b5d, f8a2a83): one Quix app over every job
#: topic, rebuilt for each new job.
DEFAULT_BASELINE_REV = "9382ccd"
#: The installed package's layout (pyproject's package-dir), used when the revision's own
#: pyproject.toml has no such table.
PACKAGE_DIR = {
    "tensorpulse": "tensorpulse",
    "tensorpulse.stream": "stream",
    "tensorpulse.producers": "producers",
    "tensorpulse.rules": "rules",
    "tensorpulse.sinks": "sinks",
}
_IMPORT_CHECK = (
    "import json, tensorpulse, tensorpulse.cli, tensorpulse.rules, tensorpulse.stream.worker as w; "
    "print(json.dumps({'tensorpulse': tensorpulse.__file__, 'tensorpulse.cli': tensorpulse.cli.__file__, "
    "'tensorpulse.rules': tensorpulse.rules.__file__, 'tensorpulse.stream.worker': w.__file__}))"
)


class DesignError(RuntimeError):
    """A design cannot be run (its modules do not import, its command cannot be built)."""


@dataclass
class Design:
    """How to start one design's worker: the module run with -m, the environment, where it imports from."""

    name: str
    module: str | None  # None: worker_command's own
    env: dict[str, str]
    imports: dict[str, str] = field(default_factory=dict)
    rev: str | None = None
    source: str = ""

    def command(
        self,
        bootstrap: str,
        *,
        group: str,
        state_dir: Path,
        port: int,
        jobs_regex: str,
        guarantee: str,
        rules: str | None = None,
    ) -> list[str]:
        argv = worker_command(
            bootstrap,
            group=group,
            state_dir=state_dir,
            metrics_port=port,
            rules=rules,
            jobs_regex=jobs_regex,
            guarantee=guarantee,
        )
        if self.module is None:
            return argv
        if "-m" not in argv:
            raise DesignError(
                f"worker_command no longer runs a module (-m): {argv[:4]}; cannot run {self.name}"
            )
        i = argv.index("-m")
        return [*argv[: i + 1], self.module, *argv[i + 2 :]]

    def describe(self) -> dict[str, object]:
        """What a report says about the design."""
        return {"source": self.source, "rev": self.rev, "imports": self.imports}


def imported_files(env: dict[str, str], cwd: Path) -> dict[str, str]:
    """The files a worker process started with `env` in `cwd` imports for the package's key modules.

    Run as its own interpreter because that is the only honest check: the editable install puts
    an import finder on sys.meta_path, and the order of the finders decides which tree wins.
    """
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise DesignError(f"the worker's modules do not import: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _package_dirs(pyproject: bytes) -> dict[str, str]:
    if tomllib is None:
        return dict(PACKAGE_DIR)
    try:
        table = tomllib.loads(pyproject.decode())["tool"]["setuptools"]["package-dir"]
    except (KeyError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return dict(PACKAGE_DIR)
    return {str(k): str(v) for k, v in table.items()} or dict(PACKAGE_DIR)


def _git(*args: str) -> bytes:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def prepare_baseline(rev: str, tmp: Path) -> Design:
    """Extract revision `rev` into `tmp` as an importable `tensorpulse` package; verify a process uses it.

    `git archive` rather than a worktree: nothing is registered in the repository, so a killed
    run leaves no stale worktree behind.
    """
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
    mapping = _package_dirs(_git("show", f"{sha}:pyproject.toml"))
    src, pkg = tmp / "src", tmp / "pkg"
    src.mkdir(parents=True)
    with tarfile.open(
        fileobj=io.BytesIO(_git("archive", "--format=tar", sha, *sorted(set(mapping.values()))))
    ) as tar:
        tar.extractall(src, filter="data")
    top = pkg / "tensorpulse"
    shutil.copytree(src / mapping["tensorpulse"], top)
    for name, folder in mapping.items():
        if name == "tensorpulse":
            continue
        link = pkg.joinpath(*name.split("."))
        if link.exists():
            raise SystemExit(
                f"{rev}: {link.relative_to(pkg)} exists in tensorpulse/ and is also a package-dir entry"
            )
        link.symlink_to(src / folder, target_is_directory=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pkg), os.environ.get("PYTHONPATH", "")) if p)
    imports = imported_files(env, tmp)
    roots = (src.resolve(), pkg.resolve())  # the revision's files, linked or copied
    foreign = {
        m: f for m, f in imports.items() if not any(Path(f).resolve().is_relative_to(r) for r in roots)
    }
    if foreign:
        raise SystemExit(
            f"the baseline worker would not run revision {sha[:10]}: {foreign} come from elsewhere "
            f"(PYTHONPATH={env['PYTHONPATH']})"
        )
    return Design("baseline", "tensorpulse.cli", env, imports, sha, f"git {sha[:10]} in {src}")


def prepare_current(tmp: Path) -> Design:
    """The working tree as installed; the check shows (and fails early) if it does not import."""
    env = dict(os.environ)
    imports = imported_files(env, tmp)
    return Design("current", None, env, imports, None, f"working tree {REPO}{tree_state()}")


def prepare_variant(name: str, tmp: Path) -> Design:
    """`current[:<setting>=<value>,...]`: the working tree's worker with those worker settings (as
    TENSORPULSE_<SETTING> variables); or the same with a git revision in place of `current` (that
    revision's worker, `git archive`d, so that a long run measures a fixed version while the tree
    changes). The design keeps `name`; `tmp` must not contain ":" (PYTHONPATH's separator)."""
    base, _, settings = name.partition(":")
    design = prepare_current(tmp) if base == "current" else prepare_baseline(base, tmp)
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        design.env[f"TENSORPULSE_{key.upper()}"] = value
    design.name = name
    return design


def tree_state() -> str:
    """' (HEAD <sha>[, uncommitted changes in the package's folders])', or '' without git."""
    try:
        head = _git("rev-parse", "--short=10", "HEAD").decode().strip()
        dirty = _git("status", "--porcelain", "--", *sorted(set(PACKAGE_DIR.values()))).decode().strip()
    except SystemExit:
        return ""
    return f" (HEAD {head}{', uncommitted changes in the package' if dirty else ''})"


def prepare(name: str, tmp: Path, baseline_rev: str = DEFAULT_BASELINE_REV) -> Design:
    """`prepare_baseline(baseline_rev, tmp / "baseline")` or `prepare_current(tmp)` by name."""
    if name == "baseline":
        return prepare_baseline(baseline_rev, tmp / "baseline")
    if name == "current":
        return prepare_current(tmp)
    raise ValueError(f"unknown design {name!r}: one of {', '.join(DESIGNS)}")


def print_imports(design: Design) -> None:
    print(f"{design.name}: {design.source}; a worker process imports:", flush=True)
    for module, path in design.imports.items():
        print(f"    {module:<26} {path}", flush=True)


def start_workers(
    design: Design,
    bootstrap: str,
    n: int,
    *,
    group: str,
    jobs_regex: str,
    workdir: Path,
    guarantee: str,
    rules: str | None = None,
) -> list[WorkerProc]:
    """`n` workers of `design` in one group, each with its state dir, port and log under `workdir`.

    Run from `workdir`: `python -m` puts the current directory first on sys.path, and from the
    repository root that would be the working tree's tensorpulse/, whatever PYTHONPATH says.
    """
    out = []
    for i in range(n):
        port = free_port()
        log = workdir / f"worker-{i}.log"
        cmd = design.command(
            bootstrap,
            group=group,
            state_dir=workdir / f"state-{i}",
            port=port,
            jobs_regex=jobs_regex,
            guarantee=guarantee,
            rules=None if rules is None else str(Path(rules).resolve()),
        )
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=workdir, env=design.env, start_new_session=True
            )
        out.append(WorkerProc(proc, port, log))
    return out
