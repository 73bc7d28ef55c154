"""Every shell block of README.md and docs/*.md says whether it runs as written (tests/docblocks.py)."""

from __future__ import annotations

from docblocks import blocks, pages


def test_every_shell_block_is_marked() -> None:
    """A block without `<!-- runnable -->` or `<!-- not runnable: REASON -->` before it fails here,
    so that a new step in the docs is either run by the docs test or says why it cannot be."""
    unmarked = [b.where for page in pages() for b in blocks(page) if not b.marked]
    assert unmarked == [], f"shell blocks without a runnable marker: {unmarked}"


def test_skipped_blocks_say_why_and_distributed_runs() -> None:
    """Every skip has a reason; docs/distributed.md and docs/configuration.md have runnable steps."""
    found = [b for page in pages() for b in blocks(page)]
    assert all(b.skip_reason for b in found if b.marked and not b.runnable)
    runnable_pages = {b.page for b in found if b.runnable}
    assert {"docs/distributed.md", "docs/configuration.md"} <= runnable_pages
