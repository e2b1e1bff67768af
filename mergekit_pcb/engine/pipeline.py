"""Overlapping read, compute and write: a reader thread runs ahead of the merge and a writer
thread runs behind it, each a fixed number of items deep.

File reads (`readinto`) and torch kernels release the GIL, so Python threads overlap
them for real. Each stage is a single thread, so order is kept and the file handles and the
shard writer are only ever used by one thread at a time. Memory stays bounded: at most
`depth` items wait in each stage. Between them, `InOrder` can spread the merge itself over
a few single-threaded workers and hand their results on in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], read: Callable[[T], R], depth: int = 1
               ) -> Iterator[tuple[T, R]]:
    """(item, read(item)) in order, with up to `depth` reads done ahead in a thread."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="pcbmerge-read")
    pending: deque[tuple[T, Future[R]]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append((item, pool.submit(read, item)))
            if len(pending) > depth:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class WriteBehind:
    """Calls run in submission order on one thread, at most `depth` waiting; an error in
    the thread is raised in the caller at its next `submit` or at `drain`."""

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pcbmerge-write")
        self._pending: deque[Future[Any]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.depth):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InOrder:
    """Calls run on `width` worker threads (or at once in the caller when `width` is 1) and
    their results are taken back in submission order, at most `2 × width` in flight.

    `initializer` runs once in each worker thread (the engine pins torch to one thread
    there). `take` hands each finished result, oldest first, to the `done` callback given
    at its submission; an error raised by a call is raised in the caller there.
    """

    def __init__(self, width: int, initializer: Callable[[], None] | None = None) -> None:
        self.width = max(1, width)
        # Twice as many in flight as workers: a worker slowed by a busy core holds up the
        # hand-over, not the other workers, which go on with the next parts meanwhile.
        self.depth = 2 * self.width
        self._pool = None if self.width == 1 else ThreadPoolExecutor(
            self.width, thread_name_prefix="pcbmerge-part", initializer=initializer)
        self._pending: deque[tuple[Future[Any], Callable[[Any], None]]] = deque()

    def submit(self, fn: Callable[..., R], done: Callable[[R], None], *args: Any) -> None:
        if self._pool is None:
            done(fn(*args))
            return
        self._pending.append((self._pool.submit(fn, *args), done))
        while self._pending and (len(self._pending) > self.depth or self._pending[0][0].done()):
            self._take_first()

    def run_here(self, fn: Callable[..., R], done: Callable[[R], None], *args: Any) -> None:
        """Run `fn` in the caller once every earlier call is handed over (work that needs
        all the threads to itself)."""
        self.drain()
        done(fn(*args))

    def drain(self) -> None:
        """Wait for every call in flight and hand over its result."""
        while self._pending:
            self._take_first()

    def _take_first(self) -> None:
        future, done = self._pending.popleft()
        done(future.result())

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> InOrder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["InOrder", "WriteBehind", "read_ahead"]
