"""Every rules example we ship fires only on what it claims, on the held-out corpus (tests/heldout.py).

Examples are found, not listed: every YAML block of README.md and docs/*.md with a `rules:` key,
the rules files of examples/ and deploy/, and the demo's rules. Each must have its claim in
CLAIMS (the rules that must fire and the faulty run each must catch), so a new example cannot
be shipped unmeasured. An example then raises no alert on any healthy run of the corpus, and
each claimed rule fires on its fault, through the worker's own evaluator and the real hook's
records. The README's GradNormSpike fired on every healthy run before, on bias gradients, and
its BigGradients matched no tensor a Sequential model publishes (issue 19).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

import heldout  # noqa: E402

from tensorpulse import wire  # noqa: E402
from tensorpulse.demo import DEMO_RULES  # noqa: E402
from tensorpulse.events import AlertEvent  # noqa: E402
from tensorpulse.replay import Replay  # noqa: E402
from tensorpulse.rules.config import RuleSpec, parse_rules, rules_for_job  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HEALTHY = [r.name for r in heldout.RUNS if r.expected is None]
#: Two ranks out of sync: one trains like the noisy run, the other like the oscillating one (same model).
OUT_OF_SYNC = ("noisy", "oscillating")


@dataclasses.dataclass(frozen=True)
class Claim:
    """What an example says it catches: rule instance name -> the corpus run it must fire on."""

    catches: dict[str, str]
    #: The job id the example is written for (its `jobs:` patterns are matched against it).
    job: str = "my-job"
    #: Two-rank runs: healthy runs as two ranks in step, the fault as OUT_OF_SYNC.
    ranks: int = 1


CLAIMS: dict[str, Claim] = {
    "README.md#1": Claim({"ExplodingTensor": "exploding", "VanishingGradient": "vanishing"}, job="resnet-50"),
    "README.md#2": Claim({"GradNormSpike": "exploding", "BigGradients": "exploding"}),
    "examples/rules.yaml": Claim({"GradNormSpike": "exploding", "BigGradients": "exploding"}),
    "examples/rules.toml": Claim({"GradNormSpike": "exploding", "BigGradients": "exploding"}),
    "docs/rules.md#1": Claim({"LossNotDecreasing": "stalled", "ExplodingTensor": "exploding"}),
    "docs/replay-and-report.md#1": Claim({"DeadRelu": "deadrelu"}),
    "docs/distributed.md#1": Claim({"weights-out-of-sync": "+".join(OUT_OF_SYNC)}, ranks=2),
    "deploy/rules.yaml": Claim({"ExplodingTensor": "exploding"}),
    "tensorpulse/demo.py:DEMO_RULES": Claim({"ExplodingTensor": "exploding"}),
}


def yaml_blocks(text: str) -> Iterator[str]:
    """The rules files of a Markdown text: ```yaml blocks and YAML files written by a shell
    here-document (`cat > x.yaml <<'EOF'`), with a top-level `rules:` key."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    blocks += re.findall(r"^cat > \S+\.ya?ml <<'?EOF'?\n(.*?)^EOF$", text, flags=re.MULTILINE | re.DOTALL)
    for block in blocks:
        doc = yaml.safe_load(block)
        if isinstance(doc, dict) and "rules" in doc:
            yield block


def shipped_examples() -> dict[str, tuple[str, str]]:
    """id -> (text, format) of every rules example we ship."""
    found: dict[str, tuple[str, str]] = {}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(yaml_blocks(page.read_text()), 1):
            found[f"{page.relative_to(ROOT)}#{i}"] = (block, "yaml")
    for path in ("examples/rules.yaml", "examples/rules.toml", "deploy/rules.yaml"):
        found[path] = ((ROOT / path).read_text(), "toml" if path.endswith(".toml") else "yaml")
    found["tensorpulse/demo.py:DEMO_RULES"] = (DEMO_RULES, "yaml")
    return found


EXAMPLES = shipped_examples()


def test_every_example_has_a_claim() -> None:
    """An example shipped without a claim (or a claim whose example is gone) fails here."""
    assert sorted(EXAMPLES) == sorted(CLAIMS)


def _records(name: str) -> list[wire.StepRecord]:
    schemas = wire.SchemaCache()
    return [wire.decode(p, schemas) for p in heldout.payloads(name)]


def _as_rank(records: Iterable[wire.StepRecord], job: str, rank: int) -> list[wire.StepRecord]:
    return [dataclasses.replace(r, job=job, rank=rank, world=2) for r in records]


def _evaluate(specs: list[RuleSpec], run: str, ranks: int) -> list[AlertEvent]:
    """Firing and resolved events of `specs` on corpus run `run` (for two ranks: "a+b", or a run in step)."""
    if ranks == 1:
        return heldout.evaluate(run, specs)
    first, second = run.split("+") if "+" in run else (run, run)
    job = f"heldout-{run.replace('+', '-')}"
    both = _as_rank(_records(first), job, 0) + _as_rank(_records(second), job, 1)
    replay = Replay(job, specs)
    for record in sorted(both, key=lambda r: (r.step, r.mode != "train", r.rank)):
        replay.feed_record(record)
    return replay.events


def _specs(example: str, monkeypatch: pytest.MonkeyPatch) -> list[RuleSpec]:
    """The example's rules as its claimed job gets them (PYTHONPATH=examples, as the README says)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    text, fmt = EXAMPLES[example]
    specs = rules_for_job(parse_rules(text, example, fmt), CLAIMS[example].job)  # type: ignore[arg-type]
    return [dataclasses.replace(s, jobs=None) for s in specs]  # the corpus jobs stand for that job


@pytest.mark.parametrize("example", sorted(CLAIMS))
def test_example_is_silent_on_healthy_runs(example: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No rule of the example fires on any healthy run of the corpus."""
    specs = _specs(example, monkeypatch)
    for run in HEALTHY:
        fired = heldout.firing(_evaluate(specs, run, CLAIMS[example].ranks))
        assert not fired, f"{example} on healthy run {run}: {dict(fired)}"


@pytest.mark.parametrize("example", sorted(CLAIMS))
def test_example_catches_what_it_claims(example: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rule the example claims fires on its faulty run."""
    specs = _specs(example, monkeypatch)
    claim = CLAIMS[example]
    assert set(claim.catches) <= {s.name for s in specs}, f"{example}: claims rules it does not select"
    for rule, run in claim.catches.items():
        fired = heldout.firing(_evaluate(specs, run, claim.ranks))
        assert fired[rule], f"{example}: {rule} did not fire on {run} (fired: {dict(fired)})"
