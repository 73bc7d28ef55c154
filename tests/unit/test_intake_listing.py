"""How often the intake lists topics (`discovery_interval`, or less often where a listing is costly), and
how long its fetches wait (longer where they name many partitions)."""

from __future__ import annotations

from tensorpulse.stream.discovery import LISTING_BUSY_S, LISTING_SHARE, QUIET_LISTING_SHARE, ListingPace
from tensorpulse.stream.source import MAX_FETCH_SCALE, fetch_scale, rescale, source_config


def test_a_lasting_listing_cost_stretches_the_interval_and_one_slow_listing_does_not() -> None:
    """The median of the last three listings' costs, over LISTING_SHARE: one slow listing does not
    stretch the interval, two do, and it comes back once two cheap ones follow."""
    pace = ListingPace(0.1)
    assert pace.interval(0.001, True, 0.0, 10) == 0.1
    assert pace.interval(0.2, False, 1.0, 10) == 0.1  # one slow listing: the cheaper ones count
    assert pace.interval(0.03, False, 2.0, 10) == 0.03 / LISTING_SHARE
    assert pace.stretched
    assert pace.interval(0.002, False, 3.0, 10) == 0.03 / LISTING_SHARE
    assert pace.interval(0.002, False, 4.0, 10) == 0.1
    assert not pace.stretched


def test_listing_costs_a_smaller_share_once_the_jobs_stopped_changing() -> None:
    """LISTING_SHARE while a job appeared or went within LISTING_BUSY_S; QUIET_LISTING_SHARE after
    that, until the job set changes again."""
    pace = ListingPace(0.1)
    for t in range(3):
        pace.interval(0.01, True, t, 1000)
    assert pace.interval(0.01, False, LISTING_BUSY_S + 2, 1000) == 0.01 / LISTING_SHARE
    assert pace.interval(0.01, False, LISTING_BUSY_S + 3, 1000) == 0.01 / QUIET_LISTING_SHARE
    assert pace.interval(0.01, True, LISTING_BUSY_S + 4, 1000) == 0.01 / LISTING_SHARE


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
