"""A worker's own copy of the population, for executors whose workers share no filesystem
with the driver (Ray across nodes).

The driver keeps a `PopulationLog`: the member files it holds now (an *epoch* starts when
they are written or a run is resumed) and, since then, every accepted trial as the seeds
that built it. A worker that joins an epoch receives the live members' bytes once, through the
executor's object store; after that only `MemberEvent`s travel, and the worker rebuilds
each accepted trial from its own copy with the same code and seeds that built it first
(`jobs.build_trial`), then checks its CRC-32 against the driver's. Jobs name member files
by the driver's paths; `Replica.localize` rewrites them to the worker's copy.

Why rebuilding reads the right members: a batch's accepted trials never read a slot that an
earlier trial of the same batch replaced (the engine discards such results), so applying
the events in commit order gives each rebuild the members its first build read.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.evolve.jobs import ScoreJob, TrialJob, WorkContext, build_trial, runtime
from mergekit_pcb.evolve.strategies import Step
from mergekit_pcb.io.writer import file_crc32, write_safetensors

PENDING_PREFIX = ".pending-"  # a trial this worker wrote, adopted if the driver accepts it


@dataclass(frozen=True)
class MemberEvent:
    """An accepted trial: enough to rebuild it bit for bit from the members it read."""

    name: str  # its member file name
    checksum: int  # CRC-32 of the file the driver holds
    generation: int
    step: int
    plan: Step
    members: tuple[str, ...]  # every slot's member file name when it was built


@dataclass
class PopulationLog:
    """The driver's side: what a worker needs to hold the members the driver holds."""

    epoch: int = 0
    events: list[MemberEvent] = field(default_factory=list)
    # the member files the driver keeps now and their CRC-32s (the run state's `checksums`)
    checksums: dict[str, int] = field(default_factory=dict)

    def reset(self, checksums: Mapping[str, int]) -> None:
        """A new epoch: the driver holds exactly these members."""
        self.epoch += 1
        self.events = []
        self.checksums = dict(checksums)

    def accept(self, job: TrialJob, checksums: Mapping[str, int]) -> None:
        """`job`'s trial was kept; `checksums`: the members the driver keeps after it."""
        name = Path(job.out_path).name
        self.events.append(MemberEvent(name, checksums[name], job.generation, job.step,
                                       job.plan, tuple(Path(p).name for p in job.members)))
        self.checksums = dict(checksums)

    @property
    def live(self) -> tuple[str, ...]:
        return tuple(self.checksums)

    @property
    def version(self) -> int:
        return len(self.events)


@dataclass(frozen=True)
class Sync:
    """What one call tells a worker: its epoch's events from `start`, and the live set."""

    epoch: int
    start: int
    events: tuple[MemberEvent, ...]
    live: tuple[str, ...]
    blobs: dict[str, Any] | None = None  # name -> bytes (or a handle to them): a new epoch
    checksums: dict[str, int] | None = None  # the blobs' CRC-32s


class Replica:
    """The worker's side: member files in a directory of its own."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="pcbmerge-replica-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.epoch = 0
        self.version = 0
        self.names: set[str] = set()
        self.rebuilt = 0  # trials rebuilt from their seeds
        self.adopted = 0  # trials this worker wrote and the driver accepted
        self.received_bytes = 0

    def path(self, name: str) -> Path:
        return self.directory / name

    def apply(self, sync: Sync, ctx: WorkContext, fetch: Any = None) -> None:
        """Bring the copy to the driver's state. `fetch` turns a blob handle into bytes."""
        if sync.epoch != self.epoch:
            if sync.blobs is None:
                raise RuntimeError("a new epoch without the members' bytes")
            self._start_epoch(sync.epoch, sync.start, sync.blobs, sync.checksums or {}, fetch)
        elif sync.start != self.version:
            raise RuntimeError(f"replica at version {self.version}, sync from {sync.start}")
        for event in sync.events:
            self._apply(event, ctx)
        self._drop(set(sync.live))

    def _start_epoch(self, epoch: int, version: int, blobs: dict[str, Any],
                     checksums: dict[str, int], fetch: Any) -> None:
        for name in list(self.names):
            self.path(name).unlink(missing_ok=True)
        self.names.clear()
        for name, blob in blobs.items():
            data = fetch(blob) if fetch is not None else blob
            path = self.path(name)
            tmp = path.with_name(f".{name}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            self.received_bytes += len(data)
            crc = file_crc32(path)
            if name in checksums and crc != checksums[name]:
                raise CheckpointError(f"member {name} arrived damaged (CRC-32 {crc:#010x}, "
                                      f"the driver's is {checksums[name]:#010x})")
            self.names.add(name)
        self.epoch, self.version = epoch, version

    def _apply(self, event: MemberEvent, ctx: WorkContext) -> None:
        target = self.path(event.name)
        pending = self.path(PENDING_PREFIX + event.name)
        if pending.is_file() and file_crc32(pending) == event.checksum:
            os.replace(pending, target)
            self.adopted += 1
        else:
            missing = [n for i, n in enumerate(event.members)
                       if i in (event.plan.slot, *event.plan.donors) and n not in self.names]
            if missing:
                raise RuntimeError(f"replica lacks {missing[0]} to rebuild {event.name}")
            job = TrialJob(event.generation, event.step, event.plan,
                           tuple(str(self.path(n)) for n in event.members), False, 0.0,
                           str(target))
            rt = runtime(ctx)
            crc = write_safetensors(target, list(ctx.layout), build_trial(rt, job).items())
            if crc != event.checksum:
                raise CheckpointError(
                    f"member {event.name} rebuilt on this worker differs from the driver's "
                    f"(CRC-32 {crc:#010x} against {event.checksum:#010x}): the trial's build "
                    "is not deterministic here")
            self.rebuilt += 1
        self.names.add(event.name)
        self.version += 1

    def _drop(self, live: set[str]) -> None:
        for name in [n for n in self.names if n not in live]:
            self.path(name).unlink(missing_ok=True)
            self.names.discard(name)
        for stray in self.directory.glob(PENDING_PREFIX + "*"):
            if stray.name.removeprefix(PENDING_PREFIX) not in live:
                stray.unlink(missing_ok=True)

    def localize(self, job: Any) -> Any:
        """The job with the driver's member paths replaced by this copy's."""
        if isinstance(job, TrialJob):
            return dataclasses.replace(
                job, members=tuple(self._local(p) for p in job.members),
                out_path=str(self.path(PENDING_PREFIX + Path(job.out_path).name)), spare=None)
        if isinstance(job, ScoreJob):
            return dataclasses.replace(job, members=tuple(self._local(p) for p in job.members))
        return job

    def _local(self, driver_path: str) -> str:
        name = Path(driver_path).name
        if name not in self.names:
            raise RuntimeError(f"job names {name}, which this worker's copy does not hold")
        return str(self.path(name))

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def make_sync(log: PopulationLog, epoch: int, version: int,
              blob: Any = None) -> Sync:
    """What a worker at (epoch, version) needs. A worker new to the epoch gets the live
    members' bytes (`blob(name)`: the bytes or a handle to them) and no events to replay."""
    if epoch != log.epoch:
        assert blob is not None
        return Sync(log.epoch, log.version, (), log.live, {n: blob(n) for n in log.live},
                    dict(log.checksums))
    return Sync(epoch, version, tuple(log.events[version:]), log.live)


__all__ = ["MemberEvent", "PopulationLog", "Replica", "Sync", "make_sync"]
