"""Checkpoint I/O: resolving model references, lazy tensor reading, sharded writing.

The names below load on first use, so that `mergekit_pcb.io.resolve` imports without torch:
the command line refuses a model that is not there before torch loads (seconds sooner).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergekit_pcb.io.checkpoints import open_checkpoint
    from mergekit_pcb.io.reader import Checkpoint, TensorInfo
    from mergekit_pcb.io.resolve import resolve_model_path
    from mergekit_pcb.io.writer import ShardedSafetensorsWriter, atomic_output_dir, plan_shards

# each exported name -> the submodule that defines it
_HOME = {
    "Checkpoint": "reader",
    "TensorInfo": "reader",
    "open_checkpoint": "checkpoints",
    "resolve_model_path": "resolve",
    "ShardedSafetensorsWriter": "writer",
    "atomic_output_dir": "writer",
    "plan_shards": "writer",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "Checkpoint",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "atomic_output_dir",
    "open_checkpoint",
    "plan_shards",
    "resolve_model_path",
]
