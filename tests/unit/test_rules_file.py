"""Rules files in YAML and TOML: one schema, errors at the line at fault, the examples, `rules --check`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tensorpulse.cli import main
from tensorpulse.errors import ConfigError
from tensorpulse.rules import config
from tensorpulse.rules.config import describe, load_rules, parse_rules, rules_format

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_format_by_extension() -> None:
    """`.toml` (any case) is TOML; everything else, including no extension, is YAML."""
    assert [rules_format(p) for p in ("a.toml", "A.TOML", "a.yaml", "a.yml", "rules", "<rules>")] == [
        "toml",
        "toml",
        "yaml",
        "yaml",
        "yaml",
        "yaml",
    ]


YAML_DOC = """\
defaults: false
rules:
  - rule: VanishingGradient
    name: vg
    jobs: "^resnet-"
    severity: critical
    action: stop
    params: {threshold: 1.0e-6}
  - rule: Threshold
    name: HighLoss
    params:
      scalar: loss
      op: ">="
      value: 5
      patience: 2
      num_steps: 4
"""

TOML_DOC = """\
defaults = false

[[rules]]
rule = "VanishingGradient"
name = "vg"
jobs = "^resnet-"
severity = "critical"
action = "stop"
params = { threshold = 1.0e-6 }

[[rules]]
rule = "Threshold"
name = "HighLoss"
params.scalar = "loss"
params.op = ">="
params.value = 5
params.patience = 2
params.num_steps = 4
"""


def test_yaml_and_toml_share_one_schema(tmp_path: Path) -> None:
    """The same rules written in YAML and in TOML load to the same specs."""
    a = load_rules(write(tmp_path, YAML_DOC, "rules.yaml"))
    b = load_rules(write(tmp_path, TOML_DOC, "rules.toml"))
    assert describe(a) == describe(b)
    assert [(s.name, s.severity, s.action) for s in b] == [
        ("vg", "critical", "stop"),
        ("HighLoss", "warning", "none"),
    ]
    assert b[0].jobs is not None and b[0].jobs.pattern == "^resnet-"
    assert b[1].rule.params.num_steps == 4 and b[1].rule.params.value == 5.0


def test_examples_yaml_and_toml_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/rules.yaml and examples/rules.toml describe the same rules (custom and declarative)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yaml_specs = load_rules(EXAMPLES / "rules.yaml")
    assert describe(yaml_specs) == describe(load_rules(EXAMPLES / "rules.toml"))
    assert {"GradNormSpike", "BigGradients"} <= {s.name for s in yaml_specs}


def test_readme_shows_the_example_files() -> None:
    """The README's custom-rules code blocks are exactly the files in examples/ (so they run as shown)."""
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{(EXAMPLES / 'my_rules.py').read_text()}```" in readme
    assert f"```yaml\n{(EXAMPLES / 'rules.yaml').read_text()}```" in readme


LONG_PRELUDE = '''\
# a comment with [[rules]] in it
defaults = true

[[rules]]
rule = "Threshold"
name = "first"
jobs = """
not = a key
"""
params.collection_names = [
  "x = 1",
]
params.statistic = "l2"
params.op = ">"
params.value = 1
'''


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "[[rules]]\nrule = 'VanishingGradient'\n[rules.params]\nthreshold = 1.0\ntresh = 2\n",
            r"rules\[0\], line 5: unknown parameter for rule VanishingGradient: 'tresh'; did you mean 'threshold'\?",
        ),
        (
            "[[rules]]\nrule = 'VanishingGradient'\n\n[rules.params]\nthreshold = -1.0\n",
            r"rules\[0\], line 5: rule VanishingGradient: invalid parameters \(threshold",
        ),
        (
            "[[rules]]\nrule = 'VanishingGradient'\nparams.thresold = 2\n",
            r"rules\[0\], line 3: unknown parameter .*'thresold'; did you mean 'threshold'\?",
        ),
        (
            "[[rules]]\nrule = 'VanishingGradient'\nparams = { thresold = 2 }\n",
            r"rules\[0\], line 3: unknown parameter .*'thresold'",
        ),
        ("[[rules]]\nrule = 'Overfit'\nsevrity = 'info'\n", r"rules\[0\], line 3: unknown key 'sevrity'"),
        (
            "[[rules]]\n\nrule = 'DeadRel'\n",
            r"rules\[0\], line 3: unknown rule 'DeadRel'; did you mean DeadRelu\?",
        ),
        (
            "[[rules]]\nrule = 'Overfit'\njobs = '(x'\n",
            r"rules\[0\], line 3: jobs: invalid regular expression",
        ),
        (
            LONG_PRELUDE
            + "\n[[rules]]\nrule = 'Threshold'\n[rules.params]\nscalar = 'loss'\nop = '>'\nvalue = 1\nmode = 'test'\n",
            r"rules\[1\], line 23: rule Threshold: invalid parameters \(mode",
        ),
        (
            LONG_PRELUDE + "\n[[rules]]\nrule = 'Overfit'\nname = 'first'\n",
            r"rules\[1\], line 19: duplicate rule name 'first' \(also rules\[0\], line 4\)",
        ),
        ("defaults = true\nrules = [ { rule = 'Nope' } ]\n", r"rules\[0\], line 2: unknown rule 'Nope'"),
        (
            "defaults = true\nrule = 'Overfit'\n",
            r"line 2: rule: unknown key 'rule' \(allowed: defaults, rules\)",
        ),
        ("defaults = 'yes'\n", r"line 1: defaults: Input should be a valid boolean"),
        ("[[rules]]\nrule = 'Overfit'\nseverity = \n", r"line 3: invalid TOML: Invalid value"),
        (
            "[[rules]]\nrule = 'Overfit'\nrule = 'DeadRelu'\n",
            r"line 3: invalid TOML: Cannot overwrite a value",
        ),
    ],
)
def test_toml_errors_point_at_the_line(tmp_path: Path, text: str, pattern: str) -> None:
    """TOML errors name the file, the entry and the line of the key at fault."""
    path = write(tmp_path, text, "rules.toml")
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(pattern, message), message


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "rules:\n  - rule: Overfit\n  - rule: Threshold\n    params:\n      scalar: loss\n      op: '>'\n"
            "      value: 1\n      statistic: l2\n",
            r"rules\[1\], line 8: rule Threshold: invalid parameters \(statistic: 'statistic' selects tensors",
        ),
        (
            "rules:\n  - rule: Threshold\n    params:\n      statistic: l2\n      op: '>'\n",
            r"rules\[0\], line 3: rule Threshold: invalid parameters \(value: Field required",
        ),
        (
            "rules:\n  - rule: Threshold\n    params:\n      statistic: l2\n      op: '>'\n      value: 1\n"
            "      patience: 5\n      num_steps: 3\n",
            r"rules\[0\], line 8: .*num_steps: must be at least patience \(5\)",
        ),
        (
            "rules:\n  - rule: Threshold\n    params: {statistic: l2, op: '>', value: 1, collections: [gradients]}\n",
            r"rules\[0\], line 3: unknown parameter for rule Threshold: 'collections'; did you mean "
            r"'collection_names'\?",
        ),
    ],
)
def test_yaml_declarative_errors_point_at_the_line(tmp_path: Path, text: str, pattern: str) -> None:
    """Invalid declarative rules in YAML fail with the line of the parameter at fault."""
    path = write(tmp_path, text, "rules.yaml")
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_toml_without_a_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where neither tomllib nor tomli exists (Python 3.10 without tomli) TOML files fail clearly."""
    monkeypatch.setattr(config, "_toml_module", lambda: None)
    with pytest.raises(
        ConfigError, match=r"^r\.toml: TOML rules files need Python 3\.11\+ \(tomllib\) or the 'tomli'"
    ):
        parse_rules("defaults = true\n", "r.toml")
    assert parse_rules("defaults: false\n", "r.yaml") == []


def test_cli_check_lists_rules_per_job_pattern(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tensorpulse rules --check FILE` validates the file and prints its rules grouped by job pattern."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    text = (EXAMPLES / "rules.yaml").read_text() + "  - rule: Overfit\n    name: strict\n    jobs: '^bert-'\n"
    path = write(tmp_path, text, "rules.yaml")
    result = CliRunner().invoke(main, ["rules", "--check", str(path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    every, bert = out.split("jobs matching '^bert-':\n")
    assert every.startswith("every job:\n")
    assert "my_rules:GradNormSpike(factor=5.0)" in every and "BigGradients" in every and "[critical]" in every
    assert bert.split()[0] == "strict" and "strict" not in every
    assert f"{path}: OK, {len(load_rules(path))} rule(s)" in result.output


def test_cli_check_fails_with_the_error(tmp_path: Path) -> None:
    """An invalid file makes `rules --check` exit 1 with the file, entry and line in the message."""
    path = write(tmp_path, "rules:\n  - rule: VanishingGradient\n    params: {treshold: 1}\n", "bad.yaml")
    result = CliRunner().invoke(main, ["rules", "--check", str(path)])
    assert result.exit_code == 1
    assert (
        f"Error: {path}: rules[0], line 3: unknown parameter for rule VanishingGradient: 'treshold'"
        in result.output
    )
