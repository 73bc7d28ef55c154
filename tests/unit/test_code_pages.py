"""producers/code_pages.py: the resident pages of read-only file mappings under a folder are handed back."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

from tensorpulse.producers import code_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")

SIZE = 8 << 20


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):
                inside = line.rstrip().endswith(str(path))
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total


def _mapped(path: Path, access: int) -> tuple[mmap.mmap, object]:
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    f = open(path, "rb" if access == mmap.ACCESS_READ else "r+b")  # noqa: SIM115 - closed by the caller
    m = mmap.mmap(f.fileno(), SIZE, access=access)
    assert sum(m[i + 1] for i in range(0, SIZE, mmap.PAGESIZE)) > 0  # touch every page
    return m, f


def test_a_read_only_mapping_under_the_folder_leaves_resident_memory(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "code.so"
    path.parent.mkdir()
    m, f = _mapped(path, mmap.ACCESS_READ)
    try:
        before = _resident_kib(path)
        assert before >= SIZE // 1024 // 2
        advised = code_pages.release(str(path.parent))
        if advised == 0:
            pytest.skip("this kernel refuses MADV_PAGEOUT (Linux < 5.4)")
        assert advised >= SIZE
        assert _resident_kib(path) < before // 4
        assert m[SIZE - 1] == 255  # the bytes are still there, read back from the file
    finally:
        m.close()
        f.close()


def test_writable_mappings_and_other_folders_are_left_alone(tmp_path: Path) -> None:
    inside = tmp_path / "lib" / "data.bin"
    inside.parent.mkdir()
    outside = tmp_path / "other" / "code.so"
    outside.parent.mkdir()
    m1, f1 = _mapped(inside, mmap.ACCESS_WRITE)
    m2, f2 = _mapped(outside, mmap.ACCESS_READ)
    try:
        before = _resident_kib(inside), _resident_kib(outside)
        assert code_pages.release(str(inside.parent)) == 0
        assert (_resident_kib(inside), _resident_kib(outside)) == before
    finally:
        for m, f in ((m1, f1), (m2, f2)):
            m.close()
            f.close()
