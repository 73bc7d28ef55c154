"""The `top` command: a live view of the training jobs (its state, feed and screen are modules of their own)."""

from __future__ import annotations

import click

from ..errors import TensorpulseError
from .common import bootstrap_option, job_option, parse_job_selector, prefix_option, topic_prefix_or_default


@click.command(name="top")
@bootstrap_option
@job_option
@click.option(
    "--metrics-url",
    "metrics_urls",
    multiple=True,
    metavar="URL",
    help="A worker's /metrics, e.g. http://worker-1:9464/metrics (repeat for each worker): fills LAG.",
)
@prefix_option
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
def top_cmd(
    bootstrap, job, metrics_urls, topic_prefix, since, steps, refresh, once, layers, as_json, timeout
):
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
        from .. import top_screen
    except ImportError as exc:
        raise click.ClickException(
            f"tensorpulse top draws with rich: pip install 'tensorpulse[top]' ({exc})"
        ) from exc
    from ..kafka import resolve_bootstrap
    from ..sinks.forwarder import parse_duration
    from ..top import TopState
    from ..top_feed import TopFeed

    if (layers or as_json) and not once:
        raise click.UsageError("--layers and --json go with --once")
    jobs = parse_job_selector(job)
    try:
        window = parse_duration(since)
    except TensorpulseError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    if window is None:
        raise click.BadParameter(
            "give a duration ('all' would read every record ever kept)", param_hint="--since"
        )
    prefix = topic_prefix_or_default(topic_prefix)
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
                feed,
                metrics_urls=metrics_urls,
                header=header,
                notes=notes,
                as_json=as_json,
                layers=layers,
                timeout=timeout,
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
