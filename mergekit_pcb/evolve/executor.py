"""Where candidates are scored: an `Executor` maps a picklable function over picklable jobs.

Two implementations: in this process (`SerialExecutor`) and in K processes
(`ProcessExecutor`, started with the "spawn" context so that workers share no torch or
RNG state with the parent). Both set the same torch thread count around each job, which is
what makes a score bit-identical whichever process computes it. The Ray executor
(`ray_executor`) adds workers on other machines, which keep their own copy of the population.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mergekit_pcb.machine import usable_cores
from mergekit_pcb.threads import torch_threads

if TYPE_CHECKING:
    from mergekit_pcb.evolve.ray_executor import RaySettings
    from mergekit_pcb.evolve.replica import PopulationLog

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    workers: int
    # Workers read the driver's member files and write accepted trials beside them. When
    # False (Ray without a shared run directory) each worker keeps its own copy, and the
    # driver writes accepted trials itself.
    shares_files: bool
    spare_core: bool  # whether a job may prepare the next one on an idle core

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items, results in the order of items."""
        ...

    def close(self) -> None: ...

    def track(self, population: PopulationLog, member_dir: Path) -> None:
        """Keep the workers' copies of the population in step (only where files are not
        shared)."""
        ...


class SerialExecutor:
    shares_files = True

    def __init__(self, threads: int | None = 1) -> None:
        self.workers = 1
        self.threads = threads
        # A core the jobs' torch threads leave idle: a merged-mode job prepares the next
        # candidate on it while its fitness runs (`jobs.Runtime.prepare_next`).
        self.spare_core = threads is not None and threads < usable_cores()

    def track(self, population: PopulationLog, member_dir: Path) -> None:
        pass

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        with torch_threads(self.threads):
            return [fn(item) for item in items]

    def close(self) -> None:
        pass


def _init_worker(threads: int | None) -> None:
    import signal

    import torch

    # Ctrl-C reaches the whole process group: the parent stops the run and terminates the
    # pool, so a worker's own KeyboardInterrupt would only print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    torch.set_num_threads(threads or 1)


class ProcessExecutor:
    shares_files = True
    spare_core = False  # its jobs go to any worker: the one that prepared ahead may not get it

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

    def track(self, population: PopulationLog, member_dir: Path) -> None:
        pass


@contextlib.contextmanager
def executor_scope(workers: int | None, threads: int | None,
                   ray: RaySettings | None = None) -> Iterator[Executor]:
    """An executor for a run: closed when the run ends, terminated when it fails (a killed
    run must not leave workers behind). `ray` set: a Ray executor (`workers` None: as many
    as the cluster holds)."""
    from mergekit_pcb.errors import UserError

    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    ex: Executor
    if ray is not None:
        from mergekit_pcb.evolve.ray_executor import RayExecutor

        ex = RayExecutor(workers, threads, ray)
    else:
        ex = make_executor(workers or 1, threads)
    try:
        yield ex
    except BaseException:
        terminate = getattr(ex, "terminate", None)
        if terminate is not None:
            terminate()
        raise
    ex.close()


def make_executor(workers: int, threads: int | None = 1) -> Executor:
    if workers <= 1:
        return SerialExecutor(threads)
    return ProcessExecutor(workers, threads)


__all__ = ["Executor", "ProcessExecutor", "SerialExecutor", "executor_scope", "make_executor"]
