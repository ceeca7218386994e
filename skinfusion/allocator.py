"""CPU allocator tuning: freed tensor memory stays in the heap for reuse instead of going back to the kernel.

With glibc's default ``malloc``, a CPU training step or inference batch hands most of its activation memory
back to the kernel when it ends (blocks above the adaptive *mmap threshold*, at most 32 MiB, are unmapped;
free memory above the *trim threshold* at the top of the heap is released), and the next step faults the same
amount back in as fresh pages. :func:`tune_malloc` raises both thresholds with ``mallopt(3)``: the page faults
go, the results stay bit-identical, and the process keeps its peak memory instead of shrinking after it.

The ``skinfusion`` command tunes its process for every command; a Python program calls :func:`tune_malloc`
itself. Nothing happens off glibc, or where the environment configures the allocator (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``GLIBC_TUNABLES``, a preloaded jemalloc, tcmalloc or mimalloc):
``MALLOC_TRIM_THRESHOLD_=131072`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

__all__ = ["tune_malloc"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameter numbers (glibc <malloc.h>)
MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # up to 2 GiB of free memory at the top of the heap is kept (mallopt takes a C int)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_tuned = False


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tune_malloc() -> bool:
    """Make glibc ``malloc`` keep freed memory for reuse (process-wide, not undone; calling it again is free).

    Returns:
        ``True`` when the settings are in effect; ``False`` off glibc or where the environment configures the
        allocator (see the module docstring), which is respected.
    """
    global _tuned
    if _tuned:
        return True
    if not _is_glibc():
        return False
    preloaded = os.environ.get("LD_PRELOAD", "")
    if (
        any(name in os.environ for name in _USER_SETTINGS)
        or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
        or any(lib in preloaded for lib in ("jemalloc", "tcmalloc", "mimalloc"))
    ):
        log.info("malloc tuning skipped: the environment configures the allocator")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # The mmap threshold first: setting either one switches glibc's adaptive thresholds off, and a trim
    # threshold alone would leave the mmap threshold at 128 KiB (every activation mmap-ed: far worse).
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
