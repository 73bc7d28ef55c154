"""The stream's job store: entries per (job, rank) and per job-level rule, bounded whatever the job's size."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
from prometheus_client import CollectorRegistry

from tensorpulse import wire
from tensorpulse.rules import LossNotDecreasing, RankDivergence, default_rules
from tensorpulse.rules.base import state_mismatch
from tensorpulse.rules.config import RuleSpec
from tensorpulse.rules.testing import make_record, make_stats
from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.stream.outcomes import Outcomes
from tensorpulse.stream.published import PublishedAlerts
from tensorpulse.stream.state import (
    MAX_ENTRY_BYTES,
    JobStore,
    Layout,
    MemoryStore,
    StoredSchemas,
    pack,
    spec_digest,
    unpack,
)


def _specs(**rules) -> list[RuleSpec]:
    return (
        [RuleSpec(r.name, r, None, r.severity, "none") for r in rules.values()]
        if rules
        else [RuleSpec(r.name, r, None, r.severity, "none") for r in default_rules()]
    )


def _rec(rank: int, step: int, world: int, *, nan: bool = False, loss: float = 1.0):
    tensors = [
        make_stats(f"{c}/layer{i}", c, [math.nan if nan and i == 1 else 0.5 + 0.01 * rank, 1.0])
        for c in ("gradients", "weights", "activations")
        for i in range(3)
    ]
    r = make_record(step, rank=rank, tensors=tensors, scalars={"loss": loss})
    return r.__class__(**{**{f: getattr(r, f) for f in r.__slots__}, "ts": 100.0 + step, "world": world})


def _run_store(
    ev: JobEvaluator, records, store: MemoryStore, rejected: set[str] | None = None, layout: Layout | None = None
) -> list:
    """The worker's path: load the record's rank, process, save (JSON in between, as RocksDB does).

    Rules whose entry was over the limit go into `rejected` (none are allowed without it). With
    `layout`, one for all records, as the worker keeps one per job."""
    out = []
    for r in records:
        js = JobStore(store, layout if layout is not None else ev.specs)
        js.add_rank(r.rank)
        state = js.load([r.rank])
        state, trs = ev.process(
            state, r, now=r.ts, rank_states=lambda rule, s=state, js=js: js.rule_states(rule, s)
        )
        js.save(state, [r.rank])
        if rejected is None:
            assert not js.rejected
        else:
            rejected.update(rule for x in js.rejected for rule in x.rules)
        out += [t.event for t in trs]
    return out


def _run_whole(ev: JobEvaluator, records) -> list:
    state, out = None, []
    for r in records:
        state, trs = ev.process(state, r, now=r.ts)
        state = json.loads(json.dumps(state))
        out += [t.event for t in trs]
    return out


def test_store_gives_the_same_alerts_as_one_document_per_job() -> None:
    """Default rules over 4 ranks with a NaN on rank 2: per-rank entries change no alert and no detail."""
    ev = JobEvaluator(_specs())
    records = [
        _rec(rank, step, 4, nan=(rank == 2 and step >= 30), loss=2.0 / (1 + step))
        for step in range(40)
        for rank in random.Random(1).sample(range(4), 4)
    ]
    got = _run_store(ev, records, MemoryStore())
    want = _run_whole(ev, records)
    assert [e.to_json() for e in got] == [e.to_json() for e in want]
    assert any(e.rule == "ExplodingTensor" and e.rank == 2 for e in got)


class _ValuesOnly(dict):
    """A Store with get/set/delete alone (no get_bytes/set_bytes), kept packed like the stream's."""

    reads: list[str]

    def get(self, key: str, default: object = None) -> object:
        self.reads.append(key)
        data = super().get(key)
        return default if data is None else unpack(data)

    def set(self, key: str, value: object) -> None:
        self[key] = pack(value)

    def delete(self, key: str) -> None:
        self.pop(key, None)


class _CountingMemoryStore(MemoryStore):
    reads: list[str]

    def get(self, key: str, default: object = None) -> object:
        self.reads.append(key)
        return super().get(key, default)


def test_a_store_with_get_bytes_gets_the_rule_entries_as_bytes_and_holds_the_same() -> None:
    """Through get_bytes/set_bytes (MemoryStore, Quix's State) the rule entries are unpacked and
    packed by JobStore itself: the same alerts and the same stored bytes as through get/set."""
    ev = JobEvaluator(_specs())
    records = [
        _rec(rank, step, 2, nan=(rank == 1 and step in (5, 6, 12)), loss=2.0 / (1 + step))
        for step in range(20)
        for rank in range(2)
    ]
    by_bytes, by_values = _CountingMemoryStore(), _ValuesOnly()
    by_bytes.reads, by_values.reads = [], []
    got = _run_store(ev, records, by_bytes)
    want = _run_store(ev, records, by_values)  # type: ignore[arg-type]
    assert [e.to_json() for e in got] == [e.to_json() for e in want]
    assert [(e.rank, e.step, e.status) for e in got if e.rule == "ExplodingTensor"][:2] == [
        (1, 5, "firing"),
        (1, 7, "resolved"),
    ]
    assert dict(by_bytes) == dict(by_values)
    assert not [k for k in by_bytes.reads if k.startswith(("rank:", "clock:", "job:"))]
    assert [k for k in by_values.reads if k.startswith("rank:")]


def test_an_entry_written_is_read_back_unpacked_only_when_the_store_holds_other_bytes() -> None:
    """One Layout for every record (as the worker keeps one per job): the same alerts and stored
    bytes as through get/set; an entry it wrote comes back as the very value it packed while the
    store holds those bytes, and as stored once the store holds others (a rolled-back transaction)."""
    ev = JobEvaluator(_specs())
    layout = Layout(ev.specs)
    records = [
        _rec(rank, step, 2, nan=(rank == 1 and step in (5, 6, 12)), loss=2.0 / (1 + step))
        for step in range(20)
        for rank in range(2)
    ]
    kept, by_values = MemoryStore(), _ValuesOnly()
    by_values.reads = []
    got = _run_store(ev, records, kept, layout=layout)
    want = _run_store(ev, records, by_values)  # type: ignore[arg-type]
    assert [e.to_json() for e in got] == [e.to_json() for e in want]
    assert dict(kept) == dict(by_values)

    before = kept["rank:0"]
    state = JobStore(kept, layout).load([0])
    ev.process(state, _rec(0, 20, 2), now=120.0)
    JobStore(kept, layout).save(state, [0])
    assert kept["rank:0"] != before
    slot = state["r"]["UnchangedTensor|0"]
    assert JobStore(kept, layout).load([0])["r"]["UnchangedTensor|0"] is slot  # its own write: not unpacked
    JobStore(kept, layout).save(state, [0])
    kept["rank:0"] = before  # the store went back (an aborted transaction): the value it holds now
    again = JobStore(kept, layout).load([0])["r"]["UnchangedTensor|0"]
    assert again is not slot
    assert again == unpack(before)[layout.slot_name["UnchangedTensor"]]


def test_1024_ranks_no_entry_over_the_limit_and_the_nan_rank_is_named() -> None:
    """A 1,024-rank job: every entry stays small, and the alert names the one rank that went NaN."""
    ev = JobEvaluator(_specs())
    store = MemoryStore()
    records = [
        _rec(rank, step, 1024, nan=(rank == 777 and step == 2)) for step in range(3) for rank in range(1024)
    ]
    events = _run_store(ev, records, store)
    sizes = [len(v) for v in dict.values(store)]  # bytes as stored
    assert max(sizes) < MAX_ENTRY_BYTES
    assert JobStore(store, ev.specs).ranks() == list(range(1024))
    firing = [e for e in events if e.rule == "ExplodingTensor" and e.status == "firing"]
    assert [(e.rank, e.step) for e in firing] == [(777, 2)]
    assert firing[0].details["first_nonfinite"]["rank"] == 777


def test_changed_parameters_start_fresh_state() -> None:
    """A slot is keyed by its rule's parameters: another threshold does not read the old state."""
    a = _specs(r=RankDivergence(patience=3))
    b = _specs(r=RankDivergence(patience=4))
    assert spec_digest(a[0]) != spec_digest(b[0]) and spec_digest(a[0]) == spec_digest(
        _specs(r=RankDivergence(patience=3))[0]
    )
    store = MemoryStore()
    ev = JobEvaluator(a)
    _run_store(ev, [_rec(r, 0, 2) for r in range(2)] + [_rec(0, 1, 2)], store)
    assert JobStore(store, a).load([0])["r"]  # the job-level slot is there for the same parameters
    assert not JobStore(store, b).load([0])["r"]  # and not for others


def test_entry_over_the_limit_is_reset_and_reported() -> None:
    """An entry that would pass the limit is not written: its rules are named and start over."""
    specs = _specs(r=RankDivergence(max_pending_steps=256))
    store = MemoryStore()
    js = JobStore(store, specs, max_entry_bytes=2_000)
    state = {"r": {"RankDivergence|*": {"s": {"p": {str(i): "x" * 100 for i in range(50)}}, "f": False}}}
    js.save(state, [0])
    assert [(x.rules, x.size > 2_000) for x in js.rejected] == [(("RankDivergence",), True)]
    assert not store  # nothing written


def test_delete_all_leaves_only_the_source_offsets() -> None:
    """An ended job's state goes (tombstones), but the dedup offsets stay so a late copy is not re-evaluated."""
    ev = JobEvaluator(_specs())
    store = MemoryStore()
    _run_store(ev, [_rec(r, s, 2) for s in range(3) for r in range(2)], store)
    js = JobStore(store, ev.specs)
    schemas = StoredSchemas(store, wire.SchemaCache())
    for rank in range(2):  # names announced by each rank, as the decoder stores them
        schemas[("job", rank, 7)] = (["fc.weight"], ["weights"])
        schemas[("job", rank, 8)] = (["fc.bias"], ["biases"])
    assert store.get("schemas:1") == [7, 8]  # per rank: no entry grows with the job's size
    js.set_offset(0, 41)
    js.mark_ended(0, 1.0)
    js.delete_all()
    assert sorted(store) == ["src:0"] and js.seen_offset(0) == 41 and js.seen_offset(1) == -1


def test_a_stored_state_of_another_layout_starts_fresh_and_is_reported() -> None:
    """A state stored by another version of a rule (other fields) is not handed to the rule: the
    slot gets a fresh state (its firing flag stays, so the alert can resolve), the worker is told
    which rule, entry and field, and the rule goes on without raising. Each entry is checked once."""
    rule = LossNotDecreasing()
    specs = _specs(r=rule)
    ev = JobEvaluator(specs)
    store = MemoryStore()
    old = {"losses": [1.0, 2.0], "count": 3}  # no "last_step", "since", "bad": another layout
    layout = Layout(specs)
    JobStore(store, layout).save({"r": {"LossNotDecreasing|0": {"s": old, "f": True, "a": [4, "train"]}}}, [0])
    told: list[tuple[str, str, str]] = []
    errors: list[str] = []
    js = JobStore(store, layout, on_stale=lambda *a: told.append(a))
    state = js.load([0])
    assert state["r"]["LossNotDecreasing|0"] == {"s": rule.initialize(), "f": True, "a": [4, "train"]}
    assert [(r, k) for r, k, _ in told] == [("LossNotDecreasing", "rank:0")]
    assert told[0][2].startswith("last_step: Field required")
    state, _ = ev.process(state, _rec(0, 5, 1), now=105.0, on_rule_error=lambda name, *_: errors.append(name))
    js.save(state, [0])
    assert not errors and state_mismatch(rule, state["r"]["LossNotDecreasing|0"]["s"]) is None
    assert JobStore(store, layout, on_stale=lambda *a: told.append(a)).load([0]) == state
    assert len(told) == 1  # the fresh state is stored and the entry checked: no second report


def test_a_stale_state_is_counted_by_reason_and_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    """The worker's handler: tensorpulse_rule_errors_total{reason="stored_state"} per report, one
    warning per rule a minute naming the job, rule, entry and field."""
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.init_rules(_specs())
    out = Outcomes(metrics, PublishedAlerts())
    with caplog.at_level(logging.WARNING, logger="tensorpulse.stream"):
        for _ in range(3):
            out.stale_state("job-1", "LossNotDecreasing", "rank:0", "last_step: Field required")
    labels = {"rule": "LossNotDecreasing", "reason": "stored_state"}
    assert metrics.registry.get_sample_value("tensorpulse_rule_errors_total", labels) == 3.0
    raised = {"rule": "LossNotDecreasing", "reason": "raised"}
    assert metrics.registry.get_sample_value("tensorpulse_rule_errors_total", raised) == 0.0
    lines = [r.getMessage() for r in caplog.records if "declared State" in r.getMessage()]
    assert len(lines) == 1 and "job job-1" in lines[0] and "LossNotDecreasing (rank:0)" in lines[0]
