"""The worker's Quix Streams application: its clients' settings, topics and dataframes.

One static topology (docs/architecture.md): the group's steps topic, read in the worker group, goes
through the processor (`process`: stateful, keyed by job) to the alerts, dead-letter and control
topics; with cross-run rules, the processor's forwards go to the group's crossrun topic, whose
records `cross` evaluates in the key context of the job they are compared for. It never changes
while the worker runs, so a new job never rebalances it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quixstreams import Application
from quixstreams.models import Topic, TopicConfig
from quixstreams.state.rocksdb import RocksDBOptions

from tensorpulse.topics import ALERTS_TOPIC, DEADLETTER_TOPIC, control_topic, validate_job

from .crossrun import KeyedValue, crossrun_topic
from .settings import WorkerSettings
from .state import pack, unpack

#: One RocksDB store per partition holds a few KB of rule state per job, so RocksDB's defaults
#: (64 MB memtables x 3, a 1 GB block cache) only make memory grow with the number of jobs
#: until the first flush, an hour or more later (bench/load.py soak measured 3.5-7 MB/min).
ROCKSDB_OPTIONS = RocksDBOptions(
    write_buffer_size=512 << 10,
    max_write_buffer_number=2,
    target_file_size_base=8 << 20,
    block_cache_size=8 << 20,
    max_total_wal_size=16 << 20,
    dumps=pack,  # state values (stream/state.py)
    loads=unpack,
)

Processor = Callable[[bytes, Any, int, Any, Any], Any]


def build_application(
    s: WorkerSettings,
    base_config: dict[str, Any],
    steps_topic: str,
    *,
    process: Processor,
    cross: Processor | None,
    on_processing_error: Callable[[Exception, Any, logging.Logger], bool],
) -> Application:
    """The application over `steps_topic`; `process` returns (alerts, dead letters, actions,
    forwards), `cross` (None: no cross-run rule) (alerts, dead letters, actions)."""
    client = {k: v for k, v in base_config.items() if k != "bootstrap.servers"}
    consumer_extra = {
        "session.timeout.ms": s.session_timeout_ms,
        "heartbeat.interval.ms": min(1000, s.session_timeout_ms // 3),
        "fetch.wait.max.ms": 10,
        # Small fetches and a short prefetch queue: the consumer hands out records in the order
        # they were fetched (how far one job may run ahead of the others is the intake's
        # max_ahead_per_job, stream/flow.py).
        "max.partition.fetch.bytes": 64 << 10,
        "queued.min.messages": 200,
        **client,
    }
    producer_extra = {
        "linger.ms": 5,
        "compression.type": "lz4",
        # A stable id: a restarted worker fences its crashed self and aborts the transaction it
        # left open (Quix would pick a random id, leaving it to the broker's timeout).
        **(
            {"transactional.id": s.transactional_id(), "transaction.timeout.ms": s.transaction_timeout_ms}
            if s.guarantee == "exactly-once"
            else {}
        ),
        **client,
    }
    app = Application(
        broker_address=s.bootstrap,
        consumer_group=s.group,
        auto_offset_reset="earliest",  # the steps topic is the group's own: read all of it
        processing_guarantee=s.guarantee,
        commit_interval=s.commit_interval,
        state_dir=str(Path(s.state_dir)),
        consumer_extra_config=consumer_extra,
        producer_extra_config=producer_extra,
        loglevel=s.loglevel,
        on_processing_error=on_processing_error,
        consumer_poll_timeout=0.1,
        rocksdb_options=ROCKSDB_OPTIONS,
    )
    cfg = TopicConfig(
        num_partitions=1, replication_factor=s.replication_factor, extra_config=s.topic_config()
    )
    steps_cfg = TopicConfig(
        num_partitions=s.partitions, replication_factor=s.replication_factor, extra_config=s.topic_config()
    )
    alerts = app.topic(ALERTS_TOPIC, value_serializer="bytes", key_serializer="bytes", config=cfg)
    dead = app.topic(DEADLETTER_TOPIC, value_serializer="bytes", key_serializer="bytes", config=cfg)
    steps = app.topic(steps_topic, value_deserializer="bytes", key_deserializer="bytes", config=steps_cfg)
    controls = ControlTopics(app, s)
    out = app.dataframe(steps).apply(process, stateful=True, metadata=True)
    out.apply(lambda r: r[0], expand=True).to_topic(alerts)
    out.apply(lambda r: r[1], expand=True).to_topic(dead)
    out.apply(lambda r: r[2], expand=True).to_topic(controls)
    if cross is not None:
        crossrun = app.topic(
            crossrun_topic(s.group),
            value_deserializer="bytes",
            key_deserializer="bytes",
            value_serializer=KeyedValue(),
            key_serializer="bytes",
            config=cfg,
        )
        forwards = out.apply(lambda r: r[3], expand=True)
        forwards.set_headers(lambda m, *_: list(m.headers)).to_topic(crossrun, key=lambda m: m.key)
        # Cross-run rules: both sides of every comparison arrive here keyed by the job they alert on.
        cout = app.dataframe(crossrun).apply(cross, stateful=True, metadata=True)
        cout.apply(lambda r: r[0], expand=True).to_topic(alerts)
        cout.apply(lambda r: r[1], expand=True).to_topic(dead)
        cout.apply(lambda r: r[2], expand=True).to_topic(controls)
    return app


class ControlTopics:
    """The control topic of the job an action is for (its JSON names the job), made on first use."""

    def __init__(self, app: Application, settings: WorkerSettings) -> None:
        self._app = app
        self._settings = settings
        self._topics: dict[str, Topic] = {}

    def __call__(self, value: bytes, key: Any, timestamp: int, headers: Any) -> Topic:
        job = validate_job(json.loads(value)["job"])
        topic = self._topics.get(job)
        if topic is None:
            s = self._settings
            cfg = TopicConfig(
                num_partitions=1, replication_factor=s.replication_factor, extra_config=s.topic_config()
            )
            topic = self._topics[job] = self._app.topic(
                control_topic(job, s.topic_prefix),
                value_serializer="bytes",
                key_serializer="bytes",
                config=cfg,
            )
        return topic
