"""Compiled kernels that a process loads once it has work enough to pay for them.

Importing numba and loading a cached kernel costs about a second: more than a small merge
spends in the code a kernel replaces. So a kernel starts out unloaded, and the torch (or
numpy) code it replaces runs; once the process has handed `after` entries to that code, or
a caller that knows it will repeat the work asks for it (`request_all`, as an evolution
does), the kernel loads on a background thread, is checked against the code it replaces on
probes, and is used from then on. It gives the same bits, so results do not depend on when
it became ready; any failure to import, compile or match leaves the fallback in place.
"""

from __future__ import annotations

import atexit
import importlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

# numba colours its error messages through colorama, whose init()/deinit() save and restore
# sys.stdout. Loading a kernel builds such messages (numba.cpython.listobj makes one at
# import), and on a loader thread that restore can land after the caller has swapped
# sys.stdout back (click's CliRunner, contextlib.redirect_stdout), leaving the caller's
# stdout pointing at a stream it has closed. Plain messages never touch sys.stdout. Set
# here, on the importing thread, before anything imports numba.
os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")


class StagedKernel:
    """A kernel module loaded in the background; `ready()` is None until it is checked.

    `load` names the module to import, or returns the kernel."""

    def __init__(self, name: str, after: int, load: str | Callable[[], Any],
                 check: Callable[[Any], bool], *, register: bool = True) -> None:
        """`register`: `request_all` starts it and the process's exit waits for its loader
        (the package's kernels; a probe made for a test need not be)."""
        self.name = name
        self.after = after
        self._load = load
        self._check = check
        self._seen = 0
        self._kernel: Any = None
        self._loader: threading.Thread | None = None
        self._lock = threading.Lock()
        if register:
            _ALL.append(self)

    def ready(self) -> Any:
        return self._kernel

    def count(self, entries: int) -> None:
        """`entries` went through the fallback; past `after`, start loading."""
        if self._loader is not None:
            return
        with self._lock:
            self._seen += entries
            if self._seen < self.after:
                return
        self.request()

    def request(self) -> None:
        """Start loading now, unless loading has started."""
        with self._lock:
            if self._loader is not None:
                return
            self._loader = threading.Thread(target=self._run, name=f"{self.name}-loader",
                                            daemon=True)
        self._loader.start()

    def loading(self) -> bool:
        """True while its loader runs (importing, compiling or checking the kernel)."""
        return self._loader is not None and self._loader.is_alive()

    def wait(self, timeout: float | None = None) -> Any:
        """Request the kernel and wait for it; None when it cannot be used here."""
        self.request()
        assert self._loader is not None
        self._loader.join(timeout)
        return self._kernel

    def _run(self) -> None:
        try:
            kernel = importlib.import_module(self._load) if isinstance(self._load, str) \
                else self._load()
            if kernel is not None and self._check(kernel):
                self._kernel = kernel
        except Exception:  # numba missing or unusable, no writable cache, a mismatch
            pass


_ALL: list[StagedKernel] = []
# The fused kernels' module (numba): imported only through a StagedKernel.
FUSED_KERNELS = "mergekit_pcb.methods.fused_kernel"
# Entries handed to the code a fused kernel replaces before the kernel loads, for callers
# outside the engine: the engine asks for the kernels at a merge's start when the merge is
# large enough (`stream.request_kernels_if_worth_it`), an evolution at its start.
FUSE_AFTER = 1 << 28
# Smaller tensors stay with torch: a kernel call's own cost would dominate.
FUSE_MIN = 1 << 12


def fused_kernels(name: str, check: Callable[[Any], bool]) -> StagedKernel:
    """The fused kernels' module, staged for one caller: each checks the kernels it uses
    against its own torch code, so a mismatch in one leaves the others in use."""
    return StagedKernel(name, FUSE_AFTER, FUSED_KERNELS, check)


def fusable(tensors: Sequence[torch.Tensor]) -> bool:
    """True for float32 CPU tensors of one shape, each large enough to pay for a call."""
    shape = tensors[0].shape
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() >= FUSE_MIN
               and not t.requires_grad and t.shape == shape for t in tensors)


def flat_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's entries as a flat contiguous numpy array (a view where they already are)."""
    return tensor.detach().reshape(-1).contiguous().numpy()


def request_all() -> None:
    """Start loading every kernel: the caller will repeat its merges many times."""
    for kernel in _ALL:
        kernel.request()


def still_loading(wait_s: float = 0.0) -> list[str]:
    """The kernels whose loader still runs after up to `wait_s` seconds: what the process's
    exit will wait for. A first load compiles (a minute; the command line says so), a cached
    one takes a second or two (said by nobody: `wait_s` lets it finish)."""
    deadline = time.monotonic() + wait_s
    for kernel in _ALL:
        if kernel._loader is not None:
            kernel._loader.join(max(0.0, deadline - time.monotonic()))
    return [kernel.name for kernel in _ALL if kernel.loading()]


def _join_loaders() -> None:
    """At exit, let a loader finish: a compiler stopped halfway through interpreter shutdown
    can take the process down with it."""
    for kernel in _ALL:
        if kernel._loader is not None:
            kernel._loader.join(timeout=120)


atexit.register(_join_loaders)

__all__ = ["FUSED_KERNELS", "FUSE_AFTER", "FUSE_MIN", "StagedKernel", "flat_array", "fusable",
           "fused_kernels", "request_all", "still_loading"]
