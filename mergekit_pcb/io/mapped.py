"""Safetensors checkpoints, memory-mapped: the members of a search (single files), and the
base its merges read again and again (`MappedFiles`, any checkpoint's files).

Zero-copy tensor views: a population larger than RAM works, and a member the page cache
holds is read from memory, not from the disk.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import BinaryIO

import torch

from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.io.safetensors_format import TensorInfo, open_regular, read_header


def _identity(path: Path, st: os.stat_result) -> tuple[str, int, int, int, int]:
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def file_identity(path: Path) -> tuple[str, int, int, int, int]:
    """The `identity` a `MappedCheckpoint` of `path` would have now (a rewritten file gets a
    new one)."""
    return _identity(path, os.stat(path))


class MappedCheckpoint(Checkpoint):
    """A single-file safetensors checkpoint, memory-mapped: `read` returns zero-copy views.

    The mapping is private copy-on-write, so the views are writable tensors (no warning) but
    nothing ever reaches the file; callers treat them as read-only.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), path.parent, read_header(path)[0])
        with open(path, "rb") as f:
            self.identity = _identity(path, os.fstat(f.fileno()))
            self._map = _map(f)

    def read(self, name: str, start: int | None = None, stop: int | None = None
             ) -> torch.Tensor:
        return _view(self._map, self.info(name), start, stop)

    def close(self) -> None:
        self._map = None  # unmapped when the last view is gone


class MappedFiles(Checkpoint):
    """Another checkpoint's safetensors files, memory-mapped as they are first read:
    zero-copy views of a model that is read again and again (a search's base, merged with
    every candidate), where positioned reads would copy it each time."""

    def __init__(self, source: Checkpoint) -> None:
        super().__init__(source.ref, source.root, dict(source.tensors))
        self.identity = source.identity
        self.own_directory = source.own_directory
        self._maps: dict[Path, mmap.mmap | None] = {}

    def read(self, name: str, start: int | None = None, stop: int | None = None
             ) -> torch.Tensor:
        info = self.info(name)
        if info.file not in self._maps:
            with open_regular(info.file) as f:  # the reader's checks: a regular file
                self._maps[info.file] = _map(f)
        return _view(self._maps[info.file], info, start, stop)

    def close(self) -> None:
        self._maps.clear()  # unmapped when the last views are gone


def _map(f: BinaryIO) -> mmap.mmap | None:
    """A private copy-on-write map of the open file (None when it is empty: mmap refuses)."""
    if os.fstat(f.fileno()).st_size == 0:
        return None
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _view(mapping: mmap.mmap | None, info: TensorInfo, start: int | None,
          stop: int | None) -> torch.Tensor:
    if info.numel == 0 or mapping is None:
        tensor = torch.empty(info.shape, dtype=info.dtype)
    else:
        tensor = torch.frombuffer(mapping, dtype=info.dtype, count=info.numel,
                                  offset=info.start).view(info.shape)
    return tensor if start is None and stop is None else tensor.reshape(-1)[start:stop]


def mapped_files(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` read through memory maps (`MappedFiles`); a pickled checkpoint as it is."""
    if isinstance(ckpt, MappedCheckpoint | MappedFiles) or ckpt.pickled \
            or type(ckpt).read is not Checkpoint.read:  # computed tensors (an adapter's)
        return ckpt
    return MappedFiles(ckpt)


def open_readable(ref: str) -> Checkpoint:
    """Single safetensors files (members) are mapped; anything else is read lazily."""
    p = Path(ref)
    if p.suffix == ".safetensors" and p.is_file():
        return MappedCheckpoint(p)
    return open_checkpoint(ref)


__all__ = ["MappedCheckpoint", "MappedFiles", "mapped_files", "open_readable"]
