"""Where candidates are scored: an `Executor` maps a picklable function over picklable jobs.

Two implementations: in this process (`SerialExecutor`) and in K processes
(`ProcessExecutor`, started with the "spawn" context so that workers share no torch or
RNG state with the parent). Both set the same torch thread count around each job, which is
what makes a score bit-identical whichever process computes it. A cluster executor (Ray)
only needs `map` and `close`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from mergekit_pcb.threads import torch_threads

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    workers: int

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items, results in the order of items."""
        ...

    def close(self) -> None: ...


class SerialExecutor:
    def __init__(self, threads: int | None = 1) -> None:
        self.workers = 1
        self.threads = threads

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        with torch_threads(self.threads):
            return [fn(item) for item in items]

    def close(self) -> None:
        pass


def _init_worker(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or 1)


class ProcessExecutor:
    def __init__(self, workers: int, threads: int | None = 1,
                 context: str = "spawn") -> None:
        self.workers = workers
        ctx = multiprocessing.get_context(context)
        self._pool: Any = ctx.Pool(workers, initializer=_init_worker, initargs=(threads,))

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return list(self._pool.map(fn, items, chunksize=1))

    def close(self) -> None:
        self._pool.close()
        self._pool.join()

    def terminate(self) -> None:
        self._pool.terminate()
        self._pool.join()


@contextlib.contextmanager
def executor_scope(workers: int, threads: int | None) -> Iterator[Executor]:
    """An executor for a run: closed when the run ends, terminated when it fails (a killed
    run must not leave workers behind)."""
    from mergekit_pcb.errors import UserError

    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    ex = make_executor(workers, threads)
    try:
        yield ex
    except BaseException:
        terminate = getattr(ex, "terminate", None)
        if terminate is not None:
            terminate()
        raise
    ex.close()


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

    def release(self, key: str) -> None:
        """Close the object of run `key`, if it is this process's."""
        if self._value is not None and self._key == key:
            self._value.close()
            self._value, self._key = None, None


def make_executor(workers: int, threads: int | None = 1) -> Executor:
    if workers <= 1:
        return SerialExecutor(threads)
    return ProcessExecutor(workers, threads)


__all__ = ["Executor", "ProcessExecutor", "ProcessLocal", "SerialExecutor", "executor_scope",
           "make_executor"]
