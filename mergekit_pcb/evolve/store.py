"""The population store: members as single-file safetensors in a run directory, and the
run state written atomically beside them.

Members are memory-mapped (zero-copy tensor views, so a population larger than RAM works
and nothing is read twice); new members are written tensor by tensor to a temporary name
and renamed into place, so a member file is either complete or absent. `state.json` is the
only source of truth: it names the member files, and a file it does not name is garbage
from an interrupted step.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.io.reader import Checkpoint, open_checkpoint
from mergekit_pcb.io.safetensors_format import (
    encode_header,
    read_header,
    tensor_bytes,
)
from mergekit_pcb.io.writer import OutputTensor as TensorSpec  # name, dtype, shape
from mergekit_pcb.io.writer import disk_errors

STATE_FILE = "state.json"
MEMBERS_DIR = "members"
SPARE_PREFIX = ".spare-"  # dead member files kept to be overwritten in place


def layout_of(checkpoints: list[Checkpoint], base: Checkpoint | None = None) -> list[TensorSpec]:
    """The members' common tensor table; every input must match the first one exactly."""
    ref = checkpoints[0]
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in ref.tensors.values()]
    for other in checkpoints[1:]:
        for name in other.names():
            if name not in ref:
                raise CheckpointError(f"tensor '{name}' is in model {other.ref} but not in "
                                      f"{ref.ref}; evolution needs models of one architecture")
        for s in specs:
            info = other.info(s.name)
            if info.shape != s.shape or info.dtype != s.dtype:
                raise CheckpointError(
                    f"tensor '{s.name}': {ref.ref} has {list(s.shape)} {s.dtype}, "
                    f"{other.ref} has {list(info.shape)} {info.dtype}")
    if base is not None:
        for s in specs:
            if s.dtype.is_floating_point:
                info = base.info(s.name)
                if info.shape != s.shape:
                    raise CheckpointError(f"tensor '{s.name}': {ref.ref} has {list(s.shape)}, "
                                          f"base {base.ref} has {list(info.shape)}")
    return specs


def write_safetensors(path: Path, layout: list[TensorSpec],
                      tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None, *, durable: bool = False,
                      reuse: Path | None = None) -> int:
    """Stream `tensors` (in layout order) into one file, via a temporary name and a rename.

    A member file is complete or absent after any kill. `durable` adds an fsync (for the
    final output); members skip it: a killed process loses nothing already written, and
    after an OS crash a short member file fails its header check on resume.

    `reuse` names a dead member file (a spare) to write over in place: its blocks and cached
    pages are already there, and overwriting them costs a small part of filling a new file
    (measured 11 ms against 270 ms for 120 MB). It is renamed to the temporary name first,
    so a kill mid-write leaves garbage, never a half-new member.

    Returns the CRC-32 of the file's bytes: the run state records it, so that a resume can
    tell a member that never fully reached the disk (an operating-system crash after an
    in-place write leaves the spare's old blocks, at the right length) from a sound one.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    entries = [(s.name, s.dtype, s.shape) for s in layout]
    mode = "wb"
    if reuse is not None:
        try:
            os.replace(reuse, tmp)
            mode = "r+b"
        except FileNotFoundError:
            pass
    try:
        with disk_errors(path.parent, "the run state"), open(tmp, mode) as f:
            header = encode_header(entries, {"format": "pt", **(metadata or {})})
            f.write(header)
            crc = zlib.crc32(header)
            expected = iter(layout)
            for name, t in tensors:
                spec = next(expected)
                if name != spec.name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                    raise RuntimeError(f"writer expected {spec.name} {spec.shape} {spec.dtype}, "
                                       f"got {name} {tuple(t.shape)} {t.dtype}")
                data = tensor_bytes(t)
                f.write(data)
                crc = zlib.crc32(data, crc)
            if next(expected, None) is not None:
                raise RuntimeError("writer closed before every tensor was written")
            f.truncate()
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return crc


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 16 MB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


class MappedCheckpoint(Checkpoint):
    """A single-file safetensors checkpoint, memory-mapped: `read` returns zero-copy views.

    The mapping is private copy-on-write, so the views are writable tensors (no warning) but
    nothing ever reaches the file; callers treat them as read-only.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), path.parent, read_header(path)[0])
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def read(self, name: str, start: int | None = None, stop: int | None = None
             ) -> torch.Tensor:
        info = self.info(name)
        if info.numel == 0 or self._map is None:
            tensor = torch.empty(info.shape, dtype=info.dtype)
        else:
            tensor = torch.frombuffer(self._map, dtype=info.dtype, count=info.numel,
                                      offset=info.start).view(info.shape)
        return tensor if start is None and stop is None else tensor.reshape(-1)[start:stop]

    def close(self) -> None:
        self._map = None  # unmapped when the last view is gone


Readable = Checkpoint  # a MappedCheckpoint is one too


def open_readable(ref: str) -> Readable:
    """Single safetensors files (members) are mapped; anything else is read lazily."""
    p = Path(ref)
    if p.suffix == ".safetensors" and p.is_file():
        return MappedCheckpoint(p)
    return open_checkpoint(ref)


def atomic_write_json(path: Path, data: Any, *, durable: bool = False) -> None:
    """Write temp + os.replace: after a kill, the old file or the new one, never a mix.

    `durable` also fsyncs the file and its directory. Member files are not fsynced (that
    would double the cost of a step): after an OS crash, as opposed to a killed process, a
    member may come back short, and resuming then fails on its header check.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointCache:
    """Opened checkpoints by path (file handles only; tensors are read on demand)."""

    def __init__(self) -> None:
        self._open: dict[str, Readable] = {}

    def get(self, path: str) -> Readable:
        ckpt = self._open.get(path)
        if ckpt is None:
            ckpt = open_readable(path)
            self._open[path] = ckpt
        return ckpt

    def keep_only(self, paths: Iterable[str]) -> None:
        keep = set(paths)
        for p in [p for p in self._open if p not in keep]:
            self._open.pop(p).close()

    def close(self) -> None:
        self.keep_only(())


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.members = root / MEMBERS_DIR
        self.state_path = root / STATE_FILE

    def create(self) -> None:
        self.members.mkdir(parents=True, exist_ok=True)

    def member_path(self, name: str) -> Path:
        return self.members / name

    def load_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"corrupt run state {self.state_path} ({e})") from None

    def save_state(self, state: dict[str, Any], *, durable: bool = False) -> None:
        atomic_write_json(self.state_path, state, durable=durable)

    def collect_garbage(self, referenced: Iterable[str], spares: int = 0) -> list[str]:
        """Tidy the members folder; returns the spare files kept, by name.

        Member files the state does not name (replaced members, trials left by interrupted
        or discarded steps) become spares, up to `spares` of them, for later writes to
        overwrite in place (see write_safetensors); the rest, and temporary files, go.
        """
        keep = set(referenced)
        if not self.members.is_dir():
            return []
        kept: list[str] = []
        unused = sorted(f for f in self.members.iterdir() if f.name not in keep)
        # existing spares first, so that a steady run renames nothing
        unused.sort(key=lambda f: not f.name.startswith(SPARE_PREFIX))
        for f in unused:
            is_file = f.name.startswith(SPARE_PREFIX) or (
                f.suffix == ".safetensors" and not f.name.startswith("."))
            if is_file and len(kept) < spares:
                name = f.name if f.name.startswith(SPARE_PREFIX) else SPARE_PREFIX + f.name
                if name != f.name:
                    f.rename(self.members / name)
                kept.append(name)
            else:
                f.unlink(missing_ok=True)
        return kept

    def iter_member_files(self) -> Iterator[Path]:
        yield from sorted(self.members.glob("*.safetensors"))


__all__ = ["CheckpointCache", "MappedCheckpoint", "RunDir", "TensorSpec", "atomic_write_json",
           "file_crc32", "layout_of", "open_readable", "write_safetensors"]
