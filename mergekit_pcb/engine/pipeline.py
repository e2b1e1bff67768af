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


def read_ahead(items: Iterable[T], read: Callable[[T], R], depth: int = 1,
               size: Callable[[T], int] | None = None, budget: int | None = None
               ) -> Iterator[tuple[T, R]]:
    """(item, read(item)) in order, with up to `depth` reads done ahead in a thread.

    With `size` and `budget`, the reads held ahead (started, not yet handed on) also add
    up to at most `budget` of `size`, or are one read: a next read that would pass it
    starts only once the reads before it are handed on, so two large tensors are not held
    ahead at once."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="pcbmerge-read")
    pending: deque[tuple[T, Future[R], int]] = deque()
    held = 0
    source = iter(items)
    try:
        for item in source:
            n = 0 if size is None else size(item)
            while pending and budget is not None and held + n > budget:
                first, future, m = pending.popleft()
                held -= m
                yield first, future.result()
            pending.append((item, pool.submit(read, item), n))
            held += n
            if len(pending) > depth:
                first, future, m = pending.popleft()
                held -= m
                yield first, future.result()
        while pending:
            first, future, _ = pending.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class WriteBehind:
    """Calls run in submission order on one thread, at most `depth` waiting; an error in
    the thread is raised in the caller at its next `submit` or at `drain`."""

    def __init__(self, depth: int = 4, budget: int | None = None) -> None:
        self.depth = depth
        # With a budget, the `size`s of the calls waiting add up to at most it (or are one
        # call): a large tensor's output waits alone for its write.
        self.budget = budget
        self._held = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pcbmerge-write")
        self._pending: deque[tuple[Future[Any], int]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any, size: int = 0) -> None:
        while self._pending and (self._pending[0][0].done() or len(self._pending) >= self.depth
                                 or (self.budget is not None
                                     and self._held + size > self.budget)):
            self._take_first()
        self._pending.append((self._pool.submit(fn, *args), size))
        self._held += size

    def _take_first(self) -> None:
        future, size = self._pending.popleft()
        self._held -= size
        future.result()

    def drain(self) -> None:
        while self._pending:
            self._take_first()

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
