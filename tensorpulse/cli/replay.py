"""The commands that read a job's retained records back: `replay` (back-test rules) and `report` (plots)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import TensorpulseError
from .common import job_reader, replay_inputs, rules_option, topic_options


@click.command(name="replay")
@click.option("--job", required=True, help="The job id whose retained records to replay.")
@rules_option
@topic_options
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
    from ..replay import format_event, format_summary
    from ..replay import replay as run_replay

    try:
        specs, prefix = replay_inputs(rules_file, topic_prefix)
        with job_reader(bootstrap, job, prefix, f"replay {job}") as reader:
            if not as_json:
                click.echo(f"replay  {reader.topic} at {reader.bootstrap}")
            result = run_replay(reader, job, specs, from_step=from_step)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
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


@click.command(name="report")
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
@rules_option
@topic_options
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
    from ..kafka import resolve_bootstrap
    from ..report import collect_job, write_report
    from ..topics import reductions_topic

    data = []
    try:
        specs, prefix = replay_inputs(rules_file, topic_prefix)
        for job in jobs:
            click.echo(
                f"report: reading {reductions_topic(job, prefix)} at {resolve_bootstrap(bootstrap)}", err=True
            )
            with job_reader(bootstrap, job, prefix, f"report {job}") as reader:
                data.append(collect_job(reader, job, specs, rank=rank, tensors=tensors_regex))
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
