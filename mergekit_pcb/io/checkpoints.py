"""Opening any model reference: a checkpoint (`io.reader`), or `BASE+ADAPTER`, a PEFT
adapter read over its base (`io.lora`, which builds on the reader)."""

from __future__ import annotations

from pathlib import Path

from mergekit_pcb.io.lora import open_adapter
from mergekit_pcb.io.reader import Checkpoint, open_plain_checkpoint
from mergekit_pcb.io.resolve import split_adapter_ref


def open_checkpoint(ref: str, *, allow_pickle: bool = False,
                    base_dir: Path | None = None, resolved: Path | None = None) -> Checkpoint:
    """Open a model reference: a directory, a `.safetensors` file, a hub id, or
    `BASE+ADAPTER` (`resolved`: the path `resolve_model_path` already gave for a plain
    reference, not asked again)."""
    parts = split_adapter_ref(ref, base_dir=base_dir)
    if parts is not None:
        return open_adapter(ref, *parts, allow_pickle=allow_pickle, base_dir=base_dir)
    return open_plain_checkpoint(ref, allow_pickle=allow_pickle, base_dir=base_dir,
                                 resolved=resolved)


__all__ = ["open_checkpoint"]
