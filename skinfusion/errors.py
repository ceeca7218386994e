"""Exceptions raised by skinfusion: the command line reports these (and only these) as one line with what to do.

Every error about user input names the offending file and the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ConfigError", "DataError", "SkinFusionError", "WeightsError", "config_errors"]


class SkinFusionError(Exception):
    """Base class of every error skinfusion raises on purpose."""

    #: What to do about it, for the command line.
    hint = ""


class DataError(SkinFusionError, ValueError):
    """A data file (image, mask, CSV, manifest; ``path``, or ``None``) is missing, unreadable or inconsistent."""

    hint = "fix or remove the file; `skinfusion prepare` checks a whole data set and lists every problem"

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def __reduce__(self):  # keep picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


class WeightsError(SkinFusionError, ValueError):
    """A weight file or checkpoint cannot be loaded (wrong keys, shapes, or unsafe content)."""

    hint = "check that the file is a skinfusion checkpoint or export of the network configured"


class ConfigError(SkinFusionError, ValueError):
    """An argument or configuration value that the objects it configures refuse."""

    hint = "`skinfusion COMMAND --help` lists the options (`--print_config` prints a training run's whole config)"


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn a ``ValueError`` raised while building objects from the user's configuration into a :class:`ConfigError`."""
    try:
        yield
    except SkinFusionError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
