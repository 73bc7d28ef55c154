"""`alerts --job` and `notify --job` take one kind of job selector: a regex searched in the job id."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tensorpulse.cli import main
from tensorpulse.errors import ConfigError
from tensorpulse.sinks.alerts import job_selector
from tensorpulse.sinks.forwarder import ForwarderSettings


def test_a_selector_is_searched_in_the_job_id() -> None:
    """As the worker's --jobs and a rules file's jobs:, a plain id selects every job containing it; ^id$ one job."""
    sel = job_selector("resnet-4")
    assert sel is not None and sel.search("resnet-4") and sel.search("resnet-42") and not sel.search("vit-4")
    one = job_selector("^resnet-4$")
    assert one is not None and one.search("resnet-4") and not one.search("resnet-42")
    assert job_selector(None) is None and job_selector("") is None


def test_alerts_and_notify_reject_a_bad_selector_alike() -> None:
    """An invalid regex is a usage error of `alerts` (exit 2) and a ConfigError of notify's settings, same words."""
    with pytest.raises(ConfigError, match=r"invalid --job regex '\(resnet'"):
        ForwarderSettings(job_regex="(resnet")
    result = CliRunner().invoke(main, ["alerts", "--job", "(resnet"])
    assert result.exit_code == 2 and "invalid --job regex '(resnet'" in result.output


def test_a_selector_runs_in_linear_time_and_refuses_what_re2_cannot_run() -> None:
    """Job ids come from whoever writes records: `^(a+)+$` on a hostile id answers at once (RE2),
    and a backreference, which RE2 cannot run, is refused with the reason."""
    sel = job_selector("^(a+)+$")
    assert sel is not None
    # Python's re takes longer than the universe's age here: returning at all is the linear engine.
    assert not sel.search("a" * 120 + "!")
    with pytest.raises(ConfigError, match="invalid --job regex.*RE2"):
        job_selector(r"(a)\1")


def test_both_commands_document_the_same_selector() -> None:
    """The --job help of alerts and notify is one text."""
    helps = {}
    for cmd in ("alerts", "notify"):
        param = next(p for p in main.commands[cmd].params if p.opts == ["--job"])
        helps[cmd] = param.help
    assert helps["alerts"] == helps["notify"] and "re.search" in helps["alerts"]
