"""The replay driver over encoded payloads: the worker's evaluator, the codec, no Kafka."""

from __future__ import annotations

import io
import math

import numpy as np

from tensorpulse import wire
from tensorpulse.replay import Payload, Progress, format_event, format_summary, replay
from tensorpulse.rules.config import load_rules, parse_rules

JOB = "unit-replay"
UNITS = 10
RULES = """
defaults: false
rules:
  - rule: ExplodingTensor
  - rule: DeadRelu
"""
RAISED = """
defaults: false
rules:
  - rule: ExplodingTensor
  - rule: DeadRelu
    params: {threshold_layer: 90}
"""


def payload(
    step: int,
    *,
    loss: float = 1.0,
    dead: int = 0,
    rank: int = 0,
    job: str = JOB,
    announce: bool | None = None,
    kind: str = "step",
) -> bytes:
    """One encoded record: a loss and one ReLU output of UNITS units, `dead` of them never active."""
    block = wire.TensorBlock(
        names=["1/relu_output"],
        collections=["activations"],
        n=np.array([64 * UNITS]),
        floats=np.array([[0.5, 0.2, 0.0, 2.0, 0.5]], dtype=np.float32),
        zeros=np.array([64 * dead]),
        activity={0: [UNITS] + [dead] * 5},
    )
    return wire.encode(
        job=job,
        rank=rank,
        world=2,
        step=step,
        mode="train",
        ts=1000.0 + step,
        seq=step,
        kind=kind,
        scalars={"loss": loss},
        tensors=block,
        announce=(step == 0) if announce is None else announce,
    )


def faulty_run(steps: int = 20) -> list[bytes]:
    """Loss is inf at steps 7 and 8; from step 12, 8 of 10 ReLU units are dead."""
    return [
        payload(s, loss=math.inf if s in (7, 8) else 1.0 / (s + 1), dead=8 if s >= 12 else 0)
        for s in range(steps)
    ]


def transitions(r) -> list[tuple[str, str, int, int]]:
    return [(e.rule, e.status, e.step, e.rank) for e in r.events]


def test_rules_fire_and_resolve_at_the_fault_steps() -> None:
    """ExplodingTensor fires at 7 and resolves at 9; DeadRelu fires at 12 and is still firing at the end."""
    r = replay(faulty_run(), JOB, parse_rules(RULES))
    assert transitions(r) == [
        ("ExplodingTensor", "firing", 7, 0),
        ("ExplodingTensor", "resolved", 9, 0),
        ("DeadRelu", "firing", 12, 0),
    ]
    s = r.summary()
    assert (s.records_read, s.records_evaluated, s.steps, s.first_step, s.last_step) == (20, 20, 20, 0, 19)
    assert s.alerts == {
        "ExplodingTensor": {"firing": 1, "resolved": 1},
        "DeadRelu": {"firing": 1, "resolved": 0},
    }
    assert s.still_firing == [("DeadRelu", 0)] and s.decode_errors == {}


def test_raised_threshold_does_not_fire() -> None:
    """With DeadRelu's threshold_layer raised above the dead fraction (80 %), only ExplodingTensor fires."""
    r = replay(faulty_run(), JOB, parse_rules(RAISED))
    assert {e.rule for e in r.events} == {"ExplodingTensor"}
    assert "DeadRelu" not in r.summary().alerts


def test_default_rules_when_no_file() -> None:
    """load_rules(None) is the default set, and its ExplodingTensor catches the inf loss at step 7."""
    r = replay(faulty_run(), JOB, load_rules(None))
    assert ("ExplodingTensor", "firing", 7, 0) in transitions(r)
    assert len(r.specs) == len(load_rules(None))


def test_undecodable_payloads_are_counted_not_fatal() -> None:
    """Garbage, a wrong key, another job's record and an unannounced schema are counted by reason."""
    good = faulty_run()
    bad = [
        Payload(b"\xc1", partition=0, offset=3),
        Payload(payload(3), key=b"someone-else"),
        payload(4, job="other-job", announce=True),
        payload(5, rank=1, announce=False),
    ]
    r = replay(good[:6] + bad + good[6:], JOB, parse_rules(RULES))
    s = r.summary()
    assert s.decode_errors == {"not_msgpack": 1, "wrong_key": 1, "job_mismatch": 1, "unknown_schema": 1}
    assert s.records_read == 24 and s.records_evaluated == 20
    assert ("ExplodingTensor", "firing", 7, 0) in transitions(r)
    assert r.error_samples[0].startswith("partition 0 offset 3:")


def test_from_step_reads_but_does_not_evaluate_earlier_records() -> None:
    """From step 10: the step-7 explosion is not evaluated, the schema announced at step 0 is still known."""
    r = replay(faulty_run(), JOB, parse_rules(RULES), from_step=10)
    assert transitions(r) == [("DeadRelu", "firing", 12, 0)]
    s = r.summary()
    assert s.records_evaluated == 10 and s.decode_errors == {}


def test_ranks_are_replayed_separately() -> None:
    """A sick rank 1 fires on its own; the healthy rank 0 neither fires nor masks it."""
    run = []
    for s in range(6):
        run.append(payload(s, rank=0))
        run.append(payload(s, rank=1, dead=9 if s >= 3 else 0))
    r = replay(run, JOB, parse_rules(RULES))
    assert transitions(r) == [("DeadRelu", "firing", 3, 1)]
    assert r.summary().ranks == [0, 1]


def test_replay_is_deterministic_and_uses_record_times() -> None:
    """Two replays give the same alert ids; an alert's time is its record's creation time."""
    a = replay(faulty_run(), JOB, parse_rules(RULES))
    b = replay(faulty_run(), JOB, parse_rules(RULES))
    assert [e.id for e in a.events] == [e.id for e in b.events]
    assert [e.ts for e in a.events] == [1007.0, 1009.0, 1012.0]


def test_end_records_are_counted_not_evaluated() -> None:
    """An end record counts as read and as an end, never as a step."""
    r = replay([*faulty_run(3), payload(2, kind="end")], JOB, parse_rules(RULES))
    s = r.summary()
    assert (s.records_read, s.end_records, s.steps, s.records_evaluated) == (4, 1, 3, 3)


def test_text_output_names_steps_rules_and_counts() -> None:
    """The transition lines and the summary show the step, the rule, and the per-rule counts."""
    r = replay(faulty_run(), JOB, parse_rules(RULES))
    lines = [format_event(e) for e in r.events]
    assert "step      7" in lines[0] and "ExplodingTensor" in lines[0] and "FIRING" in lines[0]
    assert "resolved" in lines[1]
    text = "\n".join(format_summary(r.summary(), complete=False))
    assert "records read      20" in text and "DeadRelu x1" in text and "INCOMPLETE" in text


def test_progress_prints_a_line_every_n_records_off_a_terminal() -> None:
    """Off a TTY, progress is a line per `every` records read, with the expected total."""
    out = io.StringIO()
    p = Progress("replay j", every=10, stream=out)
    for n in (5, 12, 19, 25):
        p(n, 100)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("replay j: 12 records of ~100 read")
