"""Run a few independent single-threaded torch calls at once, one per torch thread.

Some steps of a method stay on one core whatever torch's thread count: a full `argsort`
(the tie-break mergekit's trims use) is the main one. When several models of one tensor
need it, their sorts run side by side on threads of a small pool; the results are the
same as one after another, since each call is deterministic on its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, size, pool)


def _pool(size: int) -> ThreadPoolExecutor:
    """The pool of this process (a forked worker must not reuse its parent's threads)."""
    global _POOL
    pid = os.getpid()
    if _POOL is None or _POOL[0] != pid or _POOL[1] != size:
        if _POOL is not None and _POOL[0] == pid:  # a new thread count: its calls are done
            _POOL[2].shutdown(wait=False)
        _POOL = (pid, size, ThreadPoolExecutor(size, thread_name_prefix="side-by-side"))
    return _POOL[2]


def start(call: Callable[[], T]) -> Callable[[], T]:
    """Start `call` on a pool thread when torch may use more than one thread (else run it
    now); the returned function waits for its result. The caller goes on meanwhile: a
    sort started here overlaps the work that finds whether the next model needs one."""
    threads = torch.get_num_threads()
    if threads <= 1:
        result = call()
        return lambda: result
    return _pool(threads).submit(call).result


__all__ = ["start"]
