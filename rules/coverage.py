"""Does a rule select anything a job publishes? `tensorpulse rules --check FILE --against JOB`
(the job's topic), or `--against-records RUN` (a recorded run: its records back to back in a file).

A rule whose `tensor_regex` or `collection_names` selects no tensor is silent forever, which
reads like a healthy run: the README's `BigGradients` example, `fc\\d\\.weight`, matched nothing a
`Sequential` model publishes (its gradients are `gradient/0.weight`, ...). The check compares each
rule's selection with the names a job announced on its topic, as the rule would match them:
tensors by collection and regex (re.search); scalars count as collections "losses" and
"metrics" and their names are matched too (LossNotDecreasing, ExplodingTensor read them); named
vectors and inputs (feature importance, tokens, images, labels) are matched by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack

from tensorpulse import wire
from tensorpulse.errors import ConfigError, DecodeError

from .base import compile_regex
from .config import RuleSpec

#: Collections that select scalars (scalars carry no collection on the wire).
SCALAR_COLLECTIONS = frozenset({"losses", "metrics"})


@dataclass(frozen=True)
class Published:
    """The names a job publishes, gathered from its records."""

    #: (collection, name) of every tensor.
    tensors: frozenset[tuple[str, str]] = frozenset()
    scalars: frozenset[str] = frozenset()
    #: Named vectors and captured inputs (feature importance, tokens, images, label counts).
    others: frozenset[str] = frozenset()

    @classmethod
    def of(cls, records: Iterable[wire.StepRecord]) -> Published:
        tensors: set[tuple[str, str]] = set()
        scalars: set[str] = set()
        others: set[str] = set()
        for r in records:
            tensors.update((t.collection, t.name) for t in r.tensors)
            scalars.update(r.scalars)
            for named in (r.vectors, r.tokens, r.images, r.classes):
                others.update(named)
        return cls(frozenset(tensors), frozenset(scalars), frozenset(others))

    def names(self, collections: Sequence[str] | None) -> list[str]:
        """The names a rule selecting `collections` (None: every one) can match, sorted."""
        if collections is None:
            return sorted({n for _, n in self.tensors} | self.scalars | self.others)
        wanted = set(collections)
        out = {n for c, n in self.tensors if c in wanted}
        if wanted & SCALAR_COLLECTIONS:
            out |= self.scalars
        return sorted(out)


@dataclass(frozen=True)
class Miss:
    """A rule parameter that selects nothing the job publishes."""

    rule: str
    parameter: str
    value: str
    #: True when the rules file set the parameter; False for a rule's default (e.g. DeadRelu's
    #: ".*relu_output" on a model without ReLUs: the rule is idle there, by design).
    explicit: bool
    #: A few names the rule could have matched instead.
    examples: tuple[str, ...] = ()

    def format(self, job: str) -> str:
        where = f"{self.rule}: {self.parameter} {self.value} matches nothing job {job!r} publishes"
        hint = f" (it publishes e.g. {', '.join(self.examples)})" if self.examples else " (it publishes none)"
        return where + ("" if self.explicit else ", by the rule's default") + hint


def misses(specs: Iterable[RuleSpec], published: Published, *, shown: int = 4) -> list[Miss]:
    """The rules of `specs` whose `collection_names` or `tensor_regex` select nothing in `published`."""
    out = []
    for spec in specs:
        params = spec.rule.params
        colls = getattr(params, "collection_names", None)
        pattern = getattr(params, "tensor_regex", None)
        explicit = params.model_fields_set
        if colls is not None:
            names = published.names(colls)
            if not names:
                some = tuple(sorted({c for c, _ in published.tensors})[:shown])
                out.append(
                    Miss(
                        spec.name, "collection_names", str(list(colls)), "collection_names" in explicit, some
                    )
                )
                continue
        if pattern is not None:
            names = published.names(colls)
            regex = compile_regex(pattern, "tensor_regex")
            if regex is not None and not any(regex.search(n) for n in names):
                out.append(
                    Miss(
                        spec.name,
                        "tensor_regex",
                        repr(pattern),
                        "tensor_regex" in explicit,
                        tuple(names[:shown]),
                    )
                )
    return out


def recorded_payloads(path: Path) -> list[bytes]:
    """The records of a recorded run: a file of wire records back to back, as a hook whose
    `produce_fn` appends each value to a file writes it (each record is one msgpack value).
    ConfigError names the file and the byte where it stops being msgpack."""
    data = path.read_bytes()
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    out = []
    while unpacker.tell() < len(data):
        start = unpacker.tell()
        try:
            unpacker.skip()
        except Exception as exc:  # OutOfData (cut short), FormatError, StackError: not a recording
            raise ConfigError(
                f"{path}: not a recorded run (wire records back to back) at byte {start}: "
                f"{type(exc).__name__} {exc}".rstrip()
            ) from exc
        out.append(data[start : unpacker.tell()])
    return out


def job_of(payloads: Iterable[bytes]) -> str | None:
    """The job of the first record among `payloads` that decodes (None: none does)."""
    schemas = wire.SchemaCache()
    for payload in payloads:
        try:
            return wire.decode(payload, schemas).job
        except DecodeError:
            continue
    return None


def read_published(payloads: Iterable[bytes | None]) -> tuple[Published, int]:
    """What the records among `payloads` (a job topic's messages) publish, and how many payloads
    did not decode (skipped, as the worker skips them). Records are folded as they come."""
    schemas = wire.SchemaCache()
    bad = 0

    def records() -> Iterator[wire.StepRecord]:
        nonlocal bad
        for payload in payloads:
            try:
                yield wire.decode(payload or b"", schemas)
            except DecodeError:
                bad += 1

    published = Published.of(records())
    return published, bad
