"""Exceptions raised by skinfusion.

Every error about user input names the offending file and the reason, so that a bad file is
found at ``prepare``/``setup`` time rather than hours into training.
"""

from __future__ import annotations

from pathlib import Path


class SkinFusionError(Exception):
    """Base class of every error skinfusion raises on purpose."""


class DataError(SkinFusionError, ValueError):
    """A data file (image, mask, CSV, manifest) is missing, unreadable or inconsistent.

    Args:
        path: the file the problem is about (``None`` when it is about no single file).
        reason: a short human-readable reason, e.g. ``"mask is 512x384 but image is 512x512"``.
    """

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def __reduce__(self):  # keep picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


class WeightsError(SkinFusionError, ValueError):
    """A weight file or checkpoint cannot be loaded (wrong keys, shapes, or unsafe content)."""
