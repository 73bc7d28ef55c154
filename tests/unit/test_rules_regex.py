"""Rule regexes run with RE2: linear time on hostile names, and patterns RE2 cannot run refused at load."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tensorpulse.cli import main
from tensorpulse.errors import ConfigError
from tensorpulse.rules import REGISTRY
from tensorpulse.rules.base import Rule, compile_regex
from tensorpulse.rules.config import load_rules
from tensorpulse.rules.testing import make_record, make_stats
from tensorpulse.wire import ClassCounts, ImageSums, StepRecord, TokenCounts, Vector

# A rule regex on Python's re would not return: the timeout turns that into a failure.
pytestmark = pytest.mark.timeout(120)

#: Exponential time under a backtracking engine on `a...a!`; linear with RE2.
CATASTROPHIC = "^(a+)+$"
#: A name that takes Python's re about 2**50000 steps against CATASTROPHIC.
HOSTILE = "a" * 50_000 + "!"
#: Matches CATASTROPHIC: the verdict must still find it.
MATCHING = "a" * 50_000

#: Parameters a rule needs besides the regex (all others have defaults).
REQUIRED: dict[str, dict[str, Any]] = {
    "Threshold": {"op": ">", "value": 0.0, "statistic": "max"},
    "SimilarAcrossRuns": {"other_trials": ["other-job"]},
    "TensorVariance": {"max_threshold": 1.0},
}
#: Parameters that hold a regex without saying so in their name.
REGEX_NAMED = {"labels", "predictions", "other_trials"}


def regex_parameters() -> list[tuple[str, str]]:
    """(rule, parameter) for every regex parameter of every catalogued rule."""
    return [
        (name, field)
        for name, cls in sorted(REGISTRY.items())
        for field in cls.Params.model_fields
        if "regex" in field or field in REGEX_NAMED
    ]


def build(rule: str, **params: Any) -> Rule:
    return REGISTRY[rule](**{**REQUIRED.get(rule, {}), **params})


def hostile_record(step: int = 1) -> StepRecord:
    """A record whose every name (tensors of each collection, scalars, blocks) is HOSTILE."""
    tensors = [
        make_stats(HOSTILE, coll, [[0.5, 1.0], [2.0, 0.0]], quantiles=True)
        for coll in ("weights", "biases", "gradients", "activations", "inputs", "outputs", "losses")
    ]
    return make_record(
        step,
        scalars={HOSTILE: 1.0, "loss": 1.0},
        tensors=tensors,
        classes={HOSTILE: ClassCounts(2, (5, 5), (5, 0, 0, 5))},
        images={HOSTILE: ImageSums(1, 4, (2.0,), (4.0,))},
        tokens={HOSTILE: TokenCounts(10, {0: 9})},
        vectors={HOSTILE: Vector((1.0, 0.0))},
    )


def test_catastrophic_pattern_finds_the_matching_name_and_skips_the_hostile_one() -> None:
    """`^(a+)+$` against 50k-character names: the matching tensor fires, the hostile one is not selected."""
    rule = build("Threshold", tensor_regex=CATASTROPHIC)
    record = make_record(
        1, tensors=[make_stats(HOSTILE, "weights", [5.0]), make_stats(MATCHING, "weights", [3.0])]
    )
    state, finding = rule.update(rule.initialize(), record)
    assert finding is not None and finding.firing
    assert finding.tensors == (MATCHING,) and finding.value == 3.0


@pytest.mark.parametrize(("rule", "parameter"), regex_parameters())
def test_every_regex_parameter_survives_a_hostile_name(rule: str, parameter: str) -> None:
    """Each rule's regex parameter, set to a catastrophic pattern, never selects a hostile name."""
    instance = build(rule, **{parameter: CATASTROPHIC})
    state = instance.initialize()
    for step in range(1, 4):
        state, finding = instance.update(state, hostile_record(step))
        assert finding is None or HOSTILE not in finding.tensors


@pytest.mark.parametrize(("rule", "parameter"), regex_parameters())
@pytest.mark.parametrize("pattern", [r"(a)\1", "fc(?=\\.weight)", "(?<!grad)fc"])
def test_every_regex_parameter_refuses_what_re2_cannot_run(rule: str, parameter: str, pattern: str) -> None:
    """Backreferences and lookarounds (valid for Python's re) are refused naming rule, parameter, pattern."""
    with pytest.raises(ConfigError) as info:
        build(rule, **{parameter: pattern})
    message = str(info.value)
    assert message.startswith(f"rule {rule}: parameter {parameter}: regular expression {pattern!r}"), message
    assert "RE2 cannot run" in message and "lookarounds" in message


def test_invalid_pattern_is_still_called_invalid() -> None:
    """A pattern neither engine can parse is reported as invalid, with RE2's reason."""
    with pytest.raises(ConfigError, match=r"^jobs: invalid regular expression '\(x': missing \)"):
        compile_regex("(x", "jobs")


def test_rules_file_and_check_report_the_rule_parameter_and_line(tmp_path: Path) -> None:
    """A rules file with a backreference fails at load and in `rules --check` with the same message."""
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - rule: Threshold\n"
        "    name: big\n"
        "    params:\n"
        "      statistic: max\n"
        "      op: '>'\n"
        "      value: 1\n"
        "      tensor_regex: '(fc)\\d\\1'\n"
    )
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    expected = (
        f"{path}: rules[0], line 8: rule Threshold: parameter tensor_regex: regular expression "
        "'(fc)\\\\d\\\\1' uses syntax RE2 cannot run"
    )
    assert str(info.value).startswith(expected), str(info.value)
    result = CliRunner().invoke(main, ["rules", "--check", str(path)])
    assert result.exit_code == 1
    assert f"Error: {str(info.value)}" in result.output


def test_jobs_key_is_re2_too(tmp_path: Path) -> None:
    """The `jobs` regex of a rules entry is refused the same way, at its own line."""
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - rule: Overfit\n    jobs: '^(?!test-)'\n")
    with pytest.raises(ConfigError, match=r"rules\[0\], line 3: jobs: regular expression .* RE2 cannot run"):
        load_rules(path)


def test_missing_re2_is_said_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the google-re2 package a rule regex is refused with how to install it, not run with re."""
    monkeypatch.setitem(sys.modules, "re2", None)  # what `import re2` meets where it is not installed
    with pytest.raises(ConfigError, match=r"rule DeadRelu: parameter tensor_regex: .* needs the google-re2"):
        build("DeadRelu", tensor_regex="relu")
