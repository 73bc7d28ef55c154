"""The commands that read alert events: `alerts` prints them, `notify` forwards them."""

from __future__ import annotations

import json
import signal
import threading

import click

from ..errors import TensorpulseError
from .common import JOB_SELECTOR_HELP, bootstrap_option, job_option, parse_job_selector, setup_logging


@click.command()
@bootstrap_option
@job_option
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
    from ..kafka import resolve_bootstrap
    from ..rules.causes import CauseGroups, grouped_lines
    from ..sinks.alerts import read_alerts
    from ..topics import ALERTS_TOPIC

    jobs = parse_job_selector(job)
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


@click.command()
@bootstrap_option
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
    setup_logging(log_level)
    from ..sinks.forwarder import ForwarderSettings, build_forwarder, parse_duration
    from ..sinks.http import RetryPolicy

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
