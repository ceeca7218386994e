"""Components plugged in by name: attention modules, fusion modes and data readers each have a :class:`Registry`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes by short lowercase name; ``kind`` says what it holds, for messages (``"attention"``, ``"fusion"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator adding a class under ``name`` (case-insensitive).

        Raises:
            ValueError: ``name`` is empty or already registered.
        """
        key = name.lower()
        if not key:
            raise ValueError(f"a {self.kind} name must be a non-empty string")

        def decorator(cls: type[T]) -> type[T]:
            if key in self._classes:
                raise ValueError(f"{self.kind} {key!r} is already registered ({self._classes[key].__name__})")
            self._classes[key] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``.

        Raises:
            ValueError: unknown name (the message lists the choices).
        """
        key = name.lower()
        if key not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._classes[key]
