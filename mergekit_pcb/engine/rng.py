"""Seeding that does not depend on the order tensors are processed in."""

from __future__ import annotations

import hashlib

import torch


def tensor_generator(seed: int, tensor_name: str, model_key: str) -> torch.Generator:
    """A CPU generator keyed by (seed, tensor name, model position): the same draw in any
    tensor order and wherever the checkpoints live."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_key}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g
