"""The weight-update rules give the same verdicts on the recorded scenarios whether the hook sketches
its weight deltas (the default) or keeps an exact copy: same steps, same firing/resolved findings, and
the weight-update fault (a learning-rate jump) is still caught."""

from __future__ import annotations

import pytest

from tensorpulse import wire
from tensorpulse.rules.config import load_rules, rules_for_job
from tensorpulse.rules.testing import replay

torch = pytest.importorskip("torch")

from integration import scenarios  # noqa: E402

from tensorpulse.producers.torch import TorchHook  # noqa: E402

#: Scenarios whose weights move in telling ways: healthy, frozen (lr 0), a frozen layer, a learning
#: rate jump, an explosion, a learning rate decayed to zero.
NAMES = ("healthy", "frozenlr", "frozenlayer", "lrjump", "exploding", "earlystop")


def _records(scenario: scenarios.Scenario, method: str) -> list[wire.StepRecord]:
    payloads: list[bytes] = []
    hook = TorchHook(
        f"verdicts-{scenario.name}",
        produce_fn=lambda topic, value, key: payloads.append(value),
        delta_method=method,
        delta_every=1,  # a delta at every saved step: the most verdicts to compare
    )
    torch.set_num_threads(1)
    scenario.run(hook)
    hook.close(5)
    cache = wire.SchemaCache()
    return [wire.decode(p, cache) for p in payloads]


def _verdicts(name: str, records: list[wire.StepRecord]) -> dict[str, list[tuple[int, bool]]]:
    """(step, firing) of every rule the scenario worker runs for this scenario (its rules file)."""
    out: dict[str, list[tuple[int, bool]]] = {}
    for spec in rules_for_job(load_rules(scenarios.RULES_FILE), f"scen-verdicts-{name}"):
        _, findings = replay(spec.rule, records)
        out[spec.name] = [(step, f.firing) for step, f in findings]
    assert "WeightUpdateRatio" in out and "UnchangedTensor" in out
    return out


@pytest.mark.parametrize("name", NAMES)
def test_sketched_deltas_give_the_exact_copys_verdicts(name: str) -> None:
    """Every rule's (step, fired) sequence is the same with sketched and with exact weight deltas."""
    scenario = next(sc for sc in scenarios.SCENARIOS if sc.name == name)
    exact = _records(scenario, "exact")
    sketched = _records(scenario, "sketch")
    assert any(t.delta is not None and t.delta.exact for r in exact for t in r.tensors)
    assert any(t.delta is not None and not t.delta.exact for r in sketched for t in r.tensors)
    want, got = _verdicts(name, exact), _verdicts(name, sketched)
    assert got == want
    fired = {rule for rule, seq in got.items() if any(f for _, f in seq)}
    assert scenario.expected & {"WeightUpdateRatio"} <= fired  # lrjump's fault is still caught
