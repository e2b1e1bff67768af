"""Checkpoints held in memory: a state dict behind the `Checkpoint` interface.

The merge engine reads every input through `Checkpoint.read`; an evolution's trial, built in
memory, joins a merge this way without a trip through the disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.io.safetensors_format import TensorInfo

IN_MEMORY = Path("<memory>")


class MemoryCheckpoint(Checkpoint):
    """`tensors` by name; `read` returns views (callers treat them as read-only)."""

    def __init__(self, ref: str, tensors: Mapping[str, torch.Tensor],
                 root: Path = IN_MEMORY) -> None:
        infos = {name: TensorInfo(name, t.dtype, tuple(t.shape), IN_MEMORY, 0,
                                  t.numel() * t.element_size())
                 for name, t in tensors.items()}
        super().__init__(ref, root, infos)
        self._state = dict(tensors)

    def read(self, name: str, start: int | None = None, stop: int | None = None
             ) -> torch.Tensor:
        self.info(name)  # a missing name is a CheckpointError, as for files
        tensor = self._state[name]
        return tensor if start is None and stop is None else tensor.reshape(-1)[start:stop]

    def close(self) -> None:
        self._state = {}


__all__ = ["MemoryCheckpoint"]
