"""Custom Python rules: loaded by `module:Class` or by entry point, and clear start-up errors otherwise."""

from __future__ import annotations

import re
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.rules import Rule
from tensorpulse.rules.config import describe, load_rules, parse_rules
from tensorpulse.rules.custom import ENTRY_POINT_GROUP, resolve_rule, rule_origin
from tensorpulse.rules.testing import make_record, make_stats, replay

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
from pydantic import Field
from tensorpulse.rules import Finding, Rule, RuleParams


class SpikeParams(RuleParams):
    limit: float = Field(1.0, gt=0)


class Spike(Rule):
    '''Fires while the loss is above `limit`.'''

    name = "Spike"
    Params = SpikeParams
    severity = "critical"

    def update(self, state, record):
        loss = record.scalars.get("loss")
        if loss is None:
            return state, None
        return {"seen": state.get("seen", 0) + 1}, Finding(loss > self.params.limit, value=loss)
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Writes a uniquely named module on sys.path and returns its name; forgets it afterwards."""
    names: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"tp_custom_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def rules_file(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / "conf" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_module_class_reference(tmp_path: Path, module: Callable[[str], str]) -> None:
    """`rule: module:Class` imports the class, validates its params and names the spec after the class."""
    mod = module(GOOD)
    specs = load_rules(
        rules_file(tmp_path, f"defaults: false\nrules:\n  - rule: {mod}:Spike\n    params: {{limit: 2}}\n")
    )
    (spec,) = specs
    assert type(spec.rule).__module__ == mod and isinstance(spec.rule, Rule)
    assert (spec.name, spec.severity, spec.rule.params.limit) == ("Spike", "critical", 2.0)
    assert rule_origin(type(spec.rule)) == f"{mod}:Spike"
    records = [make_record(i, scalars={"loss": v}) for i, v in enumerate([1.0, 3.0])]
    assert [f.firing for _, f in replay(spec.rule, records)[1]] == [False, True]
    assert f"{mod}:Spike(limit=2.0)" in describe(specs)


def test_custom_rule_replaces_or_joins_defaults(tmp_path: Path, module: Callable[[str], str]) -> None:
    """A custom rule is added after the default set, or replaces a default when given its name."""
    mod = module(GOOD)
    added = load_rules(rules_file(tmp_path, f"rules:\n  - rule: {mod}:Spike\n"))
    assert added[-1].name == "Spike" and len(added) == len(load_rules(None)) + 1
    text = f"rules:\n  - rule: {mod}:Spike\n    name: DeadRelu\n"
    replaced = load_rules(rules_file(tmp_path, text))
    assert [s.name for s in replaced] == [s.name for s in load_rules(None)]
    assert type(next(s for s in replaced if s.name == "DeadRelu").rule).__name__ == "Spike"


def test_example_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/my_rules.py loads by reference and fires when the gradient norm jumps over its average."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    cls = resolve_rule("my_rules:GradNormSpike")
    rule = cls(factor=5.0, window=2)
    records = [
        make_record(i, tensors=[make_stats("gradient/fc1.weight", "gradients", [g, -g])])
        for i, g in enumerate([1.0, 1.2, 0.9, 50.0, 55.0])
    ]
    out = replay(rule, records, roundtrip_every=1)[1]
    assert [(s, f.firing) for s, f in out] == [(0, False), (1, False), (2, False), (3, True), (4, False)]
    assert out[3][1].tensors == ("gradient/fc1.weight",)


def _dist(site: Path, dist: str, entry_points: str) -> None:
    """A minimal installed distribution: dist-info with METADATA and entry_points.txt."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_entry_point(tmp_path: Path, module: Callable[[str], str]) -> None:
    """A name registered in the tensorpulse.rules entry-point group is used like a built-in."""
    mod = module(GOOD)
    tag = uuid.uuid4().hex[:6]
    _dist(tmp_path, f"tp_plugin_{tag}", f"[{ENTRY_POINT_GROUP}]\nLossSpike{tag} = {mod}:Spike\n")
    text = f"defaults: false\nrules:\n  - rule: LossSpike{tag}\n    params: {{limit: 4}}\n"
    (spec,) = load_rules(rules_file(tmp_path, text))
    assert type(spec.rule).__name__ == "Spike" and spec.rule.params.limit == 4.0
    with pytest.raises(ConfigError, match=rf"unknown rule 'LossSpik{tag}'; did you mean LossSpike{tag}\?"):
        resolve_rule(f"LossSpik{tag}")


def test_entry_point_clash_and_failure(tmp_path: Path, module: Callable[[str], str]) -> None:
    """Two packages registering one name, or an entry point that fails to import, are ConfigErrors."""
    mod = module(GOOD)
    tag = uuid.uuid4().hex[:6]
    _dist(tmp_path, f"tp_a_{tag}", f"[{ENTRY_POINT_GROUP}]\nTwice{tag} = {mod}:Spike\n")
    _dist(
        tmp_path,
        f"tp_b_{tag}",
        f"[{ENTRY_POINT_GROUP}]\nTwice{tag} = {mod}:Spike\nBroken{tag} = nope_{tag}:X\n",
    )
    with pytest.raises(ConfigError, match=r"more than one installed package") as info:
        resolve_rule(f"Twice{tag}")
    assert f"tp_a_{tag} 1.0 ({mod}:Spike)" in str(info.value) and f"tp_b_{tag} 1.0" in str(info.value)
    with pytest.raises(ConfigError, match=rf"entry point 'nope_{tag}:X' of package tp_b_{tag} 1\.0 failed"):
        resolve_rule(f"Broken{tag}")


def test_builtin_names_win_over_entry_points(tmp_path: Path, module: Callable[[str], str]) -> None:
    """An entry point cannot shadow a catalogue rule: the catalogue name keeps its class."""
    mod = module(GOOD)
    _dist(tmp_path, f"tp_shadow_{uuid.uuid4().hex[:6]}", f"[{ENTRY_POINT_GROUP}]\nDeadRelu = {mod}:Spike\n")
    assert resolve_rule("DeadRelu").__module__ == "tensorpulse.rules.dead_relu"


NO_UPDATE = """
from tensorpulse.rules import Rule

class Lazy(Rule):
    name = "Lazy"
"""

BAD_SEVERITY = """
from tensorpulse.rules import Finding, Rule

class Loud(Rule):
    name = "Loud"
    severity = "page-everyone"

    def update(self, state, record):
        return state, None
"""

RAISES_IN_INIT = """
from tensorpulse.rules import Rule

class Fussy(Rule):
    name = "Fussy"

    def _check(self):
        raise TypeError("needs a GPU")

    def update(self, state, record):
        return state, None
"""

NOT_JSON = """
from tensorpulse.rules import Rule

class Setty(Rule):
    name = "Setty"

    def initialize(self):
        return {"seen": set()}

    def update(self, state, record):
        return state, None
"""

UNLIKE_ITS_STATE = """
from typing_extensions import TypedDict

from tensorpulse.rules import Rule

class Counter(Rule):
    name = "Counter"

    class State(TypedDict):
        seen: int

    def initialize(self):
        return {"count": 0}

    def update(self, state, record):
        return state, None
"""


@pytest.mark.parametrize(
    ("source", "ref", "params", "pattern"),
    [
        # (module source or None, reference with {mod} for the module's name, params line, expected message)
        (
            None,
            "tp_missing_mod_xyz:Rule1",
            "",
            r"line 3: rule 'tp_missing_mod_xyz:Rule1': cannot import module "
            r"'tp_missing_mod_xyz': it is not on the Python path; add its directory to PYTHONPATH",
        ),
        (
            "import tp_not_installed_dep_xyz\n",
            "{mod}:X",
            "",
            r"line 3: .*failed: ModuleNotFoundError: No module "
            r"named 'tp_not_installed_dep_xyz'.*; install 'tp_not_installed_dep_xyz' where the worker runs",
        ),
        (
            "x = 1\nraise RuntimeError('boom')\n",
            "{mod}:X",
            "",
            r"line 3: .*raised RuntimeError: boom "
            r"\(.*tp_custom_\w+\.py:2\); fix the module",
        ),
        (
            "def broken(:\n",
            "{mod}:X",
            "",
            r"line 3: .*raised SyntaxError: invalid syntax \(.*tp_custom_\w+\.py:1\); fix the module",
        ),
        (
            GOOD,
            "{mod}:Spkie",
            "",
            r"line 3: rule '{mod}:Spkie': {mod} \(.*\) has no attribute 'Spkie'; "
            r"did you mean 'Spike'\? \(Rule subclasses there: Spike\)",
        ),
        (
            GOOD,
            "{mod}:SpikeParams",
            "",
            r"line 3: rule '{mod}:SpikeParams': is a class SpikeParams, not a rule",
        ),
        (
            "def f():\n    pass\n",
            "{mod}:f",
            "",
            r"line 3: rule '{mod}:f': is a function, not a rule; a rule is "
            r"a subclass of tensorpulse.rules.Rule",
        ),
        (GOOD, "{mod}:Rule", "", r"line 3: rule '{mod}:Rule': is the base class itself"),
        (NO_UPDATE, "{mod}:Lazy", "", r"line 3: .*Lazy\): implement update\(self, state, record\)"),
        (BAD_SEVERITY, "{mod}:Loud", "", r"line 3: .*set severity to one of info, warning, critical"),
        (
            GOOD,
            "{mod}:Spike",
            "    params:\n      limt: 3\n",
            r"line 5: unknown parameter for rule Spike: "
            r"'limt'; did you mean 'limit'\?",
        ),
        (
            GOOD,
            "{mod}:Spike",
            "    params:\n      limit: -1\n",
            r"line 5: rule Spike: invalid parameters "
            r"\(limit: Input should be greater than 0\)",
        ),
        (RAISES_IN_INIT, "{mod}:Fussy", "", r"line 3: rule Fussy: creating it raised TypeError: needs a GPU"),
        (
            NOT_JSON,
            "{mod}:Setty",
            "",
            r"line 3: rule Setty: initialize\(\) must return a JSON-serialisable "
            r"dict.*TypeError",
        ),
        (
            UNLIKE_ITS_STATE,
            "{mod}:Counter",
            "",
            r"line 3: rule Counter: initialize\(\) must return .*it does not match the rule's declared "
            r"State at seen: Field required",
        ),
        (
            None,
            "my.rules.GradNormSpike",
            "",
            r"line 3: unknown rule 'my.rules.GradNormSpike'; for a Python "
            r"class write 'module:Class', e.g. 'my.rules:GradNormSpike'",
        ),
        (None, "'not a module:X'", "", r"line 3: rule 'not a module:X': expected 'module:Class'"),
    ],
)
def test_errors_name_file_line_and_fix(
    tmp_path: Path, module: Callable[[str], str], source: str | None, ref: str, params: str, pattern: str
) -> None:
    """Every way a custom rule can be wrong fails at load time with the file, the line and what to do."""
    mod = module(source) if source is not None else "unused"
    ref, pattern = ref.format(mod=mod), pattern.format(mod=mod)
    path = rules_file(tmp_path, f"rules:\n  - rule: Overfit\n  - rule: {ref}\n{params}")
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert message.startswith(f"{path}: rules[1], "), message
    assert re.search(pattern, message), message


def test_missing_module_next_to_the_rules_file(tmp_path: Path) -> None:
    """When the module sits next to the rules file, the error says which PYTHONPATH to set."""
    path = rules_file(tmp_path, "rules:\n  - rule: tp_beside_xyz:Spike\n")
    (path.parent / "tp_beside_xyz.py").write_text(GOOD)
    with pytest.raises(
        ConfigError,
        match=rf"'tp_beside_xyz' is next to the rules file: start the worker with "
        rf"PYTHONPATH={re.escape(str(path.parent.resolve()))}",
    ):
        load_rules(path)


def test_parse_rules_without_a_file_gives_no_path_hint() -> None:
    """Inline text (no file) still explains the missing module, without a directory hint."""
    with pytest.raises(ConfigError, match=r"^inline: rules\[0\], line 1: .*add its directory to PYTHONPATH"):
        parse_rules("rules: [{rule: 'tp_nowhere_xyz:R'}]", "inline")
