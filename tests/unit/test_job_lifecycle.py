"""A job's end resolves its alerts: the evaluator, the job's store entries, and what notify re-sends."""

from __future__ import annotations

from typing import Any, ClassVar

from tensorpulse.rules.base import Finding, Rule, RuleParams
from tensorpulse.rules.config import RuleSpec
from tensorpulse.sinks.alertmanager import AlertmanagerSink, rfc3339
from tensorpulse.sinks.http import JsonPoster
from tensorpulse.sinks.prometheus import WorkerMetrics
from tensorpulse.stream.evaluator import JobEvaluator
from tensorpulse.stream.state import JobStore, MemoryStore
from tensorpulse.wire import StepRecord


class LossAbove(Rule):
    """Test rule: fires while the loss is above 1 (per rank)."""

    name = "LossAbove"

    class Params(RuleParams):
        threshold: float = 1.0

    def initialize(self):
        return {}

    def update(self, state, record):
        return state, Finding(record.scalars["loss"] > self.params.threshold, value=record.scalars["loss"])


class AnyRankHigh(Rule):
    """Test rule: one job-level slot over every rank; fires while the newest record's loss is above 1."""

    name = "AnyRankHigh"
    per_rank: ClassVar[bool] = False

    def initialize(self):
        return {}

    def update(self, state, record):
        return state, Finding(record.scalars["loss"] > 1.0, value=record.scalars["loss"])


def _rec(step: int, loss: float, rank: int = 0, kind: str = "step") -> StepRecord:
    """A train step of `job` (world 2); an end record is in mode "global", as the hook sends it."""
    mode = "train" if kind == "step" else "global"
    return StepRecord("job", rank, 2, step, mode, float(step), kind=kind, scalars={"loss": loss})


def _evaluator() -> JobEvaluator:
    return JobEvaluator(
        [
            RuleSpec("loss-high", LossAbove(), None, "warning", "none"),
            RuleSpec("any-high", AnyRankHigh(), None, "critical", "none"),
        ]
    )


def test_a_rank_end_resolves_that_ranks_alerts_only() -> None:
    """Rank 0's end record resolves the per-rank alert of rank 0; rank 1's and the job-level alert go on."""
    ev = _evaluator()
    state = None
    for rank in (0, 1):
        state, _ = ev.process(state, _rec(5, 3.0, rank=rank))
    assert JobEvaluator.firing(state) == [("any-high", 0), ("loss-high", 0), ("loss-high", 1)]
    state, out = ev.process(state, _rec(9, 0.0, rank=0, kind="end"))
    assert [(t.event.rule, t.event.rank, t.event.status, t.event.step) for t in out] == [
        ("loss-high", 0, "resolved", 9)
    ]
    assert "rank 0 finished" in out[0].event.message
    assert JobEvaluator.firing(state) == [("any-high", 0), ("loss-high", 1)]


def test_end_job_resolves_everything_still_firing_once() -> None:
    """end_job resolves per-rank and job-level alerts, naming the step and mode each fired at; a second
    call says nothing."""
    ev = _evaluator()
    state = None
    state, _ = ev.process(state, _rec(3, 0.5, rank=0))
    state, _ = ev.process(state, _rec(4, 2.0, rank=1))
    state, out = ev.end_job(state, "job", 100.0, reason="no record for 3600 s")
    got = sorted((t.event.rule, t.event.rank, t.event.status, t.event.step, t.event.mode) for t in out)
    assert got == [("any-high", 1, "resolved", 4, "train"), ("loss-high", 1, "resolved", 4, "train")]
    assert all("no record for 3600 s" in t.event.message and t.action == "none" for t in out)
    assert JobEvaluator.firing(state) == []
    state, again = ev.end_job(state, "job", 200.0, reason="again")
    assert again == []


def test_each_firing_episode_resolves_with_its_own_id() -> None:
    """A job that fires, ends, resumes and fires again gets two resolved events with different ids
    (a forwarder that drops repeated ids must not drop the second)."""
    ev = _evaluator()
    state, _ = ev.process(None, _rec(1, 5.0))
    state, first = ev.end_job(state, "job", 10.0, reason="idle")
    state, _ = ev.process(state, _rec(50, 5.0))
    state, second = ev.end_job(state, "job", 20.0, reason="idle")
    ids = {t.event.id for t in first} | {t.event.id for t in second}
    assert len(first) == len(second) == 2 and len(ids) == 4


def test_store_knows_when_every_rank_ended_and_a_resumed_rank_runs_again() -> None:
    """all_ended is the last end time once every seen rank ended; a later record of a rank undoes its end."""
    store = JobStore(MemoryStore(), _evaluator().specs)
    store.add_rank(0)
    store.add_rank(1)
    store.mark_ended(0, 5.0)
    assert store.all_ended() is None
    store.mark_ended(1, 7.0)
    assert store.all_ended() == 7.0
    store.resume(1)
    assert store.all_ended() is None and store.ended() == {"0": 5.0}
    store.end_all([0, 1], 9.0)
    assert store.all_ended() == 9.0


class RecordingPoster(JsonPoster):
    """A poster that keeps the batches instead of sending them."""

    def __init__(self) -> None:
        super().__init__("http://am.invalid:9093/api/v2/alerts")
        self.batches: list[Any] = []

    def post(self, body: Any) -> Any:  # type: ignore[override]
        self.batches.append(body)


def test_notify_stops_re_sending_once_the_job_ended() -> None:
    """The end's resolved events, fed to notify's Alertmanager sink, resolve what fired (endsAt = now,
    the labels it fired with) and leave nothing to re-post."""
    ev, poster = _evaluator(), RecordingPoster()
    sink = AlertmanagerSink([poster], resend_interval=60.0)
    state, fired = ev.process(None, _rec(5, 3.0, rank=0), now=100.0)
    sink.add([t.event for t in fired], now=100.0)
    assert len(sink.firing) == 2
    state, out = ev.process(state, _rec(9, 0.0, rank=0, kind="end"), now=200.0)
    state, rest = ev.end_job(state, "job", 200.0, reason="every rank of the job finished")
    sink.add([t.event for t in out + rest], now=200.0)
    resolved = poster.batches[-1]
    assert [a["labels"]["alertname"] for a in resolved] == ["loss-high", "any-high"]
    assert all(a["endsAt"] == rfc3339(200.0) for a in resolved)
    assert [a["labels"] for a in resolved] == [a["labels"] for a in poster.batches[0]]
    assert sink.firing == {} and sink.tick(now=1000.0) == 0


def test_a_job_over_leaves_no_series_behind() -> None:
    """The resolved events are counted, then remove_job leaves no series naming the job."""
    from prometheus_client import generate_latest

    m = WorkerMetrics()
    m.observe(_rec(1, 5.0), 1.0)
    m.alert("job", "loss-high", "warning", "firing", 0)
    m.alert("job", "loss-high", "warning", "resolved", 0)
    assert b'training_job="job"' in generate_latest(m.registry)
    m.remove_job("job")
    assert b'training_job="job"' not in generate_latest(m.registry)


def test_an_ended_jobs_lag_of_zero_does_not_bring_its_series_back() -> None:
    """The lag monitor keeps reading an ended job's topic: a lag of 0 adds no series, records waiting do."""
    m = WorkerMetrics()
    m.observe(_rec(1, 5.0), 1.0)
    m.set_lag("job", 0)
    assert m.registry.get_sample_value("tensorpulse_consumer_lag", {"training_job": "job"}) == 0
    m.remove_job("job")
    m.set_lag("job", 0)
    assert m.registry.get_sample_value("tensorpulse_consumer_lag", {"training_job": "job"}) is None
    m.set_lag("job", 4)
    assert m.registry.get_sample_value("tensorpulse_consumer_lag", {"training_job": "job"}) == 4
