"""The rule reference (docs/rules.md), generated from the registry so that it cannot drift."""

from __future__ import annotations

import inspect

from pydantic.fields import FieldInfo

from . import REGISTRY, default_rules, measured
from .base import Rule

HEADER = """# Rule reference

Generated from the rule registry by `tensorpulse rules --markdown > docs/rules.md`; a unit test
fails when this file is out of date. Names and parameter names follow SageMaker Debugger's
built-in rules; where our definition differs from a literal reading of its documentation, the
rule's text says how and why (see also `../shared/spec/rules.md` in the project workspace).

Select rules and parameters with a rules file (`tensorpulse stream --rules rules.yaml`):

```yaml
defaults: true              # the rules below, with their defaults
rules:
  - rule: LossNotDecreasing
    params: {num_steps: 20, patience: 3}
  - rule: ExplodingTensor
    action: stop            # ask the job to stop when it fires
```

Regex parameters (`tensor_regex`, `labels_regex`, a rules entry's `jobs`, ...) are searched
anywhere in the name, like Python's `re.search`, but run with RE2 (the `google-re2` package, in
the `stream` extra) so that matching takes time linear in the name whatever the pattern: names
come from whoever writes a job's records. RE2 has no backreferences or lookarounds; a pattern
using them is refused when the rules load (and by `tensorpulse rules --check`), naming the rule,
the parameter and the pattern.
"""


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (a `|` would end the cell, even inside code)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _default_text(field: FieldInfo) -> str:
    """A parameter's default as code, or `required` (a rules file must give it)."""
    if field.is_required():
        return "required"
    return repr(field.get_default(call_default_factory=True))


def signature(cls: type[Rule]) -> str:
    """`Name(param=default, ...)` as `tensorpulse rules` lists it; a parameter without a default
    shows as `param=<required>`."""
    params = ", ".join(
        f"{name}=<required>" if f.is_required() else f"{name}={_default_text(f)}"
        for name, f in cls.Params.model_fields.items()
    )
    return f"{cls.name or cls.__name__}({params})"


def _params_table(cls: type[Rule]) -> list[str]:
    fields = cls.Params.model_fields
    if not fields:
        return ["No parameters.", ""]
    lines = ["| parameter | default | meaning |", "|---|---|---|"]
    for name, f in fields.items():
        default = "required" if f.is_required() else f"`{_cell(_default_text(f))}`"
        lines.append(f"| `{name}` | {default} | {_cell(f.description or '')} |")
    return [*lines, ""]


HELD_OUT = """## False alarms and faults caught, on the held-out corpus

The default rule set on real small CPU trainings (`tests/heldout.py`: the real TorchHook, the
worker's evaluator): six healthy runs of different shapes (a noisy minibatch loss, a warm-up then
cosine decay to a floor, a plateau that then improves, fine-tuning, an oscillating loss, frozen
layers), where any alert is a false alarm, and faulty runs, each of which the rule that names it
must catch. "runs, alerts": healthy runs with an alert, and alerts in all (an alert that
resolves and fires again counts twice). Regenerate with `python tests/heldout.py --write-docs`;
`tests/unit/test_heldout.py` fails when these figures are no longer what the corpus gives.
"""


def render() -> str:
    """The whole reference as markdown."""
    out = [HEADER, HELD_OUT, *measured.ROWS, ""]
    defaults = {rule.name for rule in default_rules()}
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        doc = inspect.cleandoc(cls.__doc__ or "")
        summary, _, body = doc.partition("\n")
        out += [f"## {name}", "", summary, ""]
        default = "yes" if name in defaults else "no (select it in a rules file)"
        out += [f"- in the default rule set: {default}"]
        out += [f"- modes: {', '.join(sorted(cls.modes))}", f"- severity: {cls.severity}"]
        out += [f"- the hook must capture: {cls.needs}" if cls.needs else "", ""]
        out += _params_table(cls)
        if body.strip():
            out += [body.strip(), ""]
    return "\n".join(out).rstrip() + "\n"
