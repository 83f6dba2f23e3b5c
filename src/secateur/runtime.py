"""Process-level settings for long CPU runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def tune_allocator() -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    Every block forward allocates and frees activations of hundreds of MB; glibc serves those with
    fresh mmaps, and the page faults cost about a third of the CPU time of a pruning run. Only on
    glibc (Linux); elsewhere a no-op. Returns whether the setting took.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 62) == 1
    except (OSError, AttributeError):
        return False
    log.debug("glibc allocator tuned: %s", ok)
    return ok


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's malloc_trim, which reaches free pages in
    the middle of the heap too): between the blocks of a streamed run, so that the holes the last
    block's temporaries left do not add up to resident memory block after block. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
