"""Alert events, action messages, topic naming and Kafka settings: the small contracts."""

from __future__ import annotations

import json
import math

import pytest

from tensorpulse import topics
from tensorpulse.actions import decode_action, encode_action
from tensorpulse.errors import ConfigError, DecodeError
from tensorpulse.events import AlertEvent
from tensorpulse.kafka import client_config, env_overrides, redact


def _event(**over) -> AlertEvent:
    kw = dict(
        job="j",
        rule="ExplodingTensor",
        status="firing",
        step=12,
        mode="train",
        severity="critical",
        tensors=("gradient/fc.weight",),
        value=3.0,
        threshold=0.0,
        message="NaN",
        ts=100.0,
        publish_ts=99.5,
    )
    kw.update(over)
    return AlertEvent(**kw)


def test_alert_json_has_the_documented_fields() -> None:
    """The alerts-topic JSON carries every field the contract promises."""
    doc = json.loads(_event().to_json())
    for field in (
        "id",
        "job",
        "rule",
        "status",
        "step",
        "mode",
        "severity",
        "tensors",
        "value",
        "threshold",
        "message",
        "ts",
    ):
        assert field in doc
    assert doc["tensors"] == ["gradient/fc.weight"]


def test_alert_ids_are_deterministic_and_distinguish_transitions() -> None:
    """The same transition always has the same id; firing and resolved differ."""
    assert _event().id == _event(ts=5.0).id
    assert _event().id != _event(status="resolved").id
    assert _event().id != _event(step=13).id


def test_non_finite_values_survive_json() -> None:
    """NaN and inf travel as strings (JSON has neither) and come back as floats."""
    ev = AlertEvent.from_json(_event(value=math.inf, threshold=math.nan).to_json())
    assert ev.value == math.inf and math.isnan(ev.threshold)


def test_bad_alert_json_is_a_decode_error() -> None:
    """A message that is not an alert raises DecodeError, not a KeyError."""
    with pytest.raises(DecodeError):
        AlertEvent.from_json(b'{"job": 1}')


def test_format_is_one_readable_line() -> None:
    """The CLI line names status, rule, job, step and the tensor."""
    line = _event().format()
    assert "\n" not in line and "FIRING" in line and "ExplodingTensor" in line and "step 12" in line


def test_actions_round_trip_and_validate() -> None:
    """Control messages encode and decode; unknown actions are refused on both sides."""
    msg = decode_action(encode_action("stop", "job-1", rule="ExplodingTensor", step=3))
    assert (msg["action"], msg["job"], msg["step"]) == ("stop", "job-1", 3)
    with pytest.raises(ValueError):
        encode_action("reboot", "job-1")
    with pytest.raises(DecodeError):
        decode_action(b'{"action": "reboot", "job": "j", "ts": 1}')


@pytest.mark.parametrize("job", ["", "a b", "../x", "x.y", "-lead", "é", "a" * 129])
def test_invalid_job_ids_are_rejected(job: str) -> None:
    """Job ids that could escape their topic name space are refused with guidance."""
    with pytest.raises(ConfigError, match="sanitise_job"):
        topics.reductions_topic(job)


def test_topic_names_and_round_trip() -> None:
    """A job's topics follow the prefix; the job id is recovered from the topic name."""
    assert topics.reductions_topic("r-1") == "tensorpulse.reductions.r-1"
    assert topics.control_topic("r-1", "team.") == "team.control.r-1"
    assert topics.job_of_topic("tensorpulse.reductions.r-1") == "r-1"
    assert topics.job_of_topic("changelog__g--tensorpulse.reductions.r-1--default") is None
    assert topics.sanitise_job("resnet50 / lr=0.1") == "resnet50-lr-0-1"


def test_kafka_env_pass_through_and_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """TENSORPULSE_KAFKA_* become librdkafka properties; secrets never appear in logs."""
    monkeypatch.setenv("TENSORPULSE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TENSORPULSE_KAFKA_SASL_PASSWORD", "hunter2")
    conf = client_config("b:9092")
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.password"] == "hunter2"
    assert redact(conf)["sasl.password"] == "***" and redact(conf)["bootstrap.servers"] == "b:9092"
    assert env_overrides({"TENSORPULSE_KAFKA_": "x"}) == {}


def test_names_match_in_full_no_trailing_newline() -> None:
    """`$` would accept "job\\n": job ids, prefixes and topic names are matched in full."""
    for bad in ("job\n", "job\r\n", "\njob", "jo\x00b"):
        with pytest.raises(ConfigError):
            topics.validate_job(bad)
    with pytest.raises(ConfigError):
        topics.validate_prefix("tensorpulse.\n")
    assert topics.job_of_topic("tensorpulse.reductions.job\n") is None
    assert topics.job_of_topic("tensorpulse.reductions.job-1") == "job-1"


def test_control_decoder_raises_only_decode_error() -> None:
    """The hostile control messages of the security issue give DecodeError, not a listener-killing error."""
    stop = json.loads(encode_action("stop", "job-1", rule="R", alert_id="a", step=3, reason="r"))
    for payload in (
        b"[" * 60000,
        json.dumps({**stop, "ts": int("9" * 400)}).encode(),
        json.dumps({**stop, "action": ["stop"]}).encode(),
        json.dumps({**stop, "job": {"a": 1}}).encode(),
        json.dumps({**stop, "step": 10**400}).encode(),
    ):
        with pytest.raises(DecodeError):
            decode_action(payload)
    assert decode_action(json.dumps(stop).encode())["action"] == "stop"


def test_control_decoder_refuses_deep_nesting_before_parsing_it() -> None:
    """Deep nesting, in a run or between keys, is refused by counting brackets (not by the JSON
    parser's RecursionError, a hundred times the cost of a message); a reason that quotes a few
    brackets is still a message."""
    stop = json.loads(encode_action("stop", "job-1", reason="loss [nan] at {step 3}"))
    for payload in (b"[" * 5_000, b'{"a":' * 2_000 + b"1" + b"}" * 2_000):
        with pytest.raises(DecodeError, match="nested too deep"):
            decode_action(payload)
    assert decode_action(json.dumps(stop).encode())["reason"] == "loss [nan] at {step 3}"
    many = json.dumps({**stop, "reason": "[x]" * 200}).encode()
    assert decode_action(many)["reason"] == "[x]" * 200
