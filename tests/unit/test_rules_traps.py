"""Traps of the rule catalogue and rules files: each is refused or said out loud, never silent."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tensorpulse.cli import main
from tensorpulse.errors import ConfigError
from tensorpulse.rules import REGISTRY, default_rules
from tensorpulse.rules.config import parse_rules


def test_rules_lists_required_parameters_and_marks_the_default_set() -> None:
    """`tensorpulse rules`: no PydanticUndefined; required parameters as <required>; [default] on the default set only."""
    result = CliRunner().invoke(main, ["rules"])
    assert result.exit_code == 0
    assert "PydanticUndefined" not in result.output
    heads = {line.split("(", 1)[0]: line for line in result.output.splitlines() if not line.startswith(" ")}
    assert set(REGISTRY) <= set(heads)
    assert "op=<required>" in heads["Threshold"] and "value=<required>" in heads["Threshold"]
    assert "other_trials=<required>" in heads["SimilarAcrossRuns"]
    marked = {name for name in REGISTRY if heads[name].endswith("[default]")}
    assert marked == {rule.name for rule in default_rules()}


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ('defaults: true\njobs: "^resnet-"\nrules:\n  - rule: ExplodingTensor\n', "rules.yaml"),
        ('jobs = "^resnet-"\n[[rules]]\nrule = "ExplodingTensor"\n', "rules.toml"),
    ],
)
def test_a_top_level_jobs_key_is_refused_with_where_it_belongs(text: str, source: str) -> None:
    """A `jobs:` beside `rules:` would select no rule's jobs: refused, naming the line and where `jobs` goes."""
    with pytest.raises(ConfigError) as info:
        parse_rules(text, source)
    message = str(info.value)
    assert f"{source}: line" in message and "unknown key 'jobs'" in message
    assert "belongs to an entry of 'rules:'" in message and "tensorpulse stream --jobs" in message


def test_any_unknown_top_level_key_is_refused() -> None:
    """A typo at the top (`default:`) is an error too, not an ignored key."""
    with pytest.raises(
        ConfigError, match=r"line 1: default: unknown key 'default' \(allowed: defaults, rules\)"
    ):
        parse_rules("default: false\nrules: []\n", "rules.yaml")


def test_check_says_when_an_entry_narrows_a_default_rule(tmp_path: Path) -> None:
    """`rules --check`: an entry named like a default rule, with `jobs:`, takes that rule from every other job."""
    path = tmp_path / "rules.yaml"
    path.write_text('rules:\n  - rule: VanishingGradient\n    jobs: "^resnet-"\n')
    result = CliRunner().invoke(main, ["rules", "--check", str(path)])
    assert result.exit_code == 0
    assert "note: VanishingGradient replaces the default rule" in result.output
    assert "'^resnet-' no longer get it" in result.output
    path.write_text('rules:\n  - rule: VanishingGradient\n    name: vg-resnet\n    jobs: "^resnet-"\n')
    assert "note:" not in CliRunner().invoke(main, ["rules", "--check", str(path)]).output
