"""Real PyTorch runs with known faults, hook -> broker -> `tensorpulse stream` process -> alerts."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from tensorpulse.events import AlertEvent
from tensorpulse.producers.torch import TorchHook
from tensorpulse.topics import ALERTS_TOPIC

from .helpers import metric_value, read_topic, scrape, wait_for, worker_process
from .scenarios import SCENARIOS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fired(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Run every scenario once through one worker; scenario name -> rules that fired."""
    import uuid

    tag = uuid.uuid4().hex[:6]
    torch.set_num_threads(1)
    hooks = {sc.name: TorchHook(f"scen-{tag}-{sc.name}", kafka_bootstrap) for sc in SCENARIOS}
    tmp = tmp_path_factory.mktemp("scenarios")
    with worker_process(kafka_bootstrap, tmp, group=f"g-scen-{tag}", jobs_regex=f"^scen-{tag}-") as (_, url):
        for sc in SCENARIOS:
            with hooks[sc.name] as hook:
                sc.run(hook)
        wait_for(
            lambda: metric_value(scrape(url), "tensorpulse_jobs_finished_total") == len(SCENARIOS),
            120,
            "every scenario's end record to be evaluated",
            interval=0.5,
        )
    out: dict[str, set[str]] = defaultdict(set)
    for m in read_topic(kafka_bootstrap, ALERTS_TOPIC, timeout=2):
        ev = AlertEvent.from_json(m.value())
        if ev.job.startswith(f"scen-{tag}-") and ev.status == "firing":
            out[ev.job.rsplit("-", 1)[1]].add(ev.rule)
    return out


@pytest.mark.parametrize("scenario", [sc for sc in SCENARIOS if sc.expected], ids=lambda sc: sc.name)
def test_fault_raises_its_rule(fired: dict[str, set[str]], scenario) -> None:
    """Each injected fault fires the rule built to catch it."""
    assert scenario.expected <= fired[scenario.name], f"{scenario.name}: fired {sorted(fired[scenario.name])}"


def test_healthy_run_raises_nothing(fired: dict[str, set[str]]) -> None:
    """A healthy run with the default rule set raises no alert at all."""
    assert fired["healthy"] == set()
