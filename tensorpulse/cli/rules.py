"""The `rules` command: the rule catalogue, a rules file checked, and checked against a job's records."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import TensorpulseError
from .common import job_reader, replay_inputs, topic_options


def _narrowed_defaults(specs: list) -> list[str]:
    """A default rule replaced by an entry with a `jobs:` pattern runs for those jobs only: say so,
    since every other job silently loses it."""
    from ..rules.config import default_specs

    defaults = {d.name for d in default_specs()}
    if not defaults <= {s.name for s in specs}:
        return []  # `defaults: false`: nothing was replaced
    return [
        f"{s.name} replaces the default rule of that name: jobs not matching {s.jobs.pattern!r} no longer "
        "get it (give the entry a 'name' of its own to run it beside the default)"
        for s in specs
        if s.name in defaults and s.jobs is not None
    ]


@click.command(name="rules")
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
@click.option(
    "--against-records",
    "against_records",
    metavar="RUN",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The same check offline, against a recorded run: a file of the job's wire records back to back "
    "(what a hook whose produce_fn appends each record to a file writes); the job is the records' own.",
)
@topic_options
def rules_cmd(
    markdown: bool,
    check_file: Path | None,
    against: str | None,
    against_records: Path | None,
    bootstrap,
    topic_prefix,
) -> None:
    """List the rule catalogue: names, parameters and defaults (or check a rules file with --check).

    Rules marked [default] run when no rules file is given; a parameter shown as <required> has
    no default: a rules file that selects the rule must give it.

    \b
    Examples:
      tensorpulse rules --check rules.yaml
      tensorpulse rules --check rules.yaml --against resnet-42 --bootstrap 127.0.0.1:9092
      tensorpulse rules --check rules.yaml --against-records resnet-42.run
    """
    from ..rules import REGISTRY

    if against_records is not None:
        _check_against_records(check_file, against_records, against, topic_prefix)
        return
    if against is not None:
        _check_against(check_file, against, bootstrap, topic_prefix)
        return
    if check_file is not None:
        from ..rules.config import describe, load_rules

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
        from ..rules.reference import render

        click.echo(render(), nl=False)
        return
    from ..rules import default_rules
    from ..rules.reference import signature

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
    from ..rules.coverage import read_published

    try:
        specs, prefix = replay_inputs(rules_file, topic_prefix)
        with job_reader(bootstrap, job, prefix, f"read {job}") as reader:
            published, bad = read_published(p.value for p in reader)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    _report_misses(specs, job, published, bad, reader.topic, reader.read)


def _check_against_records(
    rules_file: Path | None, run: Path, job: str | None, topic_prefix: str | None
) -> None:
    """`rules --against-records RUN`: `--against`'s check with the records read from a file."""
    from ..rules.coverage import job_of, read_published, recorded_payloads

    try:
        specs, _ = replay_inputs(rules_file, topic_prefix)
        payloads = recorded_payloads(run)
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    job = job or job_of(payloads)
    if job is None:
        raise click.ClickException(f"{run}: no record in it decodes: no job to check the rules for")
    published, bad = read_published(payloads)
    _report_misses(specs, job, published, bad, str(run), len(payloads))


def _report_misses(specs: list, job: str, published, bad: int, source: str, read: int) -> None:
    """Print the rules `job` gets and warn for each selection that matches nothing it publishes;
    exit 1 if a rules file's own setting does."""
    from ..rules.config import describe, rules_for_job
    from ..rules.coverage import misses

    specs = rules_for_job(specs, job)
    click.echo(describe(specs))
    found = misses(specs, published)
    for m in found:
        click.echo(f"{'warning' if m.explicit else 'note'}: {m.format(job)}", err=True)
    unreadable = f", {bad} undecodable (skipped)" if bad else ""
    explicit = sum(m.explicit for m in found)
    click.echo(
        f"{source}: {read} record(s), {len(published.tensors)} tensor(s), "
        f"{len(published.scalars)} scalar(s){unreadable}; {len(specs)} rule(s) for {job}, "
        f"{explicit} with a selection of the rules file that matches nothing",
        err=True,
    )
    if explicit:
        raise click.exceptions.Exit(1)
