"""`tensorpulse rules --check FILE --against-records RUN`: `--against JOB`'s check offline, against a
recorded run (the job's wire records back to back in a file), with no broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tensorpulse import wire
from tensorpulse.cli import main
from tensorpulse.errors import ConfigError
from tensorpulse.producers import Hook
from tensorpulse.rules.coverage import recorded_payloads

JOB = "recorded-job"
#: What a hooked nn.Sequential sends: gradients named gradient/<param>.
NAMES = ["0.weight", "gradient/0.weight", "gradient/0.bias", "1/relu_output"]
COLLS = ["weights", "gradients", "gradients", "activations"]

RULES = """\
defaults: true
rules:
  - rule: Threshold
    name: BigGradients
    params: {collection_names: [gradients], tensor_regex: "fc\\\\d\\\\.weight", statistic: l2, op: ">", value: 100}
"""
FIXED = RULES.replace("fc\\\\d\\\\.weight", "\\\\.weight$")


def _recording(path: Path, steps: int = 3) -> Path:
    """`steps` records of JOB back to back, names announced in the first only (as a hook sends them)."""
    k = len(NAMES)
    floats = np.tile(np.array([0.0, 0.1, -0.3, 0.3, 0.08], dtype=np.float32), (k, 1))
    block = wire.TensorBlock(NAMES, COLLS, np.full(k, 100), floats, np.zeros(k, dtype=np.int64))
    with open(path, "wb") as out:
        for step in range(steps):
            out.write(
                wire.encode(
                    job=JOB,
                    rank=0,
                    world=1,
                    step=step,
                    mode="train",
                    ts=float(step),
                    seq=step,
                    scalars={"loss": 1.0},
                    tensors=block,
                    announce=step == 0,
                )  # fmt: skip
            )
    return path


def _check(tmp_path: Path, rules: str, run: Path) -> tuple[int, str, str]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    result = CliRunner().invoke(main, ["rules", "--check", str(path), "--against-records", str(run)])
    return result.exit_code, result.stdout, result.stderr


def test_a_regex_that_matches_nothing_in_the_recording_is_a_warning_and_exit_1(tmp_path: Path) -> None:
    """The old BigGradients regex names the recording's gradients instead; the fixed one passes."""
    run = _recording(tmp_path / "run.tp")
    code, _, err = _check(tmp_path, RULES, run)
    assert code == 1, err
    assert "warning: BigGradients: tensor_regex" in err and f"matches nothing job '{JOB}' publishes" in err

    assert "gradient/0.weight" in err and "3 record(s)" in err
    code, _, err = _check(tmp_path, FIXED, run)
    assert code == 0 and "warning" not in err, err


def test_a_hook_recording_through_produce_fn_is_checked(tmp_path: Path) -> None:
    """The recipe the docs give: a hook whose produce_fn appends each record to a file; its job is found."""
    run = tmp_path / "hook.tp"
    with open(run, "ab") as out:
        hook = Hook(
            "hooked-job", produce_fn=lambda topic, value, key: out.write(value), listen_for_actions=False
        )
        for step in range(3):
            hook.record(step, {"0.weight": np.ones((4, 4))}, collection="weights")
            hook.record_scalars(step, {"loss": 1.0})
        hook.close()  # publishes what is pending, before the file closes
    assert len(recorded_payloads(run)) >= 3
    code, _, err = _check(tmp_path, "defaults: true\n", run)
    assert code == 0 and "hooked-job" in err and "1 tensor(s)" in err, err


def test_a_file_that_is_not_a_recording_is_refused_with_the_byte(tmp_path: Path) -> None:
    """A file cut short (or not msgpack) names where it stops being records: no silent empty check."""
    run = _recording(tmp_path / "run.tp")
    whole = run.read_bytes()
    run.write_bytes(whole[:-3])
    with pytest.raises(ConfigError, match="not a recorded run"):
        recorded_payloads(run)
    code, _, err = _check(tmp_path, RULES, run)
    assert code == 1 and "not a recorded run" in err, err
