"""Rules files: which rules run for which jobs, with what parameters, severity and action.

```yaml
# rules.yaml
defaults: true          # include the default rule set (default true)
rules:
  - rule: VanishingGradient        # catalogue name
    name: vanishing-1e-6           # optional instance name (default: the rule name); unique
    jobs: "^resnet-.*"             # optional regex on the job id, re.search (default: every job)
    severity: critical             # optional: info|warning|critical (default: the rule's own)
    action: stop                   # optional: none|stop|checkpoint
    params: {threshold: 1.0e-6}
```

An entry whose instance name equals a default rule's name replaces that default (so an entry
`rule: VanishingGradient` without a name re-parameterises the default one). Every problem is a
ConfigError naming the file, the entry and its line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from tensorpulse.errors import ConfigError

from . import default_rules, get_rule_class
from .base import SEVERITIES, Rule, compile_regex

ACTIONS = ("none", "stop", "checkpoint")
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


@dataclass(frozen=True)
class RuleSpec:
    """One configured rule instance: what runs, for which jobs, and what its alerts carry."""

    name: str
    rule: Rule
    jobs: re.Pattern[str] | None
    severity: str
    action: str

    def applies_to(self, job: str) -> bool:
        """True if this spec runs for `job` (no `jobs` regex means every job)."""
        return self.jobs is None or self.jobs.search(job) is not None


def spec_for(
    rule: Rule,
    name: str | None = None,
    jobs: re.Pattern[str] | None = None,
    severity: str | None = None,
    action: str = "none",
) -> RuleSpec:
    """A spec for `rule` with the rule's own name and severity unless given."""
    return RuleSpec(name or rule.name, rule, jobs, severity or rule.severity, action)


def default_specs() -> list[RuleSpec]:
    """The default rule set, one spec per catalogued rule, for every job, with no action."""
    return [spec_for(rule) for rule in default_rules()]


def rules_for_job(specs: Iterable[RuleSpec], job: str) -> list[RuleSpec]:
    """The specs whose `jobs` regex matches `job` (re.search), in order."""
    return [s for s in specs if s.applies_to(job)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rule: StrictStr
    name: StrictStr | None = Field(None, pattern=_NAME_RE)
    jobs: StrictStr | None = None
    severity: Literal["info", "warning", "critical"] | None = None
    action: Literal["none", "stop", "checkpoint"] = "none"
    params: dict[StrictStr, Any] | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: StrictBool = True
    rules: list[Any] | None = None


def _problems(exc: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    return [(tuple(e["loc"]), e["msg"]) for e in exc.errors()]


def _key_nodes(node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """Key -> (key node, value node) of a YAML mapping node (empty for anything else)."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def _line(node: yaml.Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def _check_duplicate_keys(node: yaml.Node, where: str) -> None:
    """Reject a mapping that repeats a key (YAML loaders silently keep the last one)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise ConfigError(
                            f"{where}: line {_line(k)}: key {k.value!r} repeats the one on line {seen[k.value]}"
                        )
                    seen[k.value] = _line(k) or 0
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _parse(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_duplicate_keys(node, where)
        return loader.construct_document(node), node
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: {at}invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()


def _entry_error(
    where: str, line: int | None, keys: dict[str, tuple[yaml.Node, yaml.Node]], message: str, key: str | None
) -> ConfigError:
    """A ConfigError for one entry, pointing at the line of `key` when the entry has it."""
    return ConfigError(f"{where}, line {_line(keys[key][0]) if key in keys else line}: {message}")


def _unknown_params(cls: type[Rule], params: dict[str, Any]) -> list[str]:
    known = list(cls.Params.model_fields)
    out = []
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(f"{key!r}{hint}")
    return out


def _entry_spec(raw: Any, node: yaml.Node | None, where: str) -> RuleSpec:
    """Validate one entry of `rules:` and build its spec; errors name `where` and a line."""
    keys = _key_nodes(node)
    entry_line = _line(node)
    param_keys = _key_nodes(keys["params"][1]) if "params" in keys else {}

    def fail(message: str, key: str | None = None, within: dict[str, Any] = keys) -> ConfigError:
        return _entry_error(where, entry_line, within, message, key)

    if not isinstance(raw, dict):
        raise fail(f"expected a mapping with at least 'rule', got {type(raw).__name__}")
    try:
        entry = _Entry.model_validate(raw)
    except ValidationError as exc:
        loc, msg = _problems(exc)[0]
        key = str(loc[0]) if loc else None
        if msg.startswith("Extra inputs"):
            raise fail(f"unknown key {key!r} (allowed: {', '.join(_Entry.model_fields)})", key) from exc
        if key == "name" and "pattern" in msg:
            msg = "must be 1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
        raise fail(f"{'.'.join(str(p) for p in loc)}: {msg}", key) from exc

    try:
        cls = get_rule_class(entry.rule)
    except ConfigError as exc:
        raise fail(str(exc), "rule") from exc
    params = entry.params or {}
    unknown = [k for k in params if k not in cls.Params.model_fields]
    if unknown:
        allowed = ", ".join(cls.Params.model_fields) or "none"
        message = f"unknown parameter for rule {cls.name}: {'; '.join(_unknown_params(cls, params))}"
        if unknown[0] in param_keys:
            raise fail(f"{message} (parameters: {allowed})", unknown[0], param_keys)
        raise fail(f"{message} (parameters: {allowed})", "params")
    try:
        rule = cls(**params)
    except ConfigError as exc:
        cause = exc.__cause__
        bad = (
            str(cause.errors()[0]["loc"][0])
            if isinstance(cause, ValidationError) and cause.errors()[0]["loc"]
            else ""
        )
        if bad in param_keys:
            raise fail(str(exc), bad, param_keys) from exc
        raise fail(str(exc), "params") from exc
    try:
        jobs = compile_regex(entry.jobs, "jobs")
    except ConfigError as exc:
        raise fail(str(exc), "jobs") from exc
    return spec_for(rule, entry.name or cls.name, jobs, entry.severity, entry.action)


def parse_rules(text: str, source: str = "<rules>") -> list[RuleSpec]:
    """Parse the text of a rules file; `source` names it in error messages."""
    data, root = _parse(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: line {_line(root) or 1}: expected a mapping with keys 'defaults' and 'rules', "
            f"got {type(data).__name__}"
        )
    top = _key_nodes(root)
    try:
        doc = _File.model_validate(data)
    except ValidationError as exc:
        loc, msg = _problems(exc)[0]
        key = str(loc[0]) if loc else ""
        line = _line(top[key][0]) if key in top else _line(root)
        what = f"unknown key {key!r} (allowed: defaults, rules)" if msg.startswith("Extra inputs") else msg
        raise ConfigError(f"{source}: line {line}: {key}: {what}") from exc

    items = top["rules"][1].value if "rules" in top and isinstance(top["rules"][1], yaml.SequenceNode) else []
    specs: list[RuleSpec] = []
    seen: dict[str, tuple[int, int | None]] = {}
    for i, raw in enumerate(doc.rules or ()):
        node = items[i] if i < len(items) else None
        spec = _entry_spec(raw, node, f"{source}: rules[{i}]")
        if spec.name in seen:
            j, line = seen[spec.name]
            raise _entry_error(
                f"{source}: rules[{i}]",
                _line(node),
                _key_nodes(node),
                f"duplicate rule name {spec.name!r} (also rules[{j}], line {line}); give one a 'name'",
                "name",
            )
        seen[spec.name] = (i, _line(node))
        specs.append(spec)

    if not doc.defaults:
        return specs
    # An entry named like a default rule replaces it in place; the others follow the defaults.
    by_name = {s.name: s for s in specs}
    defaults = [by_name.get(d.name, d) for d in default_specs()]
    replaced = {d.name for d in defaults}
    return defaults + [s for s in specs if s.name not in replaced]


def load_rules(path: str | Path | None) -> list[RuleSpec]:
    """The rule specs of a rules file; the default set when `path` is None."""
    if path is None:
        return default_specs()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the rules file: {exc}") from exc
    return parse_rules(text, str(path))


__all__ = [
    "ACTIONS",
    "SEVERITIES",
    "RuleSpec",
    "default_specs",
    "load_rules",
    "parse_rules",
    "rules_for_job",
    "spec_for",
]
