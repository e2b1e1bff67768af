"""Checkpoint I/O: resolving model references, lazy tensor reading, sharded writing."""

from mergekit_pcb.io.reader import Checkpoint, TensorInfo, open_checkpoint
from mergekit_pcb.io.resolve import resolve_model_path
from mergekit_pcb.io.writer import ShardedSafetensorsWriter, atomic_output_dir, plan_shards

__all__ = [
    "Checkpoint",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "atomic_output_dir",
    "open_checkpoint",
    "plan_shards",
    "resolve_model_path",
]
