"""SIGTERM and SIGINT end a worker within 10 s in the states a broker outage puts it in, and the
next worker publishes no alert of the first one again.

(The start-up backoff, with no broker at all, is tests/unit/test_worker_signals.py.)
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from corpus import good

from tensorpulse.broker import EmbeddedBroker
from tensorpulse.topics import ALERTS_TOPIC, reductions_topic

from .helpers import create_topic, metric_value, read_topic, scrape, wait_for, worker_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: What the worker's log says in each state (the signal is sent once the line is there).
STATES = {
    # the broker went away under a running application: its commits and flushes cannot finish
    "broker away": "intake cannot list topics",
    # the application gave up on the outage and waits before it is built again
    "restart backoff": "restarting from the last commit in",
}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("state", list(STATES))
def test_a_signal_during_an_outage_ends_the_worker_with_its_work_committed(
    tmp_path: Path, unique: str, state: str, sig: signal.Signals
) -> None:
    """Records and an alert before the outage; the broker cut; the signal in `state`: the worker
    exits 0 within 10 s; a second worker, broker back, evaluates a new record and publishes no alert twice."""
    job = f"shutdown-{unique}"
    group = f"g-{unique}"
    with EmbeddedBroker(relay=True, log_path=tmp_path / "broker.log") as broker:
        bootstrap = broker.bootstrap
        assert broker.relay is not None
        from confluent_kafka import Producer

        create_topic(bootstrap, reductions_topic(job))
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        for step in range(10):
            value = good(job, step, announce=step == 0, nan=step == 5, ts=time.time())
            producer.produce(reductions_topic(job), key=job.encode(), value=value)
        assert producer.flush(30) == 0
        log = tmp_path / f"worker-{group}.log"
        with worker_process(bootstrap, tmp_path, group=group, jobs_regex=f"^{job}$") as (proc, url):
            wait_for(
                lambda: (
                    metric_value(scrape(url), "tensorpulse_records_total", training_job=job, mode="train")
                    == 10
                ),
                60,
                "the 10 records evaluated",
            )
            mark = len(log.read_bytes())
            broker.relay.cut()
            wait_for(lambda: STATES[state] in log.read_bytes()[mark:].decode(errors="replace"), 120, state)
            sent = time.monotonic()
            proc.send_signal(sig)
            rc = proc.wait(30)
            took = time.monotonic() - sent
            text = log.read_text(errors="replace")
            assert rc == 0 and took < 10, f"exit {rc} after {took:.1f} s in {state}:\n{text[-3000:]}"
            # With the broker away, the last checkpoint cannot be committed: the worker says it
            # exits without it (as after a crash); else it stopped in order.
            assert "worker stopped" in text or "exiting without it" in text
        broker.relay.restore()
        with worker_process(bootstrap, tmp_path, group=group, jobs_regex=f"^{job}$") as (proc, url):
            producer.produce(reductions_topic(job), key=job.encode(), value=good(job, 10, ts=time.time()))
            assert producer.flush(30) == 0

            def evaluated_after() -> str | None:
                text = scrape(url)
                last = metric_value(text, "tensorpulse_last_step", training_job=job, rank="0", mode="train")
                return text if last == 10 else None

            text = wait_for(evaluated_after, 90, "the record sent after the restart evaluated")
            # Known gap (seen on this embedded broker): the second worker evaluates the first one's
            # records again; what a user sees is checked below: no alert published twice.
            again = metric_value(text, "tensorpulse_records_total", training_job=job, mode="train")
            print(f"\nrecords evaluated by the second worker: {again}")
        alerts = [json.loads(m.value()) for m in read_topic(bootstrap, ALERTS_TOPIC)]
        firing = [a for a in alerts if a["job"] == job and a["status"] == "firing" and a["step"] == 5]
        assert len({a["id"] for a in firing}) == 1 and len(firing) == 1, firing
