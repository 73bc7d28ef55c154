"""How often the intake lists topics (`discovery_interval`, or less often where a listing is costly), and
how long its fetches wait (longer where they name many partitions)."""

from __future__ import annotations

from tensorpulse.stream.intake import LISTING_SHARE, Intake, IntakeConfig
from tensorpulse.stream.source import MAX_FETCH_SCALE, fetch_scale, rescale, source_config


def _intake() -> Intake:
    config = IntakeConfig(
        group="g",
        topic_prefix="tensorpulse.",
        jobs_regex=None,
        shards=4,
        discovery_interval=0.1,
        max_record_bytes=1 << 20,
        topic_config={},
        replication_factor=1,
        tick_interval=None,
        tick_horizon=60.0,
    )
    return Intake(config, {"bootstrap.servers": "127.0.0.1:1"})


def test_a_lasting_listing_cost_stretches_the_interval_and_one_slow_listing_does_not() -> None:
    """Two costly listings in a row stretch the interval to cost / LISTING_SHARE; a single one, or a cheap one after, does not."""
    intake = _intake()
    assert intake.listing_interval(0.001) == 0.1
    assert intake.listing_interval(0.2) == 0.1  # one slow listing: the cheaper one before it counts
    assert intake.listing_interval(0.03) == 0.03 / LISTING_SHARE
    assert intake.listing_stretched
    assert intake.listing_interval(0.002) == 0.1
    assert not intake.listing_stretched


def test_fetches_wait_longer_the_more_partitions_they_name() -> None:
    """Up to 200 partitions a fetch waits 20 ms / 16 KiB; 1,000 and more, 5 times that; a new source
    consumer only when the scale moves by half or more."""
    assert fetch_scale(0) == fetch_scale(200) == 1.0
    assert fetch_scale(1000) == fetch_scale(5000) == MAX_FETCH_SCALE
    config = source_config({"bootstrap.servers": "b"}, "g.intake", "c", 1 << 20, fetch_scale(1000))
    assert (config["fetch.wait.max.ms"], config["fetch.min.bytes"]) == (100, 80 << 10)
    assert rescale(1.0, 1000) == MAX_FETCH_SCALE
    assert rescale(1.0, 250) is None  # 1.25: not worth a new consumer
    assert rescale(MAX_FETCH_SCALE, 800) is None
    assert rescale(MAX_FETCH_SCALE, 100) == 1.0
