"""Hands back the pages of LLVM's code that loading numba's kernels touched (Linux).

Why: numba loads even its cached kernels through LLVM (llvmlite's one shared library, ~180 MB
of code). Loading the library runs its static initialisers, and numba's first use builds its
runtime module and links the kernels: together they touch ~70 MiB of the file's pages, which
then stay in the process's resident memory (issue 23: about half of the hook's extra memory on
a 201M-parameter CPU model), though nothing runs them again until numba compiles something
new: a loaded kernel is plain machine code in the process's own memory.

They are clean pages of a file. `madvise(MADV_PAGEOUT)` asks the kernel to reclaim them now
instead of under memory pressure: the bytes stay what they were, a page that runs again is read
back from the file (a new numba compile pays that once), and a page that another process maps
too (another rank on the machine) is left alone. Only read-only mappings of files under the
given folder are advised; nothing anonymous or writable. Linux 5.4 or later; elsewhere, or when
the kernel refuses, nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

#: madvise advice: reclaim these pages now (linux/mman.h, Linux 5.4).
MADV_PAGEOUT = 21


def _mappings(folder: str) -> list[tuple[int, int]]:
    """(start, end) of this process's read-only mappings of files under `folder`."""
    prefix = os.path.realpath(folder) + os.sep
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or "w" in fields[1] or not fields[5].startswith(prefix):
                continue
            start, end = (int(v, 16) for v in fields[0].split("-"))
            found.append((start, end))
    return found


def release(folder: str) -> int:
    """Asks the kernel to reclaim the resident pages of this process's read-only mappings of
    files under `folder`; the bytes of address range advised (0 where unsupported)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        ranges = _mappings(folder)
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    done = 0
    for start, end in ranges:
        if madvise(start, end - start, MADV_PAGEOUT) != 0:
            log.debug("tensorpulse: madvise(MADV_PAGEOUT) refused: %s", os.strerror(ctypes.get_errno()))
            break
        done += end - start
    return done
