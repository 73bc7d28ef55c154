"""Clock rules in the stream: ticks that travel each job's own partition.

A clock rule (StalledTrainingRule) must fire when *no* record arrives, but a stream processor only
reaches a job's state while it processes a message of that job. So the intake (stream/intake.py),
which reads each job's topic, also sends the job a **tick** every `tick_interval` seconds: a
message on the steps topic keyed by the job, with no value and a header holding the wall time.
The tick lands in the job's partition behind the job's records, so the processor meets it in the
job's own key context and runs `JobEvaluator.check_idle` over the stored clock slots, in the same
transaction as the records: a stall alert is as exactly-once as any other, and a worker that
takes over a partition knows the job's clock slots from the changelog (no in-memory mirror, no
rebalance callbacks).

- **Interval.** A tenth of the smallest clock-rule `threshold`, in [0.05, 60] s (`clock_interval`).
  Without clock rules, ticks still come, rarely (`housekeeping_interval`): they let the processor
  remove an ended job's state once its retention has passed.
- **Horizon.** A job is ticked while its last record (or the intake's taking it over) is less than
  `tick_horizon` seconds old: long enough for every clock rule to fire and for an ended job's
  state to expire; a job silent for longer costs nothing.
- **Finished ranks.** A rank's `kind: end` record marks its clock slots finished: they are not
  ticked, and a firing stall resolves.
- **Silent jobs.** A tick carries how long the job has been silent; past the worker's
  `job_idle_timeout_s` the job counts as ended (its alerts resolve, its state expires). Ticks come
  at least every tenth of the sooner of that timeout and the state retention (`housekeeping_interval`).
- **Identity.** A stall alert names the rank's newest record (step, mode, ts), so every tick that
  sees the same stall gives the same alert id.
The comparison is the hook's clock (record ts) against the worker's: keep them synchronised.
"""

from __future__ import annotations

from collections.abc import Iterable

from tensorpulse.rules.config import RuleSpec

from .evaluator import is_clock

#: Bounds of the timer period, in seconds.
MIN_INTERVAL, MAX_INTERVAL = 0.05, 60.0


def clock_interval(specs: Iterable[RuleSpec]) -> float | None:
    """How often to tick: a tenth of the smallest clock-rule `threshold`, in [0.05, 60] s; None: no clock rule.

    Every followed job gets a tick each interval (a message through the pipeline): with the default
    threshold of 30 minutes that is one a minute, not one every 5 s (at 1,000 jobs, 200 ticks a
    second beside 300 records were a large part of the cost, bench/scaling.py)."""
    clocks = [s for s in specs if is_clock(s)]
    if not clocks:
        return None
    thresholds = [
        float(t)
        for s in clocks
        if isinstance(t := getattr(s.rule.params, "threshold", None), (int, float)) and t > 0
    ]
    tenth = min(thresholds) / 10 if thresholds else MAX_INTERVAL
    return max(MIN_INTERVAL, min(MAX_INTERVAL, tenth))




def clock_thresholds(specs: Iterable[RuleSpec]) -> list[float]:
    """The `threshold` (seconds of silence) of every clock rule in `specs`."""
    return [
        float(t)
        for s in specs
        if is_clock(s) and isinstance(t := getattr(s.rule.params, "threshold", None), (int, float))
    ]


def housekeeping_interval(state_retention_s: float) -> float:
    """How often to tick jobs when no clock rule needs it: a tenth of the retention, in [1, 60] s."""
    return max(1.0, min(60.0, state_retention_s / 10))


def tick_horizon(specs: Iterable[RuleSpec], state_retention_s: float, job_idle_timeout_s: float = 0.0) -> float:
    """Seconds after a job's last record during which it is still ticked (see the module doc):
    long enough for a silent job to reach its idle timeout and then its state's retention."""
    thresholds = clock_thresholds(specs)
    idle = job_idle_timeout_s + state_retention_s if job_idle_timeout_s > 0 else 0.0
    return max([2 * t for t in thresholds] + [state_retention_s, idle]) + 60.0
