"""Property-based fuzzing of every decoder that reads a topic: bad input raises only the decoder's own
documented error, and what decodes can be used (formatted, re-encoded) without raising.

Hypothesis runs derandomized (a fixed seed from the test's name) for a bounded number of examples,
so CI time is bounded and a failure reproduces. Inputs it found, and the hand-made hostile ones,
are kept in tests/fuzz/corpus/<decoder>/ and replayed first by `test_corpus`.
Decoders: the wire codec (`wire.decode`, alone and with announced schemas), control actions
(`actions.decode_action`), the cross-run forwarding (`crossrun.forward_payload` of a decoded
record, decoded again) and alert events (`AlertEvent.from_json`, what `tensorpulse alerts` and
`notify` read).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from corpus import good
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorpulse import wire
from tensorpulse.actions import decode_action, encode_action
from tensorpulse.errors import DecodeError
from tensorpulse.events import AlertEvent
from tensorpulse.rules.config import parse_rules
from tensorpulse.sinks.alertmanager import to_alertmanager
from tensorpulse.stream.crossrun import forward_payload

CORPUS = Path(__file__).parent / "corpus"

#: Bounded and reproducible: a few seconds per decoder on a CI machine. A longer hunt, locally:
#: TENSORPULSE_FUZZ_EXAMPLES=20000 pytest tests/fuzz
FUZZ = settings(
    max_examples=int(os.environ.get("TENSORPULSE_FUZZ_EXAMPLES", "300")),
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------ what each decoder may raise


def decode_record(payload: bytes) -> None:
    """wire.decode: DecodeError only; a record that decodes can be read and re-encoded for cross-run."""
    record = wire.decode(payload)
    forwarded = forward_payload(record, CROSS_SPECS)
    if forwarded is not None:
        again = wire.decode(forwarded)
        assert (again.job, again.step) == (record.job, record.step)


def decode_with_schemas(payload: bytes) -> None:
    """wire.decode against announced schemas: an announcement, then this payload, then a steady record."""
    schemas: dict[tuple[str, int, int], Any] = {}
    wire.decode(good("fuzz-job", 1, announce=True), schemas)
    for p in (payload, good("fuzz-job", 2, announce=False)):
        with contextlib.suppress(DecodeError):
            wire.decode(p, schemas)
    # What a hostile announcement left behind never breaks a later honest record.
    wire.decode(good("fuzz-job", 3, announce=True), schemas)


def decode_control(payload: bytes) -> None:
    action = decode_action(payload)
    assert action["action"] in ("stop", "checkpoint") and math.isfinite(action["ts"])


def decode_alert(payload: bytes) -> None:
    """AlertEvent.from_json: DecodeError only; a decoded event can be printed and sent to Alertmanager."""
    ev = AlertEvent.from_json(payload)
    ev.format()
    json.dumps(to_alertmanager(ev))
    assert AlertEvent.from_json(ev.to_json()) == ev


DECODERS: dict[str, Callable[[bytes], None]] = {
    "wire": decode_record,
    "schemas": decode_with_schemas,
    "control": decode_control,
    "alerts": decode_alert,
}

CROSS_SPECS = parse_rules(
    "defaults: false\nrules:\n  - rule: SimilarAcrossRuns\n    params: {other_trials: '^fuzz-'}\n", "fuzz.yaml"
)


def only_decode_error(name: str, payload: bytes) -> None:
    with contextlib.suppress(DecodeError):
        DECODERS[name](payload)


# ------------------------------------------------------------------ inputs

#: Any value msgpack and JSON can carry, nested a little.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def mutated(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """`base` with some keys (top level, or one level down) replaced, removed or added."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out = _copy(base)
        for _ in range(draw(st.integers(1, 4))):
            keys = sorted(out)
            key = draw(st.sampled_from(keys) | st.text(max_size=6))
            inner = out.get(key)
            if isinstance(inner, dict) and inner and draw(st.booleans()):
                sub = draw(st.sampled_from(sorted(inner, key=str)))
                inner[sub] = draw(values)
            elif draw(st.integers(0, 4)) == 0:
                out.pop(key, None)
            else:
                out[key] = draw(values)
        return out

    return build()


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


VALID_RECORD = msgpack.unpackb(good("fuzz-job", 7, announce=True), raw=False, strict_map_key=False)
VALID_ACTION = json.loads(encode_action("stop", "fuzz-job", rule="R", alert_id="a", step=3, reason="x"))
VALID_ALERT = json.loads(
    AlertEvent(job="fuzz-job", rule="R", status="firing", step=3, mode="train", severity="warning",
               tensors=("a",), value=float("inf"), threshold=1.0, ts=1.0, details={"k": 1}).to_json()
)  # fmt: skip


def msgpack_bytes(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, default=lambda b: b.decode("latin-1")).encode()


raw_bytes = st.binary(max_size=300)
records = mutated(VALID_RECORD).map(msgpack_bytes) | raw_bytes
actions = mutated(VALID_ACTION).map(json_bytes) | raw_bytes
alerts = mutated(VALID_ALERT).map(json_bytes) | raw_bytes


@FUZZ
@given(records)
def test_fuzz_wire(payload: bytes) -> None:
    """wire.decode raises only DecodeError, and what it decodes forwards and decodes again."""
    only_decode_error("wire", payload)


@FUZZ
@given(records)
def test_fuzz_schemas(payload: bytes) -> None:
    """Hostile announcements and schema references raise only DecodeError and spoil no later record."""
    only_decode_error("schemas", payload)


@FUZZ
@given(actions)
def test_fuzz_control(payload: bytes) -> None:
    """decode_action raises only DecodeError; what it accepts is a known action with a finite time."""
    only_decode_error("control", payload)


@FUZZ
@given(alerts)
def test_fuzz_alerts(payload: bytes) -> None:
    """AlertEvent.from_json raises only DecodeError; what it accepts prints, converts and round-trips."""
    only_decode_error("alerts", payload)


def corpus_files() -> list[tuple[str, Path]]:
    return [(d.name, f) for d in sorted(CORPUS.iterdir()) if d.is_dir() for f in sorted(d.iterdir())]


@pytest.mark.parametrize(("decoder", "path"), corpus_files(), ids=lambda x: getattr(x, "name", x))
def test_corpus(decoder: str, path: Path) -> None:
    """Every kept input (found by the fuzzer, or hand-made) gets only the decoder's own error."""
    only_decode_error(decoder, path.read_bytes())
