"""The worker's commands: `stream` runs a stream worker; `hook-config` shows a training job's hook settings."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import TensorpulseError
from .common import bootstrap_option, setup_logging


@click.command()
@bootstrap_option
@click.option(
    "--rules",
    "rules_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Rules file (YAML, or TOML for .toml) selecting rules and parameters; default: the built-in default rule set.",
)
@click.option(
    "--metrics-port", type=int, help="Serve Prometheus /metrics on this port (default 9464; -1 disables)."
)
@click.option("--metrics-addr", help="Address for /metrics (default 127.0.0.1; 0.0.0.0 to expose it).")
@click.option(
    "--group", help="Consumer group; workers in one group share the jobs (default tensorpulse-workers)."
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Local state directory (RocksDB; rebuilt from changelog topics when lost). Default: "
    "$XDG_STATE_HOME/tensorpulse, else ~/.local/state/tensorpulse.",
)
@click.option("--prefix", "topic_prefix", help="Topic prefix (default 'tensorpulse.').")
@click.option("--jobs", "jobs_regex", help="Only follow jobs whose id matches this regex.")
@click.option(
    "--guarantee",
    type=click.Choice(["exactly-once", "at-least-once"]),
    help="Processing guarantee (default exactly-once: no duplicate alerts after a crash).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Settings file, YAML (TOML for .toml), keys as the flags with _ (group, rules_file, "
    "metrics_port, state_dir, ...); default $TENSORPULSE_WORKER_CONFIG. Flags and TENSORPULSE_* "
    "variables win over it.",
)
@click.option(
    "--worker-id",
    help="Stable identity of this worker across restarts (e.g. the pod name); "
    "default: host name + state directory.",
)
@click.option(
    "--replication-factor",
    type=int,
    help="Replication of the topics the worker creates (default 1; 3 on a production cluster, which "
    "also sets min.insync.replicas=2 on them).",
)
@click.option(
    "--partitions",
    type=int,
    help="Partitions of the group's steps topic: the most workers that can share the processing "
    "(default 12; fixed once the topic exists).",
)
@click.option(
    "--show-config",
    is_flag=True,
    help="Print the effective settings, each with where it came from, and the Kafka client config "
    "(secrets as ***), then exit.",
)
@click.option("--log-level", default="INFO", show_default=True)
def stream(
    bootstrap,
    rules_file,
    metrics_port,
    metrics_addr,
    group,
    state_dir,
    topic_prefix,
    jobs_regex,
    guarantee,
    config_file,
    worker_id,
    replication_factor,
    partitions,
    show_config,
    log_level,
) -> None:
    """Run a stream worker: evaluate rules on every job's records, publish alerts and metrics.

    \b
    The worker follows every topic named <prefix>reductions.<job> from the job's first record
    (it lists topics every 0.1 s and copies new jobs' records into the group's steps topic, so a
    new job pauses no other), keeps per-job rule state in RocksDB backed by changelog topics (a
    restart resumes where it stopped), and publishes:
      - alert events (JSON) on tensorpulse.alerts, once when a rule fires and once when it resolves;
      - rejected records on tensorpulse.deadletter, with the reason;
      - actions (stop, checkpoint) on <prefix>control.<job>;
      - Prometheus metrics on /metrics.
    Run more workers with the same --group to scale out.

    \b
    Example:
      tensorpulse stream --bootstrap kafka:9092 --rules rules.yaml --metrics-port 9464
    """
    setup_logging(log_level)
    from ..stream.settings import WorkerSettings
    from ..stream.worker import Worker

    flags = dict(
        bootstrap=bootstrap,
        rules_file=rules_file,
        metrics_port=metrics_port,
        metrics_addr=metrics_addr,
        group=group,
        state_dir=state_dir,
        topic_prefix=topic_prefix,
        jobs_regex=jobs_regex,
        guarantee=guarantee,
        worker_id=worker_id,
        replication_factor=replication_factor,
        partitions=partitions,
    )
    try:
        settings = WorkerSettings.from_env(config_file=config_file, **flags)
        if show_config:
            click.echo(settings.show(), nl=False)
            return
        worker = Worker(settings)
    except (TensorpulseError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if settings.metrics_port is not None and settings.metrics_port >= 0:
        worker.metrics.serve(settings.metrics_port, settings.metrics_addr)
        click.echo(f"metrics: http://{settings.metrics_addr}:{settings.metrics_port}/metrics", err=True)
    click.echo(f"rules: {', '.join(s.name for s in worker.specs)}", err=True)
    click.echo(f"state: {settings.state_dir} ({settings.origins['state_dir']})", err=True)
    worker.run()


@click.command(name="hook-config")
def hook_config() -> None:
    """Print the settings a hook created here would use, each with where it came from.

    \b
    A hook's arguments in code win; a setting not given there comes from TENSORPULSE_<NAME>
    (TENSORPULSE_JOB, TENSORPULSE_BOOTSTRAP, TENSORPULSE_SAVE_INTERVAL, TENSORPULSE_ENABLED=0, ...),
    then from the settings file $TENSORPULSE_CONFIG (YAML, or TOML for .toml), then the default.
    Secrets are shown as ***. Every variable tensorpulse reads: docs/configuration.md.
    """
    from ..producers.settings import HookSettings

    try:
        settings = HookSettings.resolve()
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(settings.show(), nl=False)
