"""SaveConfig: SageMaker Debugger's save schedule semantics, per mode."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tensorpulse.producers import SaveConfig
from tensorpulse.producers.schedule import SaveConfigMode


def saved(cfg: SaveConfig, mode: str = "train", upto: int = 30) -> list[int]:
    return [s for s in range(upto) if cfg.should_save(s, mode)]


def test_default_saves_every_step():
    """The default schedule saves every step from 0 on."""
    assert saved(SaveConfig(), upto=5) == [0, 1, 2, 3, 4]


def test_interval_counts_from_start_step_and_stops_before_end_step():
    """Steps are saved every save_interval steps from start_step, and end_step is exclusive."""
    cfg = SaveConfig(save_interval=5, start_step=3, end_step=18)
    assert saved(cfg) == [3, 8, 13]


def test_save_steps_are_saved_outside_the_interval_window():
    """Explicit save_steps are saved even outside [start_step, end_step) and off the interval."""
    cfg = SaveConfig(save_interval=10, start_step=10, end_step=25, save_steps=[1, 2, 27])
    assert saved(cfg) == [1, 2, 10, 20, 27]


def test_mode_override_replaces_the_default_for_that_mode_only():
    """A per-mode SaveConfigMode applies to its mode; other modes keep the default schedule."""
    cfg = SaveConfig(save_interval=2, modes={"eval": SaveConfigMode(save_interval=7, start_step=1)})
    assert saved(cfg, "train", 7) == [0, 2, 4, 6]
    assert saved(cfg, "eval", 16) == [1, 8, 15]
    assert saved(cfg, "predict", 5) == [0, 2, 4]


def test_invalid_settings_are_rejected():
    """Non-positive intervals, negative steps, unknown modes and unknown fields are errors."""
    with pytest.raises(ValidationError):
        SaveConfig(save_interval=0)
    with pytest.raises(ValidationError):
        SaveConfig(start_step=-1)
    with pytest.raises(ValidationError):
        SaveConfig(modes={"training": SaveConfigMode()})
    with pytest.raises(ValidationError):
        SaveConfig(interval=3)


def test_config_is_frozen():
    """A SaveConfig cannot be changed after construction (hooks share it between threads)."""
    cfg = SaveConfig()
    with pytest.raises(ValidationError):
        cfg.save_interval = 3  # type: ignore[misc]
