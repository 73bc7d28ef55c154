"""`tensorpulse top`'s view state: records and alert events in, rows and sparklines out (no Kafka, no terminal)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from tensorpulse import wire
from tensorpulse.cli import main
from tensorpulse.errors import DecodeError
from tensorpulse.events import AlertEvent
from tensorpulse.top import (
    ENDED,
    LIVE,
    LOG_SPAN,
    RATE_WINDOW_S,
    SILENT,
    SILENT_AFTER_S,
    TopState,
    sparkline,
)
from tensorpulse.top_feed import header_only, lag_from_metrics
from tensorpulse.top_screen import format_age, jobs_table, series_table

T0 = 1_700_000_000.0


def grad(name: str, l2: float) -> wire.TensorStats:
    """A one-element gradient tensor whose L2 norm is `l2`."""
    return wire.TensorStats(f"gradient/{name}", "gradients", 1, l2, 0.0, l2, l2, abs(l2), 0)


def rec(
    step: int,
    ts: float,
    *,
    job: str = "resnet",
    rank: int = 0,
    world: int = 1,
    mode: str = "train",
    kind: str = "step",
    loss: float | None = None,
    grads: dict[str, float] | None = None,
) -> wire.StepRecord:
    scalars = {} if loss is None else {"loss": loss}
    tensors = tuple(grad(n, v) for n, v in (grads or {}).items())
    return wire.StepRecord(job, rank, world, step, mode, ts, step, kind, scalars, tensors)


def alert(status: str, rule: str = "ExplodingTensor", *, rank: int = 0, step: int = 5, severity: str = "critical",
          job: str = "resnet", mode: str = "train") -> AlertEvent:
    return AlertEvent(job, rule, status, step, mode, severity, rank=rank, ts=T0 + step)


def test_step_rate_age_and_ranks_of_a_steady_job() -> None:
    """41 steps at 2 steps/s: step 40, 2.0 steps/s, the age from the newest record, 1/1 ranks, live."""
    state = TopState().extend(rec(s, T0 + 0.5 * s) for s in range(41))
    (row,) = state.rows(now=T0 + 20 + 1.5)
    assert (row.job, row.state, row.step, row.mode) == ("resnet", LIVE, 40, "train")
    assert row.steps_per_s == pytest.approx(2.0)
    assert row.age_s == pytest.approx(1.5)
    assert (row.ranks, row.world, row.lag, row.firing) == (1, 1, None, ())


def test_steps_per_second_follows_the_recent_window() -> None:
    """A job at 1 step/s that speeds up to 4 steps/s: the rate is that of the last RATE_WINDOW_S of records."""
    records = [rec(s, T0 + s) for s in range(21)] + [rec(20 + i, T0 + 20 + 0.25 * i) for i in range(1, 21)]
    state = TopState().extend(records)
    (row,) = state.rows(now=T0 + 25)
    # The window reaches back to t=15 (step 15): (40 - 15) / (25 - 15).
    assert RATE_WINDOW_S == 10.0 and row.steps_per_s == pytest.approx(2.5)
    assert row.steps_per_s > 40 / 25  # not the whole run's average


def test_a_job_goes_silent_then_ends_then_runs_again() -> None:
    """No record for SILENT_AFTER_S: silent (no rate); every rank's end record: ended; a rank's new step: live."""
    state = TopState().extend(rec(s, T0 + s, rank=r, world=2) for s in range(5) for r in (0, 1))
    assert state.rows(now=T0 + 4 + SILENT_AFTER_S - 1)[0].state == LIVE
    row = state.rows(now=T0 + 4 + SILENT_AFTER_S + 1)[0]
    assert (row.state, row.steps_per_s, row.ranks, row.world) == (SILENT, None, 2, 2)
    state.add_record(rec(4, T0 + 5, rank=0, world=2, mode="global", kind="end"))
    assert state.rows(now=T0 + 6)[0].state == LIVE  # rank 1 still runs
    state.add_record(rec(4, T0 + 5, rank=1, world=2, mode="global", kind="end"))
    row = state.rows(now=T0 + 6)[0]
    assert (row.state, row.step, row.steps_per_s) == (ENDED, 4, None)
    state.add_record(rec(5, T0 + 7, rank=1, world=2))
    assert state.rows(now=T0 + 7)[0].state == LIVE


def test_a_slow_job_is_not_silent_between_its_steps() -> None:
    """Steps 40 s apart: 35 s after the last one the job is still live (three steps' time), silent after 121 s."""
    state = TopState().extend(rec(s, T0 + 40 * s) for s in range(4))
    assert state.rows(now=T0 + 120 + 35)[0].state == LIVE
    assert state.rows(now=T0 + 120 + 121)[0].state == SILENT


def test_firing_rules_come_and_go_with_alert_events() -> None:
    """Firing until resolved, per (rule, rank); the most severe rule first, with the ranks it fires on."""
    state = TopState().extend(
        [
            rec(5, T0 + 5),
            alert("firing", "LossNotDecreasing", severity="warning", step=3),
            alert("firing", rank=0),
            alert("firing", rank=1, step=6),
        ]
    )
    firing = state.rows(now=T0 + 6)[0].firing
    assert [(f.rule, f.severity, f.ranks, f.since_step) for f in firing] == [
        ("ExplodingTensor", "critical", (0, 1), 5),
        ("LossNotDecreasing", "warning", (0,), 3),
    ]
    state.extend([alert("resolved", rank=1, step=8), alert("resolved", "LossNotDecreasing", severity="warning")])
    assert [(f.rule, f.ranks) for f in state.rows(now=T0 + 9)[0].firing] == [("ExplodingTensor", (0,))]
    # A job's end resolves with its end record's mode and step: still the same alert.
    state.add_alert(alert("resolved", rank=0, step=9, mode="global"))
    assert state.rows(now=T0 + 9)[0].firing == ()


def test_series_are_the_last_steps_of_rank_zero_scalars_first() -> None:
    """history=5: the loss and each gradient's L2 over the last 5 steps of rank 0, in the job's tensor order."""
    records = []
    for s in range(8):
        for r in (1, 0):  # rank 1's values differ: they must not show
            g = {"fc2.weight": 10.0 * (s + 1) + r, "fc1.weight": float(s + 1) + r}
            records.append(rec(s, T0 + s, rank=r, world=2, loss=1.0 / (s + 1) + r, grads=g))
    state = TopState(history=5).extend(records)
    series = state.series("resnet")
    assert [(x.name, x.kind) for x in series] == [
        ("loss", "scalar"),
        ("gradient/fc2.weight", "gradients"),
        ("gradient/fc1.weight", "gradients"),
    ]
    assert all(x.steps == (3, 4, 5, 6, 7) for x in series)
    assert series[0].values == pytest.approx([1 / 4, 1 / 5, 1 / 6, 1 / 7, 1 / 8])
    assert series[1].values == pytest.approx([40, 50, 60, 70, 80])
    assert series[2].last == pytest.approx(8.0)
    assert state.series("no-such-job") == []


def test_eval_steps_and_restarts_do_not_mix_with_training() -> None:
    """Eval records leave the train step alone; a train step going back (a rerun) starts the series over."""
    state = TopState().extend([rec(s, T0 + s, loss=1.0) for s in range(10)] + [rec(2, T0 + 10, mode="eval", loss=9.0)])
    row = state.rows(now=T0 + 10)[0]
    assert (row.step, row.mode) == (9, "train")
    assert state.series("resnet")[0].values == (1.0,) * 10
    state.extend(rec(s, T0 + 20 + s, loss=2.0) for s in range(3))
    assert state.rows(now=T0 + 23)[0].step == 2
    assert state.series("resnet")[0].steps == (0, 1, 2)


def test_a_late_record_of_an_earlier_step_is_no_restart() -> None:
    """A producer retry can land step 0's record after step 19's (created earlier, arrived later):
    the row keeps step 19 and its series; only a lower step created later is a rerun."""
    records = [rec(s, T0 + s, loss=float(s)) for s in range(1, 20)] + [rec(0, T0, loss=0.0)]
    state = TopState().extend(records)
    row = state.rows(now=T0 + 20)[0]
    assert row.step == 19 and row.steps_per_s is not None
    assert state.series("resnet")[0].steps == tuple(range(1, 20))[-state.history :]


def test_ranks_a_step_apart_are_no_restart() -> None:
    """Rank 1 a step ahead of rank 0 does not start the series over: all steps stay, the step is the highest."""
    records = []
    for s in range(6):  # rank 1's step s arrives before rank 0's step s - 1
        records.append(rec(s, T0 + s, rank=1, world=2, loss=9.0))
        if s:
            records.append(rec(s - 1, T0 + s - 0.9, rank=0, world=2, loss=float(s - 1)))
    records.append(rec(5, T0 + 5.1, rank=0, world=2, loss=5.0))
    state = TopState().extend(records)
    assert state.rows(now=T0 + 6)[0].step == 5
    assert state.series("resnet")[0].steps == (0, 1, 2, 3, 4, 5)


def test_a_job_without_train_steps_shows_its_own_mode_until_train_comes() -> None:
    """A job that only reports `global` steps shows them with the mode; its first train step takes over."""
    state = TopState().extend(rec(s, T0 + s, mode="global") for s in range(3))
    assert (state.rows(now=T0 + 3)[0].step, state.rows(now=T0 + 3)[0].mode) == (2, "global")
    state.add_record(rec(0, T0 + 4))
    assert (state.rows(now=T0 + 4)[0].step, state.rows(now=T0 + 4)[0].mode) == (0, "train")


def test_lag_and_forgetting_old_jobs() -> None:
    """The lag is the workers' figure where known; a job quiet for longer than forget_after leaves the table."""
    state = TopState(forget_after=600).extend([rec(0, T0, job="a"), rec(0, T0 + 500, job="b")])
    state.set_lag({"a": 12})
    assert [(r.job, r.lag) for r in state.rows(now=T0 + 550)] == [("a", 12), ("b", None)]
    assert [r.job for r in state.rows(now=T0 + 700)] == ["b"]


def test_series_per_job_are_bounded() -> None:
    """A model with more tensors than max_series keeps the first max_series series: memory stays bounded."""
    grads = {f"layer{i}.weight": float(i + 1) for i in range(50)}
    state = TopState(max_series=20).extend(rec(s, T0 + s, grads=grads) for s in range(3))
    assert len(state.series("resnet")) == 20


def test_sparkline_scales() -> None:
    """Linear between min and max; log where positive values span > LOG_SPAN; '!' for NaN/inf; flat when constant."""
    assert sparkline([float(i) for i in range(8)]) == ("▁▂▃▄▅▆▇█", False)
    assert sparkline([1.0, 10.0, 1e3, 1e7]) == ("▁▂▄█", True)
    assert LOG_SPAN == 100.0 and sparkline([1.0, 50.0])[1] is False
    assert sparkline([1.0, math.nan, 3.0, math.inf]) == ("▁!█!", False)
    assert sparkline([2.0, 2.0, 2.0]) == ("▄▄▄", False)
    assert sparkline([math.nan]) == ("!", False)


def test_the_screen_shows_the_rows_and_the_sparklines() -> None:
    """The drawn table carries the job, its step, rate, ranks, age and firing rule; the series table its lines."""
    state = TopState().extend([*(rec(s, T0 + s, grads={"fc.weight": 2.0**s}) for s in range(10)), alert("firing")])
    console = Console(record=True, width=200)
    console.print(jobs_table(state.rows(now=T0 + 11), selected="resnet"))
    console.print(series_table("resnet", state.series("resnet")))
    text = console.export_text()
    assert "resnet" in text and "live" in text and " 9 " in text and "ExplodingTensor" in text
    assert "1/1" in text and format_age(2.0) in text
    assert "gradient/fc.weight" in text and sparkline([2.0**s for s in range(10)])[0] in text and "log" in text


def test_a_record_before_its_schema_announcement_still_counts() -> None:
    """A record whose tensor names were announced before what top read decodes without its tensors."""
    block = wire.TensorBlock(
        ["gradient/fc.weight"], ["gradients"], np.array([4]), np.ones((1, 5), dtype=np.float32), np.zeros(1, np.int64)
    )
    payload = wire.encode(job="resnet", rank=0, world=1, step=7, mode="train", ts=T0, scalars={"loss": 0.5},
                          tensors=block, announce=False)
    with pytest.raises(DecodeError) as exc:
        wire.decode(payload, wire.SchemaCache())
    assert exc.value.reason == "unknown_schema"
    got = wire.decode(header_only(payload), wire.SchemaCache())
    assert (got.step, got.scalars, got.tensors) == (7, {"loss": 0.5}, ())


def test_lag_from_a_workers_metrics() -> None:
    """tensorpulse_consumer_lag{training_job} per job from /metrics text; other series are ignored."""
    text = (
        "# TYPE tensorpulse_consumer_lag gauge\n"
        'tensorpulse_consumer_lag{training_job="a"} 12.0\n'
        'tensorpulse_consumer_lag{training_job="b"} 0.0\n'
        "# TYPE tensorpulse_last_step gauge\n"
        'tensorpulse_last_step{training_job="a",rank="0",mode="train"} 99.0\n'
    )
    assert lag_from_metrics(text) == {"a": 12, "b": 0}


def test_help_states_the_models_thresholds() -> None:
    """`top --help` says the silence threshold, the rate window and the log-scale span the model uses."""
    text = CliRunner().invoke(main, ["top", "--help"], terminal_width=120).output
    assert f"last {SILENT_AFTER_S:g} s" in text and f"last {RATE_WINDOW_S:g} s" in text
    assert f"more than {LOG_SPAN:g}x" in text
    for column in ("JOB", "STATE", "STEP", "STEPS/S", "RANKS", "AGE", "LAG", "FIRING"):
        assert f"\n    {column} " in text


def test_top_refuses_options_that_go_with_once() -> None:
    """--json and --layers without --once, and --since all, are usage errors (exit 2) that say why."""
    result = CliRunner().invoke(main, ["top", "--json"])
    assert result.exit_code == 2 and "go with --once" in result.output
    result = CliRunner().invoke(main, ["top", "--once", "--since", "all"])
    assert result.exit_code == 2 and "--since" in result.output
