"""CheckInputImages: running per-channel means of the input images, judged after threshold_samples images."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse.errors import ConfigError
from tensorpulse.producers.stats_numpy import image_sums
from tensorpulse.rules import CheckInputImages
from tensorpulse.rules.testing import make_record, replay, state_size
from tensorpulse.wire import ImageSums, StepRecord


def sums(images: int, means: list[float], pixels: int = 4) -> ImageSums:
    """Images whose channels are constant at `means` (so the channel means are exact)."""
    return ImageSums(images, pixels, tuple(m * images * pixels for m in means), tuple(0.0 for _ in means))


def rec(step: int, **blocks: ImageSums) -> StepRecord:
    return make_record(step, images=blocks)


def last(rule: CheckInputImages, records: list[StepRecord]):
    out = replay(rule, records)[1]
    return out[-1][1] if out else None


@pytest.mark.parametrize(
    ("means", "params", "expected", "value"),
    [
        ([0.0, 0.1, -0.1], {}, False, 0.1),
        ([0.0, 0.25, 0.0], {}, True, 0.25),
        ([0.0, 0.0, -0.25], {}, True, 0.25),  # negative means count by their size
        ([0.5, 0.5, 0.5], {}, True, 0.5),  # [0, 1] pixels: not normalised
        ([0.5, 0.5, 0.5], {"threshold_mean": 0.5}, False, 0.5),  # exactly the threshold does not fire
        ([0.2, 0.0, 0.0], {"threshold_mean": 0.1}, True, 0.2),
    ],
)
def test_threshold_table(means: list[float], params: dict, expected: bool, value: float) -> None:
    """Fires when some channel's |mean| exceeds threshold_mean."""
    finding = last(CheckInputImages(**params), [rec(0, inputs=sums(500, means))])
    assert finding is not None
    assert (finding.firing, finding.value, finding.threshold) == (
        expected,
        pytest.approx(value),
        params.get("threshold_mean", 0.2),
    )
    assert finding.tensors == (("inputs",) if expected else ())


@pytest.mark.parametrize(
    ("batches", "threshold_samples", "first"), [(5, 500, 4), (5, 100, 0), (4, 500, None)]
)
def test_threshold_samples(batches: int, threshold_samples: int, first: int | None) -> None:
    """Nothing is judged before an input has threshold_samples images."""
    records = [rec(s, inputs=sums(100, [1.0])) for s in range(batches)]
    out = replay(CheckInputImages(threshold_samples=threshold_samples), records)[1]
    assert (out[0][0] if out else None) == first


def test_running_mean_resolves() -> None:
    """A bad first batch fires; normalised batches pull the running mean back under the threshold."""
    records = [rec(0, inputs=sums(500, [1.0])), *[rec(s, inputs=sums(500, [0.0])) for s in range(1, 6)]]
    out = replay(CheckInputImages(), records)[1]
    assert [f.firing for _, f in out] == [True, True, True, True, False, False]  # 1/5 = 0.2 is not over


def test_inputs_are_separate_and_selected_by_regex() -> None:
    """Each input name has its own totals; regex (re.search) selects the inputs."""
    records = [rec(0, images=sums(500, [0.0]), depth=sums(500, [3.0]), masks=sums(10, [9.0]))]
    finding = last(CheckInputImages(), records)
    assert (finding.firing, finding.tensors, finding.value) == (True, ("depth",), 3.0)
    assert "depth channel 0 has mean 3 over 500 images" in finding.message
    assert last(CheckInputImages(regex="^images$"), records).firing is False
    assert last(CheckInputImages(regex="nothing"), records) is None


def test_channel_count_change_restarts_the_input() -> None:
    """When an input's channel count changes, its totals start over."""
    records = [rec(0, x=sums(500, [1.0, 1.0, 1.0])), rec(1, x=sums(100, [0.0]))]
    out = replay(CheckInputImages(), records)[1]
    assert [(s, f.firing) for s, f in out] == [(0, True)]  # step 1: 100 images of the new shape


def test_channel_param_is_the_hooks_concern() -> None:
    """`channel` is accepted for SageMaker compatibility and does not change the rule's result."""
    records = [rec(0, inputs=sums(500, [0.0, 0.5]))]
    assert last(CheckInputImages(channel=3), records) == last(CheckInputImages(), records)


def test_repeated_steps_are_not_counted() -> None:
    """A redelivered or older step adds nothing."""
    block = sums(300, [1.0])
    assert replay(CheckInputImages(), [rec(2, x=block), rec(2, x=block), rec(1, x=block)])[1] == []


@pytest.mark.parametrize("params", [{"threshold_mean": -1}, {"threshold_samples": 0}, {"regex": "("}])
def test_invalid_params(params: dict) -> None:
    """Out-of-range values and bad regexes are ConfigErrors."""
    with pytest.raises(ConfigError):
        CheckInputImages(**params)


def _stream(steps: int, seed: int = 0) -> list[StepRecord]:
    """NCHW batches from numpy: RGB inputs drifting from normalised to shifted; a grayscale input."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        shift = np.array([0.0, 0.05, -0.1]) if s < steps // 2 else np.array([0.0, 0.9, -0.1])
        rgb = rng.normal(0, 1, (int(rng.integers(8, 40)), 3, 4, 4)) + shift[None, :, None, None]
        gray = rng.normal(0.1, 1, (16, 1, 4, 4))
        out.append(rec(s, rgb=image_sums(rgb), gray=image_sums(gray)))
        if s % 11 == 3:
            out.append(out[-1])
    return out


def _reference(records: list[StepRecord], p) -> list[tuple[int, bool, float, tuple[str, ...]]]:
    """numpy over the full history: per input, channel sums / (images × pixels)."""
    out, seen = [], []
    for r in records:
        if seen and r.step <= seen[-1].step:
            continue
        seen.append(r)
        worst, off = None, []
        for name in sorted(r.images):
            n = sum(x.images[name].images for x in seen)
            if n < p.threshold_samples:
                continue
            total = np.sum([x.images[name].sums for x in seen], axis=0)
            values = sum(x.images[name].images * x.images[name].pixels for x in seen)
            biggest = float(np.abs(total / values).max())
            worst = biggest if worst is None else max(worst, biggest)
            if biggest > p.threshold_mean:
                off.append(name)
        if worst is not None:
            out.append((r.step, bool(off), worst, tuple(off)))
    return out


@pytest.mark.parametrize("params", [{}, {"threshold_mean": 0.15, "threshold_samples": 50}])
def test_matches_batch_reference(params: dict) -> None:
    """Streaming findings equal a numpy recomputation over the full history."""
    records = _stream(120)
    rule = CheckInputImages(**params)
    got = [(s, f.firing, f.value, f.tensors) for s, f in replay(rule, records)[1]]
    expected = _reference(records, rule.params)
    assert [(g[0], g[1], g[3]) for g in got] == [(e[0], e[1], e[3]) for e in expected]
    assert [g[2] for g in got] == pytest.approx([e[2] for e in expected])
    assert {e[1] for e in expected} == {True, False}


def test_state_json_roundtrip() -> None:
    """Round-tripping the state through JSON mid-stream leaves the findings unchanged."""
    records = _stream(80, seed=3)
    plain = replay(CheckInputImages(), records)[1]
    for k in (1, 5):
        assert repr(replay(CheckInputImages(), records, roundtrip_every=k)[1]) == repr(plain)


def test_state_flat_over_100k_steps() -> None:
    """The state holds per input an image count, a value count and channel sums: flat over 100k steps."""
    rule = CheckInputImages()
    block = sums(32, [0.125, -0.25, 0.0625])
    state, sizes = rule.initialize(), {}
    for s in range(100_000):
        state, _ = rule.update(state, make_record(s, images={"inputs": block}))
        if s + 1 in (1_000, 100_000):
            sizes[s + 1] = state_size(state)
    assert sizes[100_000] <= sizes[1_000] + 16  # the step and the two counts gain digits
    assert sizes[100_000] < 200
