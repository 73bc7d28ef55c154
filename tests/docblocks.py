"""The shell blocks of README.md and docs/*.md, and whether each is meant to run as written.

A ```bash block is preceded by one marker line:
    <!-- runnable -->                  tests/integration/test_docs_blocks.py runs it, after the
                                       page's earlier runnable blocks, in one shell, in order;
    <!-- not runnable: REASON -->      it is not run, and REASON says why (a GPU, the network,
                                       a long-running service, placeholders to fill in).
tests/unit/test_docs_blocks.py keeps every block marked, so that a new step decides which it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The address the docs use for a local broker; the test runs the blocks against its own.
DOCS_BOOTSTRAP = "127.0.0.1:9092"

_BLOCK = re.compile(
    r"(?:^<!--\s*(?P<marker>runnable|not runnable:\s*(?P<reason>.*?))\s*-->\n)?^```(?:bash|sh|shell)\n(?P<body>.*?)^```$",
    re.M | re.S,
)


@dataclass(frozen=True)
class Block:
    """One shell block: where it is, its text, and why it is not run (None: it runs)."""

    page: str
    line: int
    body: str
    marked: bool
    skip_reason: str | None

    @property
    def runnable(self) -> bool:
        return self.marked and self.skip_reason is None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """The shell blocks of `page`, in order."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("body"))  # the fence's line, 1-based
        out.append(
            Block(
                page=str(page.relative_to(ROOT)),
                line=line,
                body=m["body"],
                marked=m["marker"] is not None,
                skip_reason=None if m["marker"] in (None, "runnable") else m["reason"].strip(),
            )
        )
    return out
