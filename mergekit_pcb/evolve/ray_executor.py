"""Scoring candidates on a Ray cluster (`--executor ray`).

Each worker is a Ray actor holding what a process-pool worker holds (its evaluator, merge
plans, open members) and, unless the run directory is shared, its own copy of the
population (`replica.Replica`): the members' bytes reach it once through Ray's object store,
and afterwards only the seeds of accepted trials do. Actors are placed by the resources they
ask for (`cpus_per_worker`, `gpus_per_worker`), so that one worker per GPU scores across
nodes.

A job is a pure function of its description and the committed population, so a job whose
actor or node died is simply run again on a fresh actor, which joins with the live members'
bytes: the run's result does not change. Results come back in the order of the jobs, and
every actor pins the same torch thread count, so scores are bit-identical to the process
pool's whatever the number of workers.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mergekit_pcb.errors import UserError
from mergekit_pcb.evolve.replica import PopulationLog, Replica, Sync, make_sync

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "pip install 'mergekit-pcb[ray]'"


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local Ray; "auto": join the running cluster
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    shared_run_dir: bool = False  # every node mounts the run directory at the same path

    def __post_init__(self) -> None:
        if self.cpus_per_worker <= 0 and self.gpus_per_worker <= 0:
            raise UserError("--cpus-per-worker and --gpus-per-worker: a worker must ask for "
                            "some CPU or GPU")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray: Ray is not installed ({INSTALL_HINT})") from None
    return ray


class RayWorker:
    """The actor: runs jobs as a process-pool worker does, on its own copy of the
    population when it gets one."""

    def __init__(self, threads: int | None) -> None:
        import torch

        self.threads = threads or 1
        torch.set_num_threads(self.threads)
        self.replica: Replica | None = None

    def call(self, fn: Callable[[Any], Any], item: Any, sync: Sync | None) -> Any:
        from mergekit_pcb.threads import torch_threads

        if sync is not None:
            import ray

            ctx, job = item
            if self.replica is None:
                self.replica = Replica()
            self.replica.apply(sync, ctx, fetch=ray.get)
            item = (ctx, self.replica.localize(job))
        with torch_threads(self.threads):
            return fn(item)

    def stats(self) -> dict[str, Any]:
        """What this worker did: for tests and the benchmark."""
        import ray

        from mergekit_pcb.evolve.jobs import opened_paths

        r = self.replica
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "replica": str(r.directory) if r else None,
                "rebuilt": r.rebuilt if r else 0, "adopted": r.adopted if r else 0,
                "received_bytes": r.received_bytes if r else 0,
                "opened": sorted(opened_paths())}

    def shutdown(self) -> None:
        if self.replica is not None:
            self.replica.close()
            self.replica = None


_STARTED: list[bool] = [False]  # whether this process started the Ray it is connected to


def connect(settings: RaySettings) -> Any:
    """Ray, connected: to the cluster named, or a local Ray started here."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=settings.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as e:
            raise UserError(f"--ray-address {settings.address}: cannot join a Ray cluster "
                            f"({e})") from None
        _STARTED[0] = True
    return ray


def ray_worker_count(settings: RaySettings) -> int:
    """How many workers the cluster holds at the resources each asks for."""
    res = connect(settings).cluster_resources()
    counts = []
    if settings.cpus_per_worker > 0:
        counts.append(int(res.get("CPU", 0) // settings.cpus_per_worker))
    if settings.gpus_per_worker > 0:
        counts.append(int(res.get("GPU", 0) // settings.gpus_per_worker))
    return min(counts) if counts else 0


class RayExecutor:
    def __init__(self, workers: int | None, threads: int | None = 1,
                 settings: RaySettings | None = None) -> None:
        self.settings = settings = settings or RaySettings()
        self._ray = ray = connect(settings)
        self.threads = threads
        self.workers = workers if workers is not None else ray_worker_count(settings)
        if self.workers < 1:
            raise UserError("--executor ray: the cluster has no room for one worker "
                            f"({settings.cpus_per_worker} CPU, {settings.gpus_per_worker} GPU "
                            f"each; it has {ray.cluster_resources()})")
        self.shares_files = settings.shared_run_dir
        self.spare_core = False  # jobs go to any actor, each on its own machine
        self.population: PopulationLog | None = None  # set by a population search
        self.member_dir: Path | None = None  # where the driver's member files are
        self._actor = ray.remote(num_cpus=settings.cpus_per_worker,
                                 num_gpus=settings.gpus_per_worker,
                                 max_restarts=0)(RayWorker)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        self._at: list[tuple[int, int] | None] = [None] * self.workers  # (epoch, version)
        self.replaced = 0  # actors replaced after they or their node died

    def _new_actor(self) -> Any:
        return self._actor.remote(self.threads)

    def _sync(self, a: int, blobs: dict[str, Any]) -> Sync | None:
        log = self.population
        if log is None or self.shares_files:
            return None
        epoch, version = self._at[a] or (0, 0)

        def blob(name: str) -> Any:
            if name not in blobs:  # put once per call, shared by every actor on a node
                assert self.member_dir is not None
                blobs[name] = self._ray.put((self.member_dir / name).read_bytes())
            return blobs[name]

        return make_sync(log, epoch, version, blob)

    def track(self, population: PopulationLog, member_dir: Path) -> None:
        """Keep every worker's copy of the population in step with `population`, whose
        members lie in `member_dir` on the driver."""
        self.population, self.member_dir = population, member_dir

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        ray = self._ray
        from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError

        # RayActorError covers a dead or unreachable actor (ActorDiedError, ...Unavailable)
        lost = (RayActorError, NodeDiedError, WorkerCrashedError)
        results: list[Any] = [None] * len(items)
        queue = collections.deque(range(len(items)))
        free = collections.deque(range(len(self.actors)))
        running: dict[Any, tuple[int, int, Sync | None]] = {}
        blobs: dict[str, Any] = {}
        try:
            while queue or running:
                while queue and free:
                    a, i = free.popleft(), queue.popleft()
                    sync = self._sync(a, blobs)
                    running[self.actors[a].call.remote(fn, items[i], sync)] = (a, i, sync)
                done, _ = ray.wait(list(running), num_returns=1)
                a, i, sync = running.pop(done[0])
                try:
                    results[i] = ray.get(done[0])
                except RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, BaseException):
                        raise cause from None
                    raise
                except lost:
                    # the actor or its node is gone: a fresh actor (placed wherever there is
                    # room) joins with the live members and the job runs again
                    self.actors[a] = self._new_actor()
                    self._at[a] = None
                    self.replaced += 1
                    queue.appendleft(i)
                    free.append(a)
                    continue
                if sync is not None:
                    self._at[a] = (sync.epoch, sync.start + len(sync.events))
                free.append(a)
        finally:
            blobs.clear()  # the object store frees the members' bytes
        return results

    def stats(self) -> list[dict[str, Any]]:
        return self._ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        # a dead actor has nothing left to clean
        with contextlib.suppress(Exception):
            self._ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        self.terminate()

    def terminate(self) -> None:
        ray = self._ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if _STARTED[0]:
            _STARTED[0] = False
            ray.shutdown()


__all__ = ["INSTALL_HINT", "RayExecutor", "RaySettings", "RayWorker", "connect", "import_ray",
           "ray_worker_count"]
