"""Sharded safetensors output, written tensor by tensor, and the atomic output directory.

Every output tensor's name, dtype and shape are known before the merge starts, so each
shard's header is written first and tensors are appended as they are computed: the writer
holds no tensor in memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from mergekit_pcb.errors import OutputError
from mergekit_pcb.io.safetensors_format import encode_header, tensor_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    file_name: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> list[Shard]:
    """Greedy, in order: a shard closes when the next tensor would push it past `shard_size`."""
    groups: list[list[OutputTensor]] = [[]]
    used = 0
    for t in tensors:
        if groups[-1] and used + t.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def parse_size(text: str | int) -> int:
    """'5GB', '500M', '2GiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "B": 1}
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = s[: len(s) - len(unit)], units.get(unit, 1)
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise OutputError(f"--shard-size: cannot read size {text!r} (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise OutputError(f"--shard-size must be positive, got {text!r}")
    return value


class ShardedSafetensorsWriter:
    """Writes tensors, in plan order, into pre-planned shards under `directory`."""

    def __init__(self, directory: Path, shards: list[Shard],
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue: Iterator[tuple[Shard, OutputTensor]] = (
            (s, t) for s in shards for t in s.tensors
        )
        self._current: Shard | None = None
        self._handle: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected = next(self._queue)
        if name != expected.name or tuple(tensor.shape) != expected.shape \
                or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"writer expected {expected.name} {expected.shape} {expected.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._append(shard, tensor)

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write one tensor from consecutive flat slices (large tensors stream in parts)."""
        shard, expected = next(self._queue)
        written = 0
        for chunk in chunks:
            if name != expected.name or chunk.dtype != expected.dtype:
                raise RuntimeError(f"writer expected {expected.name} {expected.dtype}, "
                                   f"got {name} {chunk.dtype}")
            self._append(shard, chunk)
            written += chunk.numel()
        if written * expected.dtype.itemsize != expected.nbytes:
            raise RuntimeError(f"writer got {written} elements for {name}, "
                               f"expected shape {expected.shape}")
        if written == 0 and shard is not self._current:
            self._open(shard)

    def _append(self, shard: Shard, tensor: torch.Tensor) -> None:
        if shard is not self._current:
            self._open(shard)
        assert self._handle is not None
        with disk_errors(self.directory.parent):
            self._handle.write(tensor_bytes(tensor))

    def _open(self, shard: Shard) -> None:
        self._close_handle()
        self._current = shard
        with disk_errors(self.directory.parent):
            self._handle = open(self.directory / shard.file_name, "wb")  # noqa: SIM115
            entries = [(t.name, t.dtype, t.shape) for t in shard.tensors]
            self._handle.write(encode_header(entries, self.metadata))

    def _close_handle(self) -> None:
        if self._handle is not None:
            with disk_errors(self.directory.parent):
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
            self._handle = None

    def close(self) -> None:
        """Finish the last shard and write the index (sharded output only)."""
        if next(self._queue, None) is not None:
            raise RuntimeError("writer closed before every planned tensor was written")
        for shard in self.shards:  # empty shards (no tensors written) still need a header
            if not (self.directory / shard.file_name).exists():
                self._open(shard)
        self._close_handle()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.name: s.file_name for s in self.shards for t in s.tensors},
            }
            with disk_errors(self.directory.parent):
                (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@contextlib.contextmanager
def disk_errors(where: Path, what: str = "the output") -> Iterator[None]:
    """OS errors a user can fix (full disk, permissions) as one-line OutputErrors."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {what} in {where}") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"cannot write {what} in {where}: {e.strerror}") from e
        raise


@contextlib.contextmanager
def atomic_output_dir(destination: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `destination`; rename it into place on success.

    On any error the temporary directory is removed and `destination` is left as it was.
    """
    destination = destination.resolve()
    check_destination(destination, force=force)
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {parent}: {e.strerror}") from e
    tmp = parent / f".{destination.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write in {parent}: {e.strerror}") from e
    try:
        yield tmp
        if destination.exists():  # only reachable with force
            trash = parent / f".{destination.name}.old-{os.getpid()}"
            os.replace(destination, trash)
            os.replace(tmp, destination)
            _remove(trash)
        else:
            os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_destination(destination: Path, *, force: bool) -> None:
    if destination.exists() and not force:
        raise OutputError(f"output {destination} already exists; pass --force to replace it")
    if destination.exists() and not destination.is_dir():
        raise OutputError(f"output {destination} exists and is not a directory")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
