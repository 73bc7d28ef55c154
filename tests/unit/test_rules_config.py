"""Rules files: defaults, replacement, job regexes, and errors that name file, entry and line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import DeadRelu, VanishingGradient, default_rules
from tensorpulse.rules.config import RuleSpec, default_specs, load_rules, parse_rules, rules_for_job

EXAMPLE = """\
# rules.yaml
defaults: true          # include the default rule set (default true)
rules:
  - rule: VanishingGradient        # catalogue name
    name: vanishing-1e-6           # optional instance name (default: the rule name); unique
    jobs: "^resnet-.*"             # optional regex on the job id (default: every job)
    severity: critical             # optional: info|warning|critical
    action: stop                   # optional: none|stop|checkpoint
    params: {threshold: 1.0e-6}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


DEFAULTS = [r.name for r in default_rules()]


def test_none_gives_defaults() -> None:
    """load_rules(None) is the default set: one spec per rule, every job, rule severity, no action."""
    specs = load_rules(None)
    assert [s.name for s in specs] == DEFAULTS
    assert all(s.jobs is None and s.action == "none" for s in specs)
    assert {s.name: s.severity for s in specs}["ExplodingTensor"] == "critical"
    assert [s.name for s in default_specs()] == [s.name for s in specs]


def test_example_file(tmp_path: Path) -> None:
    """The documented example adds one instance next to the defaults."""
    specs = load_rules(write(tmp_path, EXAMPLE))
    assert len(specs) == len(DEFAULTS) + 1
    spec = specs[-1]
    assert isinstance(spec, RuleSpec)
    assert spec.name == "vanishing-1e-6"
    assert isinstance(spec.rule, VanishingGradient) and spec.rule.params.threshold == 1e-6
    assert spec.jobs is not None and spec.jobs.pattern == "^resnet-.*"
    assert (spec.severity, spec.action) == ("critical", "stop")
    assert specs[0].name == "VanishingGradient" and specs[0].rule.params.threshold == 1e-7


def test_entry_named_like_a_default_replaces_it(tmp_path: Path) -> None:
    """An entry without a name (so named like its rule) replaces the default in place."""
    text = "rules:\n  - rule: DeadRelu\n    params: {threshold_layer: 30}\n    action: checkpoint\n"
    specs = load_rules(write(tmp_path, text))
    assert [s.name for s in specs] == DEFAULTS
    dead = specs[DEFAULTS.index("DeadRelu")]
    assert isinstance(dead.rule, DeadRelu) and dead.rule.params.threshold_layer == 30.0
    assert dead.action == "checkpoint" and dead.severity == "warning"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("defaults: false\nrules:\n  - rule: Overfit\n", ["Overfit"]),
        ("defaults: false\n", []),
        ("", DEFAULTS),
        ("# only a comment\n", DEFAULTS),
        ("defaults: true\nrules: []\n", DEFAULTS),
        ("rules:\n  - rule: Overfit\n    name: overfit-strict\n", [*DEFAULTS, "overfit-strict"]),
    ],
)
def test_defaults_switch(tmp_path: Path, text: str, names: list[str]) -> None:
    """`defaults: false` drops the default set; empty files mean the defaults."""
    assert [s.name for s in load_rules(write(tmp_path, text))] == names


def test_rules_for_job(tmp_path: Path) -> None:
    """rules_for_job keeps specs without a jobs regex and those whose regex matches (re.search)."""
    specs = load_rules(write(tmp_path, EXAMPLE))
    assert "vanishing-1e-6" in [s.name for s in rules_for_job(specs, "resnet-50")]
    assert "vanishing-1e-6" not in [s.name for s in rules_for_job(specs, "bert-resnet-1")]
    assert len(rules_for_job(specs, "bert")) == len(DEFAULTS)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        # (file contents, regex the message must match; every message names file, entry and line)
        (
            "rules:\n  - rule: VanishingGradient\n  - rule: DeadRel\n",
            r"rules\.yaml: rules\[1\], line 3: unknown rule 'DeadRel'; did you mean DeadRelu\?.*known rules",
        ),
        (
            "rules:\n  - rule: VanishingGradient\n    params:\n      threshold: 1.0\n      thresold: 2\n",
            r"rules\[0\], line 5: unknown parameter for rule VanishingGradient: 'thresold'; "
            r"did you mean 'threshold'\?",
        ),
        (
            "rules:\n  - rule: Overfit\n    jobs: '(resnet'\n",
            r"rules\[0\], line 3: jobs: invalid regular expression",
        ),
        (
            "rules:\n  - rule: DeadRelu\n    params: {tensor_regex: '[relu'}\n",
            r"rules\[0\], line 3: rule DeadRelu: parameter tensor_regex: invalid regular expression",
        ),
        (
            "rules:\n  - rule: Overfit\n    name: a\n  - rule: DeadRelu\n    name: a\n",
            r"rules\[1\], line 5: duplicate rule name 'a' \(also rules\[0\], line 2\)",
        ),
        (
            "rules:\n  - rule: Overfit\n  - rule: Overfit\n",
            r"rules\[1\], line 3: duplicate rule name 'Overfit'",
        ),
        (
            "rules:\n  - rule: Overfit\n    severity: high\n",
            r"rules\[0\], line 3: severity: Input should be 'info', 'warning' or 'critical'",
        ),
        (
            "rules:\n  - rule: Overfit\n    action: restart\n",
            r"rules\[0\], line 3: action: Input should be 'none', 'stop' or 'checkpoint'",
        ),
        (
            "rules:\n  - rule: Overfit\n    sevrity: info\n",
            r"rules\[0\], line 3: unknown key 'sevrity'",
        ),
        (
            "rules:\n  - rule: Overfit\n    params:\n      patience: 2\n      ratio_threshold: big\n",
            r"rules\[0\], line 5: rule Overfit: invalid parameters \(ratio_threshold",
        ),
        (
            "rules:\n  - rule: DeadRelu\n    params: {threshold_inactivity: 2}\n",
            r"rules\[0\], line 3: .*allowed values .*0\.1, 1, 5, 10, 50",
        ),
        (
            "rules:\n  - name: x\n",
            r"rules\[0\], line 2: rule: Field required",
        ),
        (
            "rules:\n  - 3\n",
            r"rules\[0\], line 2: expected a mapping",
        ),
        (
            "rules:\n  - rule: Overfit\n    name: 'two words'\n",
            r"rules\[0\], line 3: name: must be",
        ),
        ("rule: Overfit\n", r"rules\.yaml: line 1: rule: unknown key 'rule'"),
        ("defaults: maybe\n", r"line 1: defaults: Input should be a valid boolean"),
        ("rules: {rule: Overfit}\n", r"line 1: rules: Input should be a valid list"),
        ("- rule: Overfit\n", r"line 1: expected a mapping"),
        ("rules:\n  - rule: [Overfit\n", r"rules\.yaml: line 3: invalid YAML"),
        ("rules:\n  - rule: Overfit\n    rule: DeadRelu\n", r"line 3: key 'rule' repeats the one on line 2"),
    ],
)
def test_invalid_files(tmp_path: Path, text: str, pattern: str) -> None:
    """Each invalid file raises ConfigError naming the file, the entry, the line and the problem."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert re.search(pattern, message), message


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_rules(tmp_path / "nope.yaml")


def test_parse_rules_source_name() -> None:
    """parse_rules names the given source in its errors."""
    with pytest.raises(ConfigError, match=r"^inline: rules\[0\], line 1"):
        parse_rules("rules: [{rule: Nope}]", "inline")
