"""Rules files: which rules run for which jobs, with what parameters, severity and action.

```yaml
# rules.yaml (or the same keys in rules.toml: `defaults = true` and `[[rules]]` tables)
defaults: true          # include the default rule set (default true)
rules:
  - rule: VanishingGradient        # catalogue name, Threshold, an entry-point name, or module:Class
    name: vanishing-1e-6           # optional instance name (default: the rule name); unique
    jobs: "^resnet-.*"             # optional regex on the job id, searched (RE2 syntax; default: every job)
    severity: critical             # optional: info|warning|critical (default: the rule's own)
    action: stop                   # optional: none|stop|checkpoint
    params: {threshold: 1.0e-6}
```

The format follows the extension: `.toml` is TOML, anything else YAML. An entry whose instance
name equals a default rule's name replaces that default (so an entry `rule: VanishingGradient`
without a name re-parameterises the default one). How `rule:` names are resolved (catalogue,
entry points, `module:Class`) is in `custom.py`. Every problem is a ConfigError naming the file,
the entry and its line, raised when the file is loaded (so a worker fails at start-up).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from tensorpulse.errors import ConfigError

from . import default_rules
from .base import SEVERITIES, Regex, RegexError, Rule, compile_regex
from .custom import check_initial_state, resolve_rule, rule_origin

ACTIONS = ("none", "stop", "checkpoint")
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"

Format = Literal["yaml", "toml"]


@dataclass(frozen=True)
class RuleSpec:
    """One configured rule instance: what runs, for which jobs, and what its alerts carry."""

    name: str
    rule: Rule
    jobs: Regex | None
    severity: str
    action: str

    def applies_to(self, job: str) -> bool:
        """True if this spec runs for `job` (no `jobs` regex means every job)."""
        return self.jobs is None or self.jobs.search(job) is not None


def spec_for(
    rule: Rule,
    name: str | None = None,
    jobs: Regex | None = None,
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


# --- where things are in the file -----------------------------------------------------------


@dataclass
class _Pos:
    """Line numbers (1-based) of a value in the file: its own, its keys' (with the values' positions
    below them), and its items'. Unknown positions are simply missing."""

    line: int | None = None
    keys: dict[str, tuple[int, _Pos]] = field(default_factory=dict)
    items: list[_Pos] = field(default_factory=list)

    def key_line(self, key: str | None) -> int | None:
        return self.keys[key][0] if key in self.keys else self.line

    def child(self, key: str) -> _Pos:
        return self.keys[key][1] if key in self.keys else _Pos(self.key_line(key))

    def item(self, i: int) -> _Pos:
        return self.items[i] if i < len(self.items) else _Pos(self.line)


# --- YAML -------------------------------------------------------------------------------------


def _yaml_line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _yaml_pos(node: yaml.Node) -> _Pos:
    pos = _Pos(_yaml_line(node))
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                pos.keys.setdefault(str(k.value), (_yaml_line(k), _yaml_pos(v)))
    elif isinstance(node, yaml.SequenceNode):
        pos.items = [_yaml_pos(v) for v in node.value]
    return pos


def _check_duplicate_keys(node: yaml.Node, source: str) -> None:
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
                            f"{source}: line {_yaml_line(k)}: key {k.value!r} repeats the one on line "
                            f"{seen[k.value]}"
                        )
                    seen[k.value] = _yaml_line(k)
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _parse_yaml(text: str, source: str) -> tuple[Any, _Pos]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, _Pos(1)
        _check_duplicate_keys(node, source)
        return loader.construct_document(node), _yaml_pos(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{source}: {at}invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()


# --- TOML -------------------------------------------------------------------------------------

_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _toml_module() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli  # type: ignore[import-not-found]
    except ImportError:
        return None
    return tomli


_MISSING = object()


def _toml_at(value: Any, path: tuple[str | int, ...]) -> Any:
    """What `path` (table keys, array indices) leads to inside a parsed TOML value; _MISSING if nothing."""
    for part in path:
        in_table = isinstance(value, dict) and part in value
        in_array = isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        if not (in_table or in_array):
            return _MISSING
        value = value[part]
    return value


class _TomlLines:
    """Where keys are in a TOML text, found by the TOML parser itself: a key's line is the first
    line at which the text up to there parses to a document that holds the key. (tomllib reports
    positions only for syntax errors.) For a value spread over lines (a multi-line string or
    array) that is the line where it ends. Computed on demand, for error messages only: a binary
    search over prefixes, each parsed at most once."""

    def __init__(self, text: str, toml: Any) -> None:
        self.lines = text.splitlines(keepends=True)
        self.toml = toml
        self.docs: dict[int, Any] = {}

    def doc(self, n: int) -> Any:
        """The first `n` lines parsed; None where they do not parse on their own."""
        if n not in self.docs:
            try:
                self.docs[n] = self.toml.loads("".join(self.lines[:n]))
            except self.toml.TOMLDecodeError:
                self.docs[n] = None
        return self.docs[n]

    def holds(self, n: int, path: tuple[str | int, ...]) -> bool:
        return _toml_at(self.doc(n), path) is not _MISSING

    def line(self, path: tuple[str | int, ...], lo: int = 1, hi: int | None = None) -> int | None:
        """The first line (within lo..hi) whose prefix holds `path`; None if there is none."""
        hi = len(self.lines) if hi is None else hi
        if lo > hi:
            return None
        mid = (lo + hi) // 2
        # Prefixes that do not parse (inside a multi-line value) say nothing: take the next one.
        n = next((k for k in range(mid, hi + 1) if self.doc(k) is not None), None)
        if n is None:
            return self.line(path, lo, mid - 1)
        if self.holds(n, path):
            return self.line(path, lo, mid - 1) or n
        return self.line(path, n + 1, hi)


@dataclass
class _TomlPos:
    """`_Pos` for a TOML file: the same questions, answered lazily by `_TomlLines`. A path the
    file does not hold (a default, a missing `params`) has the line of its nearest holder."""

    lines: _TomlLines
    path: tuple[str | int, ...] = ()

    @property
    def line(self) -> int | None:
        for end in range(len(self.path), 0, -1):
            found = self.lines.line(self.path[:end])
            if found is not None:
                return found
        return 1

    @property
    def keys(self) -> dict[str, Any]:
        value = _toml_at(self.lines.doc(len(self.lines.lines)), self.path)
        return value if isinstance(value, dict) else {}

    def key_line(self, key: str | None) -> int | None:
        return self.child(key).line if key in self.keys else self.line

    def child(self, key: str) -> _TomlPos:
        return _TomlPos(self.lines, (*self.path, key))

    def item(self, i: int) -> _TomlPos:
        return _TomlPos(self.lines, (*self.path, i))


#: Where things are in a rules file, for its error messages.
_Where = _Pos | _TomlPos


def _parse_toml(text: str, source: str) -> tuple[Any, _TomlPos]:
    toml = _toml_module()
    if toml is None:
        raise ConfigError(
            f"{source}: TOML rules files need Python 3.11+ (tomllib) or the 'tomli' package; "
            "install tomli or write the rules file in YAML"
        )
    try:
        data = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        message = str(exc)
        found = _TOML_AT.search(message)
        line = getattr(exc, "lineno", None) or (int(found.group(1)) if found else None)
        at = f"line {line}: " if line else ""
        raise ConfigError(f"{source}: {at}invalid TOML: {_TOML_AT.sub('', message)}") from exc
    return data, _TomlPos(_TomlLines(text, toml))


def rules_format(source: str | Path) -> Format:
    """The format of a rules file by its extension: `.toml` is TOML, anything else YAML."""
    return "toml" if str(source).lower().endswith(".toml") else "yaml"


# --- validation -----------------------------------------------------------------------------


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


def _unknown_params(cls: type[Rule], params: dict[str, Any]) -> list[str]:
    known = list(cls.Params.model_fields)
    out = []
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(f"{key!r}{hint}")
    return out


def _build(cls: type[Rule], params: dict[str, Any]) -> Rule:
    """Instantiate a rule; exceptions other than ConfigError (a user class's own checks) become one."""
    try:
        return cls(**params)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"rule {cls.name or cls.__name__}: creating it raised {type(exc).__name__}: {exc}; "
            "check its parameters (or the class's __init__/_check)"
        ) from exc


def _entry_spec(raw: Any, pos: _Where, where: str, near: Path | None) -> RuleSpec:
    """Validate one entry of `rules:` and build its spec; errors name `where` and a line."""
    param_pos = pos.child("params")

    def fail(message: str, key: str | None = None, within: _Where = pos) -> ConfigError:
        return ConfigError(f"{where}, line {within.key_line(key)}: {message}")

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
        cls = resolve_rule(entry.rule, near)
    except ConfigError as exc:
        raise fail(str(exc), "rule") from exc
    params = entry.params or {}
    unknown = [k for k in params if k not in cls.Params.model_fields]
    if unknown:
        allowed = ", ".join(cls.Params.model_fields) or "none"
        unknown_text = "; ".join(_unknown_params(cls, params))
        message = f"unknown parameter for rule {cls.name or cls.__name__}: {unknown_text}"
        if unknown[0] in param_pos.keys:
            raise fail(f"{message} (parameters: {allowed})", unknown[0], param_pos)
        raise fail(f"{message} (parameters: {allowed})", "params")
    try:
        rule = _build(cls, params)
        check_initial_state(rule)
    except ConfigError as exc:
        cause = exc.__cause__
        bad = (
            str(cause.errors()[0]["loc"][0])
            if isinstance(cause, ValidationError) and cause.errors()[0]["loc"]
            else cause.parameter
            if isinstance(cause, RegexError)
            else ""
        )
        if bad in param_pos.keys:
            raise fail(str(exc), bad, param_pos) from exc
        raise fail(str(exc), "params" if "params" in pos.keys else "rule") from exc
    try:
        jobs = compile_regex(entry.jobs, "jobs")
    except ConfigError as exc:
        raise fail(str(exc), "jobs") from exc
    name = entry.name or cls.name or cls.__name__
    if not re.match(_NAME_RE, name):
        raise fail(f"rule class name {name!r} is not a valid instance name; give the entry a 'name'", "rule")
    return spec_for(rule, name, jobs, entry.severity, entry.action)


def parse_rules(text: str, source: str = "<rules>", fmt: Format | None = None) -> list[RuleSpec]:
    """Parse the text of a rules file; `source` names it in error messages (and, by its
    extension, picks the format unless `fmt` is given)."""
    fmt = fmt or rules_format(source)
    data, root = _parse_toml(text, source) if fmt == "toml" else _parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: line {root.line or 1}: expected a mapping with keys 'defaults' and 'rules', "
            f"got {type(data).__name__}"
        )
    try:
        doc = _File.model_validate(data)
    except ValidationError as exc:
        loc, msg = _problems(exc)[0]
        key = str(loc[0]) if loc else ""
        what = f"unknown key {key!r} (allowed: defaults, rules)" if msg.startswith("Extra inputs") else msg
        if msg.startswith("Extra inputs") and key in _Entry.model_fields:
            # Left at the top, it would apply to nothing: say where it goes instead.
            what += f"; {key!r} belongs to an entry of 'rules:', e.g. rules: [{{rule: ExplodingTensor, {key}: ...}}]"
        if msg.startswith("Extra inputs") and key == "jobs":
            what += "; to restrict a whole worker to some jobs, use `tensorpulse stream --jobs`"
        raise ConfigError(f"{source}: line {root.key_line(key) or 1}: {key}: {what}") from exc

    near = Path(source).resolve().parent if Path(source).suffix else None
    items = root.child("rules")
    specs: list[RuleSpec] = []
    seen: dict[str, tuple[int, _Where]] = {}
    for i, raw in enumerate(doc.rules or ()):
        pos = items.item(i)
        where = f"{source}: rules[{i}]"
        spec = _entry_spec(raw, pos, where, near)
        if spec.name in seen:
            j, other = seen[spec.name]
            raise ConfigError(
                f"{where}, line {pos.key_line('name')}: duplicate rule name {spec.name!r} "
                f"(also rules[{j}], line {other.line}); give one a 'name'"
            )
        seen[spec.name] = (i, pos)
        specs.append(spec)

    if not doc.defaults:
        return specs
    # An entry named like a default rule replaces it in place; the others follow the defaults.
    by_name = {s.name: s for s in specs}
    defaults = [by_name.get(d.name, d) for d in default_specs()]
    replaced = {d.name for d in defaults}
    return defaults + [s for s in specs if s.name not in replaced]


def load_rules(path: str | Path | None) -> list[RuleSpec]:
    """The rule specs of a rules file (YAML, or TOML for `.toml`); the default set when `path` is None."""
    if path is None:
        return default_specs()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the rules file: {exc}") from exc
    return parse_rules(text, str(path))


def describe(specs: Iterable[RuleSpec]) -> str:
    """A readable listing of specs grouped by job pattern (for `tensorpulse rules --check`)."""
    groups: dict[str | None, list[RuleSpec]] = {}
    for spec in specs:
        groups.setdefault(None if spec.jobs is None else spec.jobs.pattern, []).append(spec)
    lines = []
    for pattern in sorted(groups, key=lambda p: (p is not None, p or "")):
        members = groups[pattern]
        lines.append("every job:" if pattern is None else f"jobs matching {pattern!r}:")
        width = max(len(s.name) for s in members)
        for s in members:
            params = s.rule.params.model_dump(exclude_defaults=True)
            args = ", ".join(f"{k}={v!r}" for k, v in params.items())
            extra = f", action {s.action}" if s.action != "none" else ""
            lines.append(f"  {s.name:<{width}}  {rule_origin(type(s.rule))}({args})  [{s.severity}{extra}]")
    return "\n".join(lines)


__all__ = [
    "ACTIONS",
    "SEVERITIES",
    "RuleSpec",
    "default_specs",
    "describe",
    "load_rules",
    "parse_rules",
    "rules_for_job",
    "rules_format",
    "spec_for",
]
