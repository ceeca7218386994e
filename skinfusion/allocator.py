"""CPU allocator tuning: keep freed tensor memory for reuse instead of handing it back to the kernel every step.

With glibc's default ``malloc``, a CPU training step or a large inference batch returns most of its
activation memory to the kernel when it ends (allocations above the *mmap threshold*, which adapts up to
32 MiB, are ``munmap``-ed; free memory above the *trim threshold* at the top of the heap is released), and
the next step faults the same amount back in as fresh, zero-filled pages. Measured on the 2-core
development VM (``python benchmarks/bench_allocator.py``): 14,000-28,000 minor page faults and 30-60 ms of
kernel time per ResNet-18 U-Net training step (96 px, batch 8; 12-22 % of the step), and 55,000-129,000
faults per batch of 8 in ResNet-50 inference at 224 px.

:func:`tune_malloc` raises both thresholds with ``mallopt(3)`` so that tensor memory stays in the heap and
is reused: the page faults go to zero and a step gets faster by the kernel time it no longer spends. The
results are bit-identical (only where memory comes from changes); the price is that the process keeps its
peak memory instead of shrinking after it. Only glibc (Linux) is affected; elsewhere it does nothing.

The :class:`~skinfusion.training.callbacks.MallocTuning` callback (in ``experiments/base.yaml``) applies it when a
``fit``/``validate``/``test``/``predict`` run is set up; ``skinfusion predict``, ``evaluate`` and ``prepare``
apply it unless ``--no-malloc-tuning`` is given.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import platform
import sys

__all__ = [
    "DEFAULT_MMAP_THRESHOLD",
    "DEFAULT_TRIM_THRESHOLD",
    "add_no_tuning_flag",
    "check_thresholds",
    "malloc_settings",
    "tune_malloc",
]

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1  # mallopt takes a C int

DEFAULT_MMAP_THRESHOLD = 1 << 30
"""Allocations below 1 GiB come from the heap (glibc's adaptive default stops at 32 MiB)."""
DEFAULT_TRIM_THRESHOLD = _INT_MAX
"""Up to 2 GiB of free memory at the top of the heap is kept for reuse (glibc's default is 128 KiB, adaptive)."""

# Environment variables that mean the user configured the allocator themselves; we then leave it alone.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: dict[str, int] | None = None


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _user_configured() -> str | None:
    for name in _USER_SETTINGS:
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def check_thresholds(mmap_threshold: int, trim_threshold: int) -> None:
    """Raise ``ValueError`` unless both thresholds are integer byte counts that ``mallopt`` accepts."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT_MAX:
            raise ValueError(f"{name} must be an integer number of bytes in 1..{_INT_MAX}, got {value!r}")


def tune_malloc(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
) -> bool:
    """Make glibc ``malloc`` keep freed memory for reuse (no page-fault churn between training steps).

    Process-wide and not undone (other code in the process shares the allocator). Calling it again with the
    same values does nothing; different values replace the earlier ones.

    Args:
        mmap_threshold: bytes; allocations of at least this size are served by ``mmap`` and returned to the
            kernel when freed. Between 1 and 2**31 - 1.
        trim_threshold: bytes of free memory at the top of the heap kept before the heap is shrunk.
            Between 1 and 2**31 - 1.

    Returns:
        ``True`` when the settings are in effect; ``False`` when nothing was changed: not glibc (macOS,
        Windows, musl), or the allocator was configured through the environment (``MALLOC_*_`` variables,
        ``GLIBC_TUNABLES``, or a preloaded jemalloc/tcmalloc/mimalloc), which is respected.

    Raises:
        ValueError: a threshold outside 1 .. 2**31 - 1.
    """
    global _applied
    check_thresholds(mmap_threshold, trim_threshold)
    settings = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
    if _applied == settings:
        return True
    if not _is_glibc():
        log.debug("malloc tuning skipped: not glibc (%s)", sys.platform)
        return False
    user = _user_configured()
    if user is not None:
        log.info("malloc tuning skipped: the allocator is configured through %s", user)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always exports mallopt
        log.debug("malloc tuning skipped: mallopt not found")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either one switches glibc's adaptive thresholds off, and a trim
    # threshold alone would leave the mmap threshold at 128 KiB (every activation mmap-ed: far worse).
    if not mallopt(_M_MMAP_THRESHOLD, mmap_threshold) or not mallopt(_M_TRIM_THRESHOLD, trim_threshold):
        log.warning("mallopt refused mmap_threshold=%d / trim_threshold=%d", mmap_threshold, trim_threshold)
        return False
    _applied = settings
    log.debug("malloc tuned: %s", settings)
    return True


def add_no_tuning_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, gain: str) -> None:
    """Add a command's ``--no-malloc-tuning`` flag (``args.no_malloc_tuning``); ``gain`` says what tuning buys."""
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help=f"keep glibc's allocator defaults (by default freed memory is kept for reuse: {gain})",
    )


def malloc_settings() -> dict[str, int] | None:
    """The settings :func:`tune_malloc` put in effect in this process, or ``None``."""
    return None if _applied is None else dict(_applied)
