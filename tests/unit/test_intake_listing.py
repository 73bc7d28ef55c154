"""How often the intake lists topics: `discovery_interval`, or less often where a listing is costly."""

from __future__ import annotations

from tensorpulse.stream.intake import LISTING_SHARE, Intake, IntakeConfig


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
