"""The intake's per-job allowance of copies ahead of evaluation (stream/flow.py), without a broker."""

from __future__ import annotations

from tensorpulse.stream.flow import JobFlow, Progress


def _copy(flow: JobFlow, job: str, partition: int, offsets: range) -> None:
    for offset in offsets:
        flow.sent(job)
        flow.acked(job, partition, offset)


def test_room_shrinks_with_copies_in_flight_and_grows_as_the_processor_takes_them() -> None:
    """Copies count until the processor's position passes their steps offset; sent-but-unacknowledged ones count too."""
    progress = Progress()
    flow = JobFlow(10, progress)
    _copy(flow, "big", 3, range(100, 108))
    flow.sent("big")
    assert flow.room("big") == 1
    assert flow.room("other") == 10
    progress.took(3, 103)  # offsets 100-103 evaluated
    assert flow.in_flight("big") == 5
    progress.took(5, 10_000)  # another partition says nothing about this job
    assert flow.in_flight("big") == 5


def test_a_held_job_is_released_at_half_the_allowance() -> None:
    """A job held at its allowance stays held until half of its copies are evaluated, then is released once."""
    progress = Progress()
    flow = JobFlow(10, progress)
    _copy(flow, "big", 0, range(10))
    flow.hold("big", [("tensorpulse.reductions.big", 0)])
    progress.took(0, 3)  # 6 left in flight
    assert flow.released() == []
    progress.took(0, 4)  # 5 left: half
    assert flow.released() == [("big", [("tensorpulse.reductions.big", 0)])]
    assert flow.released() == [] and not flow.held
    assert flow.holds == 1


def test_committed_offsets_release_a_job_another_worker_processes() -> None:
    """With no progress of its own for the partition, the group's committed offsets free the job; a broker error does not."""
    answers: list[object] = [RuntimeError("broker away"), {0: 8}]

    def committed() -> dict[int, int]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    flow = JobFlow(10, Progress(), committed, poll_interval=0.0)
    _copy(flow, "big", 0, range(10))
    flow.hold("big", [("t", 0)])
    assert flow.released() == []  # the broker was away: still held
    assert [job for job, _ in flow.released()] == ["big"]


def test_no_bound_and_failed_copies() -> None:
    """max_ahead 0 never limits; a copy that failed is no longer in flight (it is read again)."""
    flow = JobFlow(0, Progress())
    _copy(flow, "big", 0, range(1000))
    assert flow.room("big") > 1000
    bounded = JobFlow(5, Progress())
    bounded.sent("big")
    bounded.acked("big", None, None)
    assert bounded.in_flight("big") == 0
    bounded.forget("big")
    assert bounded.room("big") == 5
