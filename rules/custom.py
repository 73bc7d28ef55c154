"""Rules beyond the catalogue: tensorpulse's declarative rule, installed plugins, and user classes.

A rules file names a rule in one of three ways, tried in this order:

1. a catalogue name (`VanishingGradient`, or `Threshold`, the declarative rule);
2. a name registered by an installed package in the entry-point group `tensorpulse.rules`
   (`[project.entry-points."tensorpulse.rules"] GradNormSpike = "my_rules:GradNormSpike"`);
3. a reference `module:Class` (`my_rules:GradNormSpike`), imported from the Python path of the
   process that loads the rules file (so the worker needs the module on its PYTHONPATH).

Whatever the route, the class must subclass `tensorpulse.rules.Rule`; every failure is a
ConfigError that says what is wrong and what to do, raised when the rules file is loaded.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import json
import traceback
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tensorpulse.errors import ConfigError
from tensorpulse.wire import MODES

from .base import SEVERITIES, Rule, state_mismatch

#: The entry-point group packages use to register rules by name.
ENTRY_POINT_GROUP = "tensorpulse.rules"

def builtin_rules() -> dict[str, type[Rule]]:
    """Catalogue name -> class for everything tensorpulse itself ships (read live from REGISTRY)."""
    from . import REGISTRY

    return dict(REGISTRY)


def entry_point_rules() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Name -> entry points registered in the `tensorpulse.rules` group (several if packages clash)."""
    out: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, []).append(ep)
    return out


def rule_origin(cls: type[Rule]) -> str:
    """How a rules file names `cls`: its catalogue name if tensorpulse ships it, else `module:Class`."""
    if builtin_rules().get(cls.name) is cls:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_rule(name: str, near: Path | None = None) -> type[Rule]:
    """The rule class a rules file means by `name`; ConfigError saying what to do if there is none.

    `near` is the rules file's directory: when a `module:Class` module cannot be imported but a
    file of that name sits there, the error says to put that directory on PYTHONPATH.
    """
    if ":" in name:
        return check_rule_class(load_reference(name, near), repr(name))
    builtin = builtin_rules()
    if name in builtin:
        return builtin[name]
    plugins = entry_point_rules()
    if name in plugins:
        return check_rule_class(load_entry_point(name, plugins[name]), f"entry point {name!r}")
    raise _unknown(name, [*builtin, *plugins])


def _unknown(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = [lowered[k] for k in difflib.get_close_matches(name.lower(), lowered, n=3, cutoff=0.6)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    module, dot, attr = name.rpartition(".")
    if not close and dot and module and attr:
        hint = f"; for a Python class write 'module:Class', e.g. {f'{module}:{attr}'!r}"
    return ConfigError(
        f"unknown rule {name!r}{hint} (known rules: {', '.join(sorted(known))}; "
        f"a Python class is named 'module:Class', e.g. 'my_rules:GradNormSpike')"
    )


def load_entry_point(name: str, eps: list[importlib.metadata.EntryPoint]) -> Any:
    """Load the one entry point called `name`; ConfigError if packages clash or it fails to import."""
    if len(eps) > 1:
        where = ", ".join(f"{_dist(ep)} ({ep.value})" for ep in eps)
        raise ConfigError(
            f"rule {name!r} is registered by more than one installed package in {ENTRY_POINT_GROUP!r}: "
            f"{where}; uninstall one, or name the class directly as 'module:Class'"
        )
    ep = eps[0]
    try:
        return ep.load()
    except Exception as exc:
        raise ConfigError(
            f"rule {name!r}: entry point {ep.value!r} of package {_dist(ep)} failed to load: "
            f"{_describe(exc)}; fix or reinstall that package"
        ) from exc


def _dist(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "(unknown package)"


def load_reference(ref: str, near: Path | None = None) -> Any:
    """Import `module:attr` (attr may be dotted) and return the attribute."""
    module_name, _, attr = ref.partition(":")
    parts = attr.split(".")
    if not _dotted(module_name) or not all(p.isidentifier() for p in parts):
        raise ConfigError(
            f"rule {ref!r}: expected 'module:Class' (a dotted module path, a colon, a class name), "
            "e.g. 'my_rules:GradNormSpike'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"rule {ref!r}: cannot import module {module_name!r}: it is not on the Python path"
                f"{_path_hint(module_name, near)}"
            ) from exc
        raise ConfigError(
            f"rule {ref!r}: importing module {module_name!r} failed: {_describe(exc)}; "
            f"install {exc.name!r} where the worker runs"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"rule {ref!r}: importing module {module_name!r} raised {_describe(exc)}; fix the module"
        ) from exc
    obj: Any = module
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = ".".join([module_name, *parts[:i]])
            rules = _rule_classes(obj) if i == 0 else []
            close = difflib.get_close_matches(part, rules or dir(obj), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            found = f" (Rule subclasses there: {', '.join(rules)})" if rules else ""
            where = getattr(module, "__file__", None) or module_name
            raise ConfigError(
                f"rule {ref!r}: {owner} ({where}) has no attribute {part!r}{hint}{found}"
            ) from None
    return obj


def _dotted(name: str) -> bool:
    return bool(name) and all(p.isidentifier() for p in name.split("."))


def _rule_classes(module: Any) -> list[str]:
    return sorted(
        n
        for n, v in vars(module).items()
        if inspect.isclass(v) and issubclass(v, Rule) and v is not Rule and v.__module__ == module.__name__
    )


def _path_hint(module_name: str, near: Path | None) -> str:
    top = module_name.split(".")[0]
    if near is not None and ((near / f"{top}.py").is_file() or (near / top / "__init__.py").is_file()):
        return (
            f"; {top!r} is next to the rules file: start the worker with PYTHONPATH={near} "
            "(or install it as a package)"
        )
    return "; add its directory to PYTHONPATH where the worker runs, or install the package that provides it"


def _describe(exc: BaseException) -> str:
    """`Type: message`, plus the file and line inside the user's code where it was raised."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename]
    if user:
        return f"{text} ({user[-1].filename}:{user[-1].lineno})"
    return text


def check_rule_class(obj: Any, what: str) -> type[Rule]:
    """`obj` if it is a usable Rule subclass; ConfigError saying what is missing otherwise."""
    if not inspect.isclass(obj) or not issubclass(obj, Rule):
        kind = type(obj).__name__ if not inspect.isclass(obj) else f"class {obj.__name__}"
        raise ConfigError(
            f"rule {what}: is a {kind}, not a rule; a rule is a subclass of tensorpulse.rules.Rule "
            "with a Params model and an update(state, record) method"
        )
    if obj is Rule:
        raise ConfigError(f"rule {what}: is the base class itself; name your subclass of it")
    problems = []
    if obj.update is Rule.update:
        problems.append("implement update(self, state, record) -> (state, Finding | None)")
    if not (inspect.isclass(obj.Params) and issubclass(obj.Params, BaseModel)):
        problems.append("set Params to a subclass of tensorpulse.rules.RuleParams")
    if not obj.modes or not set(obj.modes) <= set(MODES):
        problems.append(f"set modes to a non-empty subset of {set(MODES)} (got {obj.modes!r})")
    if obj.severity not in SEVERITIES:
        problems.append(f"set severity to one of {', '.join(SEVERITIES)} (got {obj.severity!r})")
    if problems:
        raise ConfigError(f"rule {what} ({obj.__module__}.{obj.__qualname__}): {'; '.join(problems)}")
    return obj


def check_initial_state(rule: Rule) -> None:
    """Fail at start-up, not mid-stream, if a rule's initial state cannot be stored as JSON or
    does not match the rule's declared `State` (the worker would take every stored state for one
    of another layout)."""
    try:
        state = rule.initialize()
        if not isinstance(state, dict):
            raise TypeError(f"it returned a {type(state).__name__}, not a dict")
        json.dumps(state, allow_nan=True)
        problem = state_mismatch(rule, state)
        if problem is not None:
            raise TypeError(f"it does not match the rule's declared State at {problem}")
    except Exception as exc:
        raise ConfigError(
            f"rule {rule.name or type(rule).__name__}: initialize() must return a JSON-serialisable dict "
            f"(the worker stores rule state as JSON): {type(exc).__name__}: {exc}"
        ) from exc


__all__ = [
    "ENTRY_POINT_GROUP",
    "builtin_rules",
    "check_initial_state",
    "check_rule_class",
    "entry_point_rules",
    "load_entry_point",
    "load_reference",
    "resolve_rule",
    "rule_origin",
]
