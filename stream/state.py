"""A job's state in the stream store: small entries per (job, rank) and per job-level rule.

Why not one document per job (as before): its size grew with the job's ranks (slots
`<rule>|<rank>`), and at about 1,000 ranks one state record passed Kafka's 1 MB message limit, the
changelog produce failed and the worker crash-looped. Here every entry is bounded by the rule set,
not by the job's size:

| entry key            | holds                                                               |
|----------------------|---------------------------------------------------------------------|
| `rank:<r>`           | the slots of the per-rank rules (not clock rules) of rank r          |
| `clock:<r>`          | the slots of the clock rules of rank r (read by every tick)          |
| `job:<rule>`         | the one slot of a cross-rank rule (kind CROSS_RANK)                  |
| `ranks`              | the ranks seen, a hex bitmap (what a tick or a job summary iterates) |
| `ended`              | rank -> wall time of its end record                                  |
| `src:<partition>`    | the last source offset processed (the intake's copies are deduplicated) |
| `schema:<r>:<id>`, `schemas:<r>` | announced tensor names, and rank r's schema ids (for removal) |
| `scalars`            | keys of the scalar names admitted (stream/scalars.py; max_scalars_per_job) |

Inside an entry a slot is keyed `<rule name>#<digest of its class and parameters>`: a rule whose
threshold changed starts from a fresh state instead of reading state made under other
parameters. An entry whose packed size would exceed `max_entry_bytes` is not written: the slots in
it are reset (the rule starts over at the next record), the worker counts it in
`tensorpulse_state_too_large_total{rule}` and says so once per rule, and every other rule and job
goes on. `JobEvaluator` sees the same `{"r": {"<rule>|<rank>": slot}}` layout as ever: this module
only decides where each slot is stored.

A slot read from the store holds a state some worker wrote, perhaps one running another version
whose rule kept other fields (an upgrade, a rolling restart). Before a rule gets it, the state is
checked against the rule's declared type (`Rule.State`, tensorpulse.rules.base): one that does not
match is replaced by a fresh `initialize()` (the slot's firing flag stays, so an alert that fires
still resolves), and `on_stale(rule, entry key, what differs)` is told (the worker counts it in
`tensorpulse_rule_errors_total{rule, reason="stored_state"}` and logs it at most once a minute per
rule). Without the check such a state reached `update` and raised (the rule was reset at every
record that hit it) or, worse, was misread. The check costs a pydantic validation per slot, so an
entry is checked once per worker per job (`Layout.checked`): entries this worker writes hold
states its own rules made. (The cross-run stream keeps one entry per job outside this module; the
worker checks it the same way with `unstale`.)

The store is the stream engine's (Quix Streams: RocksDB with a changelog topic, keyed by the
message key, i.e. the job); anything with `get/set/delete` works (`MemoryStore` in tests). A store
that also has `get_bytes/set_bytes` must serialise its values with `pack` below (the worker's
RocksDB options do): the rule entries then go through those as bytes, unpacked and packed once per
record by `JobStore` (through `get/set` the store packed every written entry once more, and
`JobStore` packed every read one again to see later whether it changed). An entry this worker wrote
is not even unpacked when read back: the job's `Layout` keeps the value beside its bytes, and a
read that finds the same bytes in the store takes that value (a changed or rolled-back store
holds other bytes, which are unpacked as ever).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, Protocol

import msgpack

from tensorpulse import wire
from tensorpulse.rules.base import Rule, state_mismatch
from tensorpulse.rules.config import RuleSpec

from .evaluator import JOB_SLOT, JobState, is_clock, is_per_rank

#: The largest entry written, in bytes as stored (Kafka's default message limit is 1 MB).
MAX_ENTRY_BYTES = 100 * 1024
#: Entries a job's `Layout` keeps unpacked beside their bytes (each about 10-20 KB of objects with
#: the default rules and 50 tensors): every rank of a job of up to 32 ranks.
MAX_DECODED = 64
#: Slot keys whose entry a job's `Layout` remembers (17 default rules: 60 ranks).
MAX_ROUTES = 1024
#: The entry of a job's admitted scalar names (stream/scalars.py).
SCALARS_KEY = "scalars"
#: Told (rule name, entry key, what differs) of a stored state that did not match its rule's
#: declared `State` and was replaced by a fresh one.
StaleHandler = Callable[[str, str, str], None]


class Store(Protocol):
    """The part of a key-value state (Quix Streams' `State`) this module uses."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...

    def delete(self, key: str) -> None: ...


#: How state values are serialised, in the store and on its changelog (the worker gives these to
#: Quix Streams' RocksDB options). msgpack rather than JSON: NaN and inf survive (rule state holds
#: them: they are data), and a rank's entry of the default rules round-trips in 49 µs instead of
#: 350 µs (50 tensors), the largest cost per record after the rules themselves.
pack = functools.partial(msgpack.packb, use_bin_type=True)
unpack = functools.partial(msgpack.unpackb, raw=False, strict_map_key=False)


class MemoryStore(dict):
    """A `Store` in memory (tests, and anything that evaluates without the stream engine); values
    are kept serialised, as the stream's store keeps them, so a caller never shares an object with it."""

    def get(self, key: str, default: Any = None) -> Any:
        data = super().get(key)
        return default if data is None else unpack(data)

    def set(self, key: str, value: Any) -> None:
        self[key] = pack(value)

    def delete(self, key: str) -> None:
        self.pop(key, None)

    def get_bytes(self, key: str, default: bytes | None = None) -> bytes | None:
        return super().get(key, default)

    def set_bytes(self, key: str, value: bytes) -> None:
        self[key] = value


def spec_digest(spec: RuleSpec) -> str:
    """8 hex digits naming a rule's class and parameters (a change of either starts fresh state)."""
    rule = spec.rule
    params = rule.params.model_dump(mode="json") if rule.params is not None else {}
    text = json.dumps([type(rule).__module__, type(rule).__qualname__, params], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def unstale(rule: Rule, slot: Any) -> tuple[Any, str | None]:
    """(`slot`, None) when its state matches `rule`'s declared State, else (the slot with a fresh
    state, its other fields such as the firing flag kept; what differs)."""
    if not isinstance(slot, dict):
        return {"s": rule.initialize(), "f": False}, f"the slot is a {type(slot).__name__}"
    problem = state_mismatch(rule, slot.get("s"))
    return (slot, None) if problem is None else ({**slot, "s": rule.initialize()}, problem)


class TooLarge(Exception):
    """An entry would exceed the size limit; `rules` are the rules whose slots were in it."""

    def __init__(self, key: str, size: int, rules: Sequence[str]) -> None:
        super().__init__(f"state entry {key!r} of {size} bytes is over the limit")
        self.key, self.size, self.rules = key, size, tuple(rules)


class Layout:
    """Where a rule set's slots go: each rule's slot name (with its digest) and entry group.

    Made once per rule set (the worker keeps one per job): the digests hash every parameter.
    """

    def __init__(self, specs: Sequence[RuleSpec]) -> None:
        self.slot_name = {s.name: f"{s.name}#{spec_digest(s)}" for s in specs}
        self.group = {s.name: ("job" if not is_per_rank(s) else "clock" if is_clock(s) else "rank") for s in specs}
        self.by_slot_name = {v: k for k, v in self.slot_name.items()}
        self.rules: dict[str, Rule] = {s.name: s.rule for s in specs}
        #: Entry keys whose stored states were checked against their rules' declared `State`.
        self.checked: set[str] = set()
        #: Entry key -> (the bytes last written, the value they were packed from), at most
        #: `MAX_DECODED` entries: what `JobStore` reads back unpacked when the store still holds
        #: exactly those bytes (see `JobStore._get`).
        self.decoded: dict[str, tuple[bytes, Any]] = {}
        #: Evaluator slot key ("<rule>|<rank>") -> (group or None, rank, entry key, slot name):
        #: where `JobStore.save` puts it, worked out once per key (at most MAX_ROUTES keys).
        self.routes: dict[str, tuple[str | None, str, str, str]] = {}


class JobStore:
    """Reads and writes one job's rule slots in `store` (the job's key context) for one rule set."""

    def __init__(
        self,
        store: Store,
        rules: Layout | Sequence[RuleSpec],
        *,
        max_entry_bytes: int = MAX_ENTRY_BYTES,
        on_stale: StaleHandler | None = None,
    ) -> None:
        self._store = store
        self.max_entry_bytes = max_entry_bytes
        layout = rules if isinstance(rules, Layout) else Layout(rules)
        self._slot_name, self._group, self._by_slot_name = layout.slot_name, layout.group, layout.by_slot_name
        self._rules, self._checked, self._on_stale = layout.rules, layout.checked, on_stale
        self._decoded, self._routes = layout.decoded, layout.routes
        self.rejected: list[TooLarge] = []  # entries not written by the last `save`
        self._loaded: dict[str, bytes | None] = {}  # entries as read, packed: an unchanged one is not written
        # A store that also has `get_bytes`/`set_bytes` (Quix Streams' State; MemoryStore) and
        # serialises with `pack` (the worker's ROCKSDB_OPTIONS) hands the rule entries over as
        # bytes: each is unpacked once and packed once per record, not once more by the store.
        self._get_bytes = getattr(store, "get_bytes", None)
        self._set_bytes = getattr(store, "set_bytes", None)

    # ------------------------------------------------------------------ small entries
    def _get(self, key: str) -> Any:
        if self._get_bytes is not None:
            data = self._get_bytes(key)
            self._loaded[key] = data
            if data is None:
                return None
            # The value this store wrote last, when the store still holds its bytes: unpacking
            # them gives an equal value (what the rule tester's msgpack round-trip check holds
            # every rule to), at about 20 us a rank entry. Taken out of the cache, because the
            # evaluator changes slots in place: only `save` puts a value back, with its bytes.
            known = self._decoded.pop(key, None)
            if known is not None and (known[0] is data or known[0] == data):
                return known[1]
            return unpack(data)
        value = self._store.get(key)
        # Packed now, because the evaluator changes the slots it is given in place.
        self._loaded[key] = None if value is None else pack(value)
        return value

    def ranks(self) -> list[int]:
        """The ranks seen, ascending (kept as a hex bitmap: 1 KB at 4,096 ranks, cheap to test)."""
        bits = self._rank_bits()
        return [r for r in range(bits.bit_length()) if bits >> r & 1]

    def _rank_bits(self) -> int:
        return int(self._store.get("ranks") or "0", 16)

    def ended(self) -> dict[str, float]:
        return dict(self._get("ended") or {})

    def mark_ended(self, rank: int, when: float) -> dict[str, float]:
        ended = self.ended()
        ended[str(rank)] = when
        self._store.set("ended", ended)
        return ended

    def all_ended(self) -> float | None:
        """When the last rank of the job ended, if every rank seen has ended; else None."""
        ranks, ended = self.ranks(), self.ended()
        if not ranks or not all(str(r) in ended for r in ranks):
            return None
        return max(ended.values())

    def end_all(self, ranks: Sequence[int], when: float) -> None:
        """Mark every rank of `ranks` ended at `when` (a job silent past the idle timeout)."""
        self._store.set("ended", {**self.ended(), **{str(r): when for r in ranks}})

    def resume(self, rank: int) -> None:
        """A record of `rank` after its end: the rank runs again (its state is not to expire)."""
        ended = self._store.get("ended")
        if ended and str(rank) in ended:
            del ended[str(rank)]
            if ended:
                self._store.set("ended", ended)
            else:
                self._store.delete("ended")

    def seen_offset(self, partition: int) -> int:
        """The last source offset processed from the job topic's `partition` (-1: none)."""
        value = self._store.get(f"src:{partition}")
        return -1 if value is None else int(value)

    def set_offset(self, partition: int, offset: int) -> None:
        self._store.set(f"src:{partition}", int(offset))

    # ------------------------------------------------------------------ slots
    def _unstale(self, key: str, name: str, slot: Any) -> tuple[Any, bool]:
        """(`slot`, True), or a copy with a fresh state and False when its stored state does not
        match the rule's declared `State` (see the module docstring)."""
        slot, problem = unstale(self._rules[name], slot)
        if problem is None:
            return slot, True
        if self._on_stale is not None:
            self._on_stale(name, key, problem)
        return slot, False

    def _matches(self, name: str, slot: Any) -> bool:
        return isinstance(slot, dict) and state_mismatch(self._rules[name], slot.get("s")) is None

    def _entry_key(self, group: str, rank: int | str, rule: str) -> str:
        return f"job:{self._slot_name[rule]}" if group == "job" else f"{group}:{rank}"

    def load(self, ranks: Sequence[int], groups: Sequence[str] = ("rank", "clock", "job")) -> JobState:
        """The evaluator's state holding the slots of `ranks` (and the job-level slots) in `groups`."""
        slots: dict[str, Any] = {}
        if "job" in groups:
            for name, group in self._group.items():
                if group == "job":
                    key = self._entry_key("job", JOB_SLOT, name)
                    slot, ok = self._get(key), True
                    if slot is not None:
                        if key not in self._checked:
                            slot, ok = self._unstale(key, name, slot)
                        slots[f"{name}|{JOB_SLOT}"] = slot
                    if ok:  # else: checked again until the fresh state is saved
                        self._checked.add(key)
        for group in groups:
            if group == "job":
                continue
            for rank in ranks:
                key, ok = f"{group}:{rank}", True
                check = key not in self._checked
                for slot_name, slot in (self._get(key) or {}).items():
                    name = self._by_slot_name.get(slot_name)
                    if name is not None:  # else: other parameters, or a rule no longer configured
                        if check:
                            slot, good = self._unstale(key, name, slot)
                            ok = ok and good
                        slots[f"{name}|{rank}"] = slot
                if ok:
                    self._checked.add(key)
        return {"r": slots}

    def save(self, state: JobState, ranks: Sequence[int], groups: Sequence[str] = ("rank", "clock", "job")) -> None:
        """Write back the slots of `ranks` (and job-level slots) in `groups`; see `rejected`."""
        entries: dict[str, dict[str, Any]] = {}
        wanted = {str(r) for r in ranks}
        routes = self._routes
        for key, slot in state.get("r", {}).items():
            route = routes.get(key)
            if route is None:
                route = self._route(key)
                if len(routes) < MAX_ROUTES:
                    routes[key] = route
            group, rank, entry, slot_name = route
            if group is None or group not in groups or (group != "job" and rank not in wanted):
                continue
            if group == "job":
                entries[entry] = slot
            else:
                entries.setdefault(entry, {})[slot_name] = slot
        self.rejected = []
        for key, value in entries.items():
            data = pack(value)
            if len(data) > self.max_entry_bytes:
                rules = [self._by_slot_name[key[4:]]] if key.startswith("job:") else [
                    self._by_slot_name[n] for n in value if n in self._by_slot_name
                ]
                self.rejected.append(TooLarge(key, len(data), rules))
                self._store.delete(key)  # the rules start over rather than keep state they cannot store
                self._decoded.pop(key, None)
                continue
            if self._loaded.get(key) != data:  # a tick that changes nothing writes nothing
                if self._set_bytes is not None:
                    self._set_bytes(key, data)
                else:
                    self._store.set(key, value)
                self._loaded[key] = data
            if self._set_bytes is not None and (len(self._decoded) < MAX_DECODED or key in self._decoded):
                self._decoded[key] = (data, value)

    def _route(self, key: str) -> tuple[str | None, str, str, str]:
        """(group, rank, entry key, slot name) of evaluator slot `key`; group None: not this layout's."""
        name, _, rank = key.rpartition("|")
        group = self._group.get(name)
        if group is None:
            return None, rank, "", ""
        return group, rank, self._entry_key(group, rank, name), self._slot_name[name]

    def add_rank(self, rank: int) -> None:
        """Remember that `rank` exists (a tick and a job summary visit every rank seen)."""
        bits = self._rank_bits()
        if not bits >> rank & 1:
            self._store.set("ranks", format(bits | 1 << rank, "x"))

    def rule_states(self, rule: str, fresh: JobState) -> dict[int, Any]:
        """Rank -> state of per-rank `rule` over every rank seen (`fresh` wins for ranks it holds)."""
        group = self._group[rule]
        out: dict[int, Any] = {}
        for rank in self.ranks():
            slot = fresh["r"].get(f"{rule}|{rank}")
            if slot is None:
                key = f"{group}:{rank}"
                slot = (self._get(key) or {}).get(self._slot_name[rule])
                if slot is not None and key not in self._checked and not self._matches(rule, slot):
                    continue  # another layout: that rank's own next record starts it afresh
            if slot is not None:
                out[rank] = slot["s"]
        return out

    def delete_all(self) -> None:
        """Remove every entry of the job (tombstones on the changelog)."""
        self._decoded.clear()
        for rank in self.ranks():
            self._store.delete(f"rank:{rank}")
            self._store.delete(f"clock:{rank}")
            for sid in self._store.get(f"schemas:{rank}") or []:
                self._store.delete(f"schema:{rank}:{sid}")
            self._store.delete(f"schemas:{rank}")
        for name, group in self._group.items():
            if group == "job":
                self._store.delete(self._entry_key("job", JOB_SLOT, name))
        for key in ("ranks", "ended", SCALARS_KEY):
            self._store.delete(key)


class StoredSchemas(MutableMapping[tuple[str, int, int], Any]):
    """Announced tensor names, cached in memory and persisted in the job's state (`schema:<r>:<id>`)."""

    def __init__(self, store: Store, cache: wire.SchemaCache) -> None:
        self._store, self._cache = store, cache

    @staticmethod
    def _key(key: tuple[str, int, int]) -> str:
        return f"schema:{key[1]}:{key[2]}"

    def __getitem__(self, key: tuple[str, int, int]) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            value = self._store.get(self._key(key))
            if value is None:
                raise
            # As wire.decode makes it, so that what it remembers about the schema is kept too.
            value = wire.Schema(value[0], value[1])
            self._cache[key] = value
            return value

    def __setitem__(self, key: tuple[str, int, int], value: Any) -> None:
        if self._cache.get(key) != value:
            name = self._key(key)
            if self._store.get(name) is None:  # a new schema of this rank: note its id for removal
                index = f"schemas:{key[1]}"
                self._store.set(index, [*(self._store.get(index) or []), key[2]])
            self._store.set(name, [list(value[0]), list(value[1])])
        self._cache[key] = value

    def __delitem__(self, key: tuple[str, int, int]) -> None:
        self._cache.pop(key, None)
        self._store.delete(self._key(key))

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)
