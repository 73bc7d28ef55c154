"""`tensorpulse demo`: the whole pipeline on one machine, with nothing but the package installed.

Embedded broker -> a `tensorpulse stream` worker (a separate process, as in production) -> a
PyTorch training loop with a TorchHook and an injected fault -> alerts printed as they arrive,
the stop action honoured by the loop, and a summary at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .broker import EmbeddedBroker, free_port
from .errors import ConfigError, TensorpulseError
from .events import AlertEvent
from .rules.causes import CauseGroups, Placement, grouped_lines
from .stream.process import worker_command

DEMO_RULES = """\
# The default rule set, plus: ExplodingTensor asks the job to stop.
defaults: true
rules:
  - rule: ExplodingTensor
    severity: critical
    action: stop
"""


def _say(msg: str) -> None:
    print(msg, flush=True)


#: What the demo prints before an alert event's first line (tests count it: one per event).
ALERT_MARK = "  ALERT  "


def alert_lines(ev: AlertEvent, placement: Placement) -> list[str]:
    """The demo's lines for one alert event, grouped under its root cause as `tensorpulse alerts`
    prints them (rules/causes.py): a follow-on indented and marked "(follows <root>)", a root
    followed by the follow-ons it explains that fired before it."""
    first, *rest = grouped_lines(ev, placement)
    return [ALERT_MARK + first] + [" " * len(ALERT_MARK) + line for line in rest]


def root_causes(alerts: list[AlertEvent]) -> dict[str, list[str]]:
    """Root cause -> the rules that fired as its follow-ons, over a run's events in arrival order:
    the summary's one line per cause (a follow-on that fired before its root counts under it)."""
    groups = CauseGroups()
    causes: dict[str, list[str]] = {}
    for ev in alerts:
        placement = groups.place(ev)
        if ev.status != "firing":
            continue
        if placement.follows is not None:
            root, rules = placement.follows, [ev.rule]
        else:
            root, rules = ev.rule, []
            for explained in placement.explains:
                rules += [explained, *causes.pop(explained, [])]
        listed = causes.setdefault(root, [])
        for rule in rules:
            if rule not in listed and rule != root:
                listed.append(rule)
    return causes


def _build_model(fault: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if fault == "vanishing":
        layers: list[nn.Module] = [nn.Linear(32, 64), nn.Sigmoid()]
        for _ in range(14):
            layers += [nn.Linear(64, 64), nn.Sigmoid()]
        layers.append(nn.Linear(64, 4))
        return nn.Sequential(*layers)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))


def _data():
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32, generator=g)
    w = torch.randn(32, 4, generator=g)
    y = (x @ w + 0.3 * torch.randn(4096, 4, generator=g)).argmax(dim=1)
    return x, y


def _inject(fault: str, model, opt) -> str:
    import torch

    if fault == "exploding":
        for group in opt.param_groups:
            group["lr"] *= 2000.0
        return "learning rate raised 2000x"
    if fault == "dead-relu":
        with torch.no_grad():
            model[0].bias.fill_(-50.0)
            model[2].bias.fill_(-50.0)
        return "ReLU biases pushed to -50 (units die)"
    return "none"


def train(
    hook: Any,
    fault: str,
    steps: int,
    *,
    keep_going: bool = False,
    should_stop: Callable[[], bool] | None = None,
    pace_s: float = 0.01,
    say: Callable[[str], None] = _say,
) -> int | None:
    """The demo's training loop: an MLP on a synthetic task, `fault` injected at 40 % of `steps`.

    Returns the step where the loop stopped because tensorpulse asked (None when it ran to the
    end). `should_stop` defaults to the hook's control-topic flag; docs/build_images.py trains
    this same run with a hook whose records go to a list and stops on the replayed alert, so that
    the pictures in docs/img are of the run the demo shows. `pace_s` sleeps after each step (a
    real step takes longer; the live demo keeps pace visibly).
    """
    import torch

    stop = should_stop if should_stop is not None else (lambda: bool(hook.should_stop))
    model = _build_model(fault)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if fault != "vanishing" else 0.5)
    loss_fn = torch.nn.CrossEntropyLoss()
    hook.attach(model, opt)
    fault_step = int(steps * 0.4)
    for step in range(steps):
        if step == fault_step and fault != "none":
            say(f"  step {step:4d}  injecting fault: {_inject(fault, model, opt)}")
        idx = torch.randint(0, x.shape[0], (64,))
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        hook.step(step, loss=loss)
        if step % 50 == 0 or step == steps - 1:
            say(f"  step {step:4d}  loss {loss.item():10.4g}")
        if stop() and not keep_going:
            say(
                f"  step {step:4d}  tensorpulse asked this job to stop; stopping (checkpoint here in real code)"
            )
            return step
        if pace_s:
            time.sleep(pace_s)
    return None


def _wait_for_metrics(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TensorpulseError(f"the stream worker exited with code {proc.returncode} at start")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as r:
                body = r.read().decode()
            if "tensorpulse_jobs 1.0" in body:
                return
        time.sleep(0.2)


def _watch_follow(
    bootstrap: str, group: str, topic: str, stop: threading.Event, patience: float = 20.0
) -> None:
    """Say whether the reused worker group reads the demo's job (a --jobs filter could leave it out)."""
    from .stream.running import reads_topic

    deadline = time.monotonic() + patience
    while not stop.wait(0.5):
        if reads_topic(bootstrap, group, topic):
            _say(f"  worker    group '{group}' reads this job")
            return
        if time.monotonic() > deadline:
            _say(
                f"  WARNING   worker group '{group}' has not read this job's records after {patience:.0f} s "
                "(a --jobs filter?): no alert will come; rerun with --own-worker"
            )
            return


def run_demo(
    *,
    steps: int = 400,
    fault: str = "exploding",
    bootstrap: str | None = None,
    keep_going: bool = False,
    own_worker: bool = False,
) -> int:
    """Run the demo; returns its exit status. With `bootstrap`, a worker group already running on
    that cluster is reused (a second group would publish every alert again) unless `own_worker`:
    then the demo's worker runs under a group and topic prefix of its own, which no running worker
    follows, so that each alert still arrives once."""
    try:
        import torch
    except ImportError as exc:
        raise ConfigError("the demo trains a PyTorch model: pip install 'tensorpulse[demo]'") from exc
    from .producers.torch import TorchHook
    from .sinks.alerts import read_alerts
    from .stream.running import running_groups
    from .topics import DEFAULT_PREFIX, reductions_topic

    torch.set_num_threads(1)
    tag = uuid.uuid4().hex[:6]
    job = f"demo-{fault}-{tag}"
    workdir = Path(tempfile.mkdtemp(prefix="tensorpulse-demo-"))
    broker = None
    worker = None
    reused: str | None = None  # the running worker group the demo uses instead of its own
    prefix = DEFAULT_PREFIX
    stop_reading = threading.Event()
    alerts: list[AlertEvent] = []
    received: dict[str, float] = {}  # alert id -> time this process received it
    t_start = time.monotonic()
    try:
        _say("tensorpulse demo")
        if bootstrap is None:
            broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
            bootstrap = broker.bootstrap
            _say(f"  broker    embedded Tansu at {bootstrap} (in-memory)")
        else:
            _say(f"  broker    {bootstrap}")
            running = running_groups(bootstrap)
            names = ", ".join(f"'{g.group}' ({g.workers} worker(s))" for g in running)
            if running and own_worker:
                prefix = f"tensorpulse-demo-{tag}."
                _say(
                    f"  worker    {names} already running here; as asked (--own-worker), this demo starts "
                    f"its own under group 'tensorpulse-{job}' and topic prefix '{prefix}', which they do "
                    "not follow: each alert arrives once"
                )
            elif running:
                reused = running[0].group
                _say(
                    f"  worker    reusing the worker group {names.split(', ')[0]} already running on this "
                    "cluster: its rules apply, no second worker (each alert arrives once); --own-worker "
                    "starts the demo's own instead"
                )
                if len(running) > 1:
                    _say(
                        f"  note      {len(running)} worker groups run here ({names}): each publishes every alert"
                    )
        metrics_url = None
        hook = TorchHook(job, bootstrap, save_interval=1, topic_prefix=prefix)  # creates the job's topic
        if reused is None:
            rules = workdir / "rules.yaml"
            rules.write_text(DEMO_RULES)
            metrics_port = free_port()
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            log = open(workdir / "worker.log", "wb")  # noqa: SIM115
            worker = subprocess.Popen(
                worker_command(
                    bootstrap,
                    group=f"tensorpulse-{job}",
                    state_dir=workdir / "state",
                    metrics_port=metrics_port,
                    rules=rules,
                    jobs_regex=f"^{job}$",
                    topic_prefix=None if prefix == DEFAULT_PREFIX else prefix,
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            _say(f"  worker    pid {worker.pid}, group 'tensorpulse-{job}', metrics at {metrics_url}")
            _wait_for_metrics(metrics_url, worker, 30)
        _say(f"  job       {job}: MLP, SGD, {steps} steps, fault '{fault}' at step {int(steps * 0.4)}")
        _say("")

        def reader() -> None:
            groups = CauseGroups()
            for ev in read_alerts(bootstrap, job=job, follow=True, stop=stop_reading, from_beginning=False):
                received[ev.id] = time.time()
                alerts.append(ev)
                _say("\n".join(alert_lines(ev, groups.place(ev))))

        t = threading.Thread(target=reader, name="alerts", daemon=True)
        t.start()
        if reused is not None:
            threading.Thread(
                target=_watch_follow,
                args=(bootstrap, reused, reductions_topic(job, prefix), stop_reading),
                name="follow",
                daemon=True,
            ).start()

        stopped_at = train(hook, fault, steps, keep_going=keep_going)
        hook.close()
        hstats = hook.stats()
        # Give the worker a moment to evaluate the last steps.
        deadline = time.monotonic() + (20 if fault != "none" else 5)
        while time.monotonic() < deadline:
            if fault != "none" and alerts and time.monotonic() > deadline - 15:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        stop_reading.set()
        t.join(5)
        return _summary(
            job, fault, steps, stopped_at, hstats, alerts, received, metrics_url, time.monotonic() - t_start
        )
    finally:
        stop_reading.set()
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        if broker is not None:
            broker.stop()


def _summary(job, fault, steps, stopped_at, hstats, alerts, received, metrics_url, elapsed) -> int:
    firing = [a for a in alerts if a.status == "firing"]
    latencies = sorted(received[a.id] - a.publish_ts for a in firing if a.publish_ts and a.id in received)
    _say("")
    _say("summary")
    _say(f"  job               {job}")
    _say(
        f"  steps trained     {stopped_at + 1 if stopped_at is not None else steps}"
        + (f" (stopped by tensorpulse at step {stopped_at})" if stopped_at is not None else "")
    )
    _say(
        f"  records published {hstats.get('sent', hstats.get('published', '?'))}, dropped {hstats.get('dropped', 0)}"
    )
    by_rule = Counter(a.rule for a in firing)
    _say(
        f"  alerts fired      {len(firing)}"
        + (f" ({', '.join(f'{r} x{n}' for r, n in by_rule.items())})" if by_rule else "")
    )
    causes = root_causes(alerts)
    if causes:
        _say(
            "  root causes       "
            + "; ".join(
                f"{root}" + (f" (with {', '.join(rules)})" if rules else "") for root, rules in causes.items()
            )
        )
    if latencies:
        _say(
            f"  step->alert       {latencies[0] * 1000:.0f} ms fastest, {latencies[-1] * 1000:.0f} ms slowest"
            " (the hook created the record -> this demo read the alert)"
        )
    if metrics_url is not None:
        _say(f"  metrics           {metrics_url} (while the worker ran)")
    else:
        _say("  metrics           on the running worker group's /metrics")
    _say(f"  wall time         {elapsed:.1f} s")
    if fault == "none":
        ok = not firing
        _say(
            "  result            "
            + ("healthy run, no alert (as expected)" if ok else "UNEXPECTED alerts on a healthy run")
        )
    else:
        ok = bool(firing)
        _say(
            "  result            " + ("the fault was caught" if ok else "NO ALERT: the fault was not caught")
        )
    return 0 if ok else 1
