"""The stream's job store: entries per (job, rank) and per job-level rule, bounded whatever the job's size."""

from __future__ import annotations

import json
import math
import random

from tensorpulse import wire
from tensorpulse.rules import RankDivergence, default_rules
from tensorpulse.rules.config import RuleSpec
from tensorpulse.rules.testing import make_record, make_stats
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.stream.state import MAX_ENTRY_BYTES, JobStore, MemoryStore, StoredSchemas, spec_digest


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


def _run_store(ev: JobEvaluator, records, store: MemoryStore, rejected: set[str] | None = None) -> list:
    """The worker's path: load the record's rank, process, save (JSON in between, as RocksDB does).

    Rules whose entry was over the limit go into `rejected` (none are allowed without it)."""
    out = []
    for r in records:
        js = JobStore(store, ev.specs)
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
