"""What the `tensorpulse` commands share: option help texts and decorators, logging, exit statuses.

Kept apart from the command modules so that each of them imports it without importing the others.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import TensorpulseError

if TYPE_CHECKING:
    from ..replay import JobReader
    from ..rules.base import Regex

BOOTSTRAP_HELP = (
    "Kafka bootstrap servers, host:port[,host:port] (env TENSORPULSE_BOOTSTRAP; default 127.0.0.1:9092)."
)
PREFIX_HELP = "Topic prefix (env TENSORPULSE_TOPIC_PREFIX; default 'tensorpulse.')."

JOB_SELECTOR_HELP = (
    "Only jobs whose id matches this regular expression, searched in the id (re.search, as the "
    "worker's --jobs and a rules file's jobs:); '^ID$' for exactly one job."
)

#: Exit status when the reader of our output closed it early (`tensorpulse alerts | head`):
#: 128 + SIGPIPE, what a shell reports for a program that SIGPIPE ended.
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE

F = TypeVar("F", bound=Callable[..., Any])

#: `--bootstrap` as every command that reads or writes Kafka takes it.
bootstrap_option = click.option("--bootstrap", help=BOOTSTRAP_HELP)
#: `--prefix` as the commands that read a job's topics take it (`stream` has its own help).
prefix_option = click.option("--prefix", "topic_prefix", help=PREFIX_HELP)
#: `--job REGEX`: which jobs a reading command shows.
job_option = click.option("--job", metavar="REGEX", help=JOB_SELECTOR_HELP)
#: `--rules` as `replay` and `report` take it (`stream` and `rules --check` word it for their use).
rules_option = click.option(
    "--rules",
    "rules_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Rules file (YAML) as for `tensorpulse stream` (env TENSORPULSE_RULES); default: the default rules.",
)


def topic_options(f: F) -> F:
    """`--bootstrap` then `--prefix`: where the commands that read a job's records find them."""
    return bootstrap_option(prefix_option(f))


_LOGGING: dict[str, logging.Handler] = {}  # the stderr handler this command line installed, if any


def setup_logging(level: str) -> None:
    """Log records to stderr, formatted, from `level` up: librdkafka's lines come this way too
    (tensorpulse.kafka). A program that configured logging before us (a test runner) keeps its own."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        _LOGGING["handler"] = root.handlers[0]
    if "handler" in _LOGGING:
        root.setLevel(getattr(logging, level.upper(), logging.INFO))


def parse_job_selector(job: str | None) -> Regex | None:
    """The `--job` regex compiled as the readers use it; a bad one is the option's error, not a traceback."""
    from ..sinks.alerts import job_selector

    try:
        return job_selector(job)
    except TensorpulseError as exc:
        raise click.BadParameter(str(exc), param_hint="--job") from exc


def replay_inputs(rules_file: Path | None, topic_prefix: str | None) -> tuple[list, str]:
    """The rule specs and topic prefix a replay uses: flags, then the worker's environment, then defaults."""
    from ..rules.config import load_rules

    if rules_file is None and os.environ.get(_env("rules_file")):
        rules_file = Path(os.environ[_env("rules_file")])
    return load_rules(rules_file), topic_prefix_or_default(topic_prefix)


def topic_prefix_or_default(topic_prefix: str | None) -> str:
    """The `--prefix` given, else the worker's TENSORPULSE_TOPIC_PREFIX, else the default prefix."""
    from ..topics import DEFAULT_PREFIX

    return topic_prefix or os.environ.get(_env("topic_prefix")) or DEFAULT_PREFIX


def _env(setting: str) -> str:
    """The environment variable of a worker setting (the names live in one place: stream.settings)."""
    from ..stream.settings import ENV

    return ENV[setting]


@contextmanager
def job_reader(bootstrap: str | None, job: str, prefix: str, label: str) -> Iterator[JobReader]:
    """A reader of `job`'s retained records (`replay`, `report`, `rules --against`), its progress
    shown under `label` (a bar on a terminal) until the block ends, however it ends."""
    from ..replay import JobReader, Progress

    progress = Progress(label)
    try:
        yield JobReader(bootstrap, job, prefix=prefix, progress=progress)
    finally:
        progress.close()
