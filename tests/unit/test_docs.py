"""The generated rule reference is current, and the docs' examples parse."""

from __future__ import annotations

import re
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


#: The sections of docs/architecture.md that say where the code is; what they name is checked.
MAP_SECTIONS = ("The map", "Where a change goes")
_SPAN = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"^[\w.-]*/[\w./-]*$|^[\w.-]+\.(?:py|md|toml|yaml|yml|json)$")
_NAME = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def test_architecture_map_names_what_exists() -> None:
    """Every path in docs/architecture.md's map exists, and every name in backticks on a line that
    names files occurs as a word in one of them, so the map cannot go stale silently."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    sections = [s for s in re.split(r"^## ", text, flags=re.M) if s.split("\n", 1)[0] in MAP_SECTIONS]
    assert len(sections) == len(MAP_SECTIONS), f"docs/architecture.md lacks a section of {MAP_SECTIONS}"
    missing: list[str] = []
    unknown: list[str] = []
    paths = 0
    for line in "\n".join(sections).splitlines():
        spans = _SPAN.findall(line)
        named = [t for s in spans for t in s.split() if _PATH.match(t)]
        paths += len(named)
        missing += [p for p in named if not (ROOT / p).exists()]
        files = [ROOT / p for p in named if (ROOT / p).is_file()]
        if not files:
            continue
        source = "\n".join(f.read_text() for f in files)
        for name in (s for s in spans if _NAME.match(s) and not _PATH.match(s)):
            if not all(re.search(rf"\b{re.escape(part)}\b", source) for part in name.split(".")):
                unknown.append(f"{name} (line: {line[:60]}...)")
    assert paths > 50 and missing == [] and unknown == [], (missing, unknown)
