"""The generated rule reference is current, and the docs' examples parse."""

from __future__ import annotations

from pathlib import Path

import yaml

from tensorpulse.rules.config import parse_rules
from tensorpulse.rules.reference import render

ROOT = Path(__file__).resolve().parents[2]


def test_rule_reference_is_current() -> None:
    """docs/rules.md equals what the registry generates (regenerate: tensorpulse rules --markdown)."""
    assert (ROOT / "docs" / "rules.md").read_text() == render()


def test_readme_rules_example_is_valid() -> None:
    """The rules file shown in the README loads without error."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block)["defaults"] is True
    specs = parse_rules(block, "README.md")
    assert any(s.name == "ExplodingTensor" and s.action == "stop" for s in specs)
