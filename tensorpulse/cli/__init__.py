"""The `tensorpulse` command: broker, stream workers, alerts, the demo and the rule catalogue.

This module is the command group (`main`, the console script); each command lives in a module of
this package by what it serves: `broker_demo` (broker, demo), `stream` (stream, hook-config),
`alerts` (alerts, notify), `rules`, `replay` (replay, report), `top` and `acls`. What they share
(option help texts and decorators, logging, exit statuses) is in `common`.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import click

from .. import __version__
from .common import EXIT_CLOSED_PIPE, setup_logging


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
    setup_logging("WARNING")  # `stream` and `notify` raise it to their --log-level


def _add_commands() -> None:
    """Put every command on `main`: the modules define them apart, so that none imports another."""
    from . import acls, alerts, broker_demo, replay, rules, stream, top

    for command in (
        broker_demo.broker,
        broker_demo.demo,
        stream.stream,
        stream.hook_config,
        alerts.alerts,
        alerts.notify,
        rules.rules_cmd,
        replay.replay_cmd,
        replay.report_cmd,
        top.top_cmd,
        acls.acls_cmd,
    ):
        main.add_command(command)


_add_commands()
