"""The docs' runnable shell steps run as written, in order, page by page (tests/docblocks.py).

Each page's `<!-- runnable -->` blocks run in one bash (`set -euo pipefail`), in the order of the
page, in a fresh folder (with examples/ linked in), a fresh $HOME and no TENSORPULSE_* variables
from the shell that runs the tests, against the session's broker: the docs' local address
127.0.0.1:9092 is replaced with the fixture's. Blocks marked `not runnable` are reported as
skipped with their reason (a GPU, the network, a long-running service).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from docblocks import DOCS_BOOTSTRAP, ROOT, blocks, pages

pytestmark = pytest.mark.integration

ALL = [b for page in pages() for b in blocks(page)]
PAGES = sorted({b.page for b in ALL})
#: Seconds a page's steps may take together: a bound on a hang, not a speed check (the README and
#: the replay page run the demo, about 35 s on a quiet machine and twice that on a busy one).
PAGE_TIMEOUT_S = 300


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORPULSE_") and k != "XDG_STATE_HOME"}
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_runnable_steps_of_the_page_run_in_order(page: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    """The page's runnable blocks, run in order as one script, exit 0 within the time limit; a
    page without any is skipped with the reasons its blocks give."""
    runnable = [b for b in ALL if b.page == page and b.runnable]
    if not runnable:
        pytest.skip("; ".join(f"{b.where}: {b.skip_reason}" for b in ALL if b.page == page))
    script = "set -euo pipefail\n" + "\n".join(b.body for b in runnable).replace(DOCS_BOOTSTRAP, kafka_bootstrap)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=_environment(home),
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{page}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
