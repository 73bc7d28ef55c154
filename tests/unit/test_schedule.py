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


# ---------------------------------------------------------------------------- the semantics, table-driven
SCHEDULES = [
    # (SaveConfig arguments, mode, steps saved among 0..24)
    ({}, "train", list(range(25))),
    ({"save_interval": 10}, "train", [0, 10, 20]),
    ({"save_interval": 10}, "eval", [0, 10, 20]),
    ({"start_step": 20}, "predict", [20, 21, 22, 23, 24]),
    ({"end_step": 3}, "train", [0, 1, 2]),
    ({"save_interval": 4, "start_step": 2, "end_step": 15}, "train", [2, 6, 10, 14]),
    ({"save_interval": 100, "save_steps": [3, 7]}, "train", [0, 3, 7]),
    ({"end_step": 0, "save_steps": 5}, "train", [5]),
    ({"save_interval": 5, "modes": {"eval": {"save_interval": 12}}}, "eval", [0, 12, 24]),
    ({"save_interval": 5, "modes": {"eval": {"save_interval": 12}}}, "train", [0, 5, 10, 15, 20]),
    # an override's unset fields take the defaults, they are not inherited from the parent
    ({"start_step": 10, "modes": {"eval": {"save_interval": 8}}}, "eval", [0, 8, 16, 24]),
    (
        {"mode_save_configs": {"TRAIN": {"end_step": 0, "save_steps": [1, 2]}}, "save_interval": 10},
        "train",
        [1, 2],
    ),
    (
        {"mode_save_configs": {"TRAIN": {"end_step": 0, "save_steps": [1, 2]}}, "save_interval": 10},
        "eval",
        [0, 10, 20],
    ),
    ({"modes": {"global": {"save_interval": 6, "end_step": 13}}}, "global", [0, 6, 12]),
]


@pytest.mark.parametrize(("kwargs", "mode", "expected"), SCHEDULES)
def test_schedule_table(kwargs: dict, mode: str, expected: list[int]) -> None:
    """Each row: which steps of one mode a SaveConfig saves (smdebug's SaveConfig semantics)."""
    assert saved(SaveConfig(**kwargs), mode, 25) == expected


def test_negative_save_steps_are_rejected() -> None:
    """An explicit save step must be a step number (>= 0)."""
    with pytest.raises(ValidationError, match="save_steps"):
        SaveConfig(save_steps=[3, -1])


# ---------------------------------------------------------------------------- what a hook captures
def _captured(
    hook_kwargs: dict, attach_kwargs: dict, steps: int = 4
) -> list[tuple[str, int, frozenset[str]]]:
    """(mode, step, collections) of every step record a TorchHook publishes for 3 train + 3 eval steps."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from tensorpulse import wire
    from tensorpulse.producers.torch import TorchHook

    sent: list[bytes] = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = TorchHook("unit-schedule", produce_fn=lambda t, v, k: sent.append(v), **hook_kwargs)
    hook.attach(model, opt, **attach_kwargs)
    for step in range(steps):
        loss = model(torch.randn(5, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        hook.step(step, loss=loss)
        opt.step()
    model.eval()
    for step in range(steps):
        with torch.no_grad():
            loss = model(torch.randn(5, 6)).pow(2).mean()
        hook.step(step, loss=loss)
    hook.close(2)
    cache = wire.SchemaCache()
    records = [wire.decode(v, cache) for v in sent]
    return [(r.mode, r.step, frozenset(t.collection for t in r.tensors)) for r in records if r.kind == "step"]


ALL = frozenset({"weights", "biases", "gradients", "activations", "activation_inputs"})
CAPTURES = [
    # (hook arguments, attach arguments, train collections at step 1, eval collections at step 1)
    # relu inputs ("activation_inputs") come with the first `quantile_steps` saved train steps
    ({}, {}, ALL, ALL - {"activation_inputs", "gradients"}),
    ({"include_collections": ["gradients"]}, {}, {"gradients"}, set()),
    (
        {"include_collections": ["weights", "activations"]},
        {},
        {"weights", "activations"},
        {"weights", "activations"},
    ),
    ({"exclude_collections": ["weights", "biases"]}, {}, ALL - {"weights", "biases"}, {"activations"}),
    ({}, {"include": r"^gradient/0\."}, {"gradients"}, set()),
    (
        {"exclude_collections": ["activations"]},
        {"exclude": "bias"},
        ALL - {"activations", "biases"},
        {"weights"},
    ),
]


@pytest.mark.parametrize(("hook_kwargs", "attach_kwargs", "train", "evaluation"), CAPTURES)
def test_collections_selected_by_name_and_regex(hook_kwargs, attach_kwargs, train, evaluation) -> None:
    """Collections by name (include/exclude) and tensor names by regex; gradients only on train steps."""
    got = {
        (mode, step): colls
        for mode, step, colls in _captured(hook_kwargs, {"activations": True, **attach_kwargs})
    }
    assert got[("train", 1)] == train
    assert got.get(("eval", 1), frozenset()) == evaluation


def test_per_mode_schedule_decides_the_published_steps() -> None:
    """Per-mode save intervals and explicit steps select which train and eval steps are published."""
    cfg = SaveConfig(save_interval=2, modes={"eval": SaveConfigMode(end_step=0, save_steps=[1, 3])})
    got = _captured({"save_config": cfg}, {}, steps=5)
    assert [(m, s) for m, s, _ in got] == [("train", 0), ("train", 2), ("train", 4), ("eval", 1), ("eval", 3)]
    assert all("gradients" not in c for m, _, c in got if m == "eval")
    assert all("gradients" in c for m, _, c in got if m == "train")


def test_plain_hook_skips_gradients_outside_train_and_unwanted_collections() -> None:
    """Hook.record drops gradients of eval steps and collections outside include_collections."""
    import numpy as np

    from tensorpulse import wire
    from tensorpulse.errors import ConfigError
    from tensorpulse.producers import Hook

    sent: list[bytes] = []
    hook = Hook(
        "unit-plain", produce_fn=lambda t, v, k: sent.append(v), include_collections=["gradients", "weights"]
    )
    for mode in ("train", "eval"):
        hook.record(0, {"g": np.ones(3)}, collection="gradients", mode=mode)
        hook.record(0, {"w": np.ones(3)}, collection="weights", mode=mode)
        hook.record(0, {"a": np.ones(3)}, collection="activations", mode=mode)
    hook.close(2)
    cache = wire.SchemaCache()
    got = {(r.mode, t.name) for r in (wire.decode(v, cache) for v in sent) for t in r.tensors}
    assert got == {("train", "g"), ("train", "w"), ("eval", "w")}
    with pytest.raises(ConfigError, match="include_collections"):
        Hook("unit-plain", produce_fn=lambda t, v, k: None, include_collections="weights")
