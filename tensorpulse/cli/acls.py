"""The `acls` command: the Kafka ACLs of the workers and of training jobs, printed or applied."""

from __future__ import annotations

import click

from ..errors import TensorpulseError


@click.command(name="acls")
@click.option("--job", "jobs", multiple=True, help="A training job's id (repeatable): its producer's ACLs.")
@click.option("--producer-principal", help="The jobs' principal, e.g. User:team-a (default: User:job-<job>).")
@click.option("--worker-principal", help="The workers' principal (default: User:tensorpulse-worker).")
@click.option("--no-worker", is_flag=True, help="Only the jobs' ACLs (the workers' are in place already).")
@click.option("--group", help="The workers' consumer group (default: the worker's default group).")
@click.option("--topic-prefix", help="The topic prefix of the workers and jobs (default: tensorpulse.).")
@click.option(
    "--apply", "apply_", is_flag=True, help="Create them through the Admin API instead of printing."
)
@click.option("--bootstrap", help="Kafka bootstrap servers (default: $TENSORPULSE_BOOTSTRAP).")
@click.option(
    "--command-config",
    default="admin.properties",
    show_default=True,
    help="Admin client file in printed lines.",
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
    from .. import acls
    from ..kafka import resolve_bootstrap

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
            click.echo(
                f"applied {n} ACL bindings ({len(chosen)} rules) on {resolve_bootstrap(bootstrap)}", err=True
            )
        else:
            for line in acls.kafka_acls_lines(chosen, resolve_bootstrap(bootstrap), command_config or None):
                click.echo(line)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
