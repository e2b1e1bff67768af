"""One object per process for the run a job belongs to: what a scoring process (a pool
worker, a Ray actor or the driver itself) keeps from one job to the next."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class ProcessLocal(Generic[C]):
    """One object per process for the run a job belongs to (its evaluator, caches, open
    files), built on first use and closed when a job of another run arrives."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._value: C | None = None

    def get(self, key: str, build: Callable[[], C]) -> C:
        if self._value is None or self._key != key:
            if self._value is not None:
                self._value.close()
            self._value, self._key = build(), key
        return self._value

    def current(self) -> C | None:
        return self._value

    def release(self, key: str) -> None:
        """Close the object of run `key`, if it is this process's."""
        if self._value is not None and self._key == key:
            self._value.close()
            self._value, self._key = None, None


__all__ = ["Closable", "ProcessLocal"]
