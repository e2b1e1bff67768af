"""A trained module as one safetensors file: its tensors and, in the metadata, the format
version, the mode, the module's config (JSON) and the frozen model's SHA-256."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.errors import UserError
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.safetensors_format import read_header
from mergekit_pcb.io.writer import OutputTensor, write_safetensors
from mergekit_pcb.reprogram import FORMAT_VERSION, METHOD, MODULE_FILE
from mergekit_pcb.reprogram.modules import ReprogramModule, build_module


def load_strict(module: torch.nn.Module, path: Path) -> str | None:
    """Load a safetensors file into `module` (every tensor, nothing more): None when it
    fits, else the first lines of why not."""
    with open_checkpoint(str(path)) as ckpt:
        state = {n: ckpt.read(n) for n in ckpt.names()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        return " ".join(str(e).strip().splitlines()[:2])[:300]
    return None


def module_metadata(module: ReprogramModule, frozen_sha256: str,
                    extra: dict[str, Any] | None = None) -> dict[str, str]:
    return {"method": METHOD, "osr_format_version": FORMAT_VERSION, "mode": module.mode,
            "config": json.dumps(module.config(), sort_keys=True),
            "frozen_sha256": frozen_sha256,
            **{k: json.dumps(v, sort_keys=True) for k, v in (extra or {}).items()}}


def save_module(path: Path, module: ReprogramModule, frozen_sha256: str,
                extra: dict[str, Any] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    layout = [OutputTensor(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    write_safetensors(path, layout, state.items(), module_metadata(module, frozen_sha256, extra),
                      durable=True)


def module_file(path: Path) -> Path:
    """`path` itself, or the module file inside a run's output directory."""
    p = path / MODULE_FILE if path.is_dir() else path
    if not p.is_file():
        raise UserError(f"--module: {path} is not a module file (nor a folder holding "
                        f"{MODULE_FILE})")
    return p


def read_module_metadata(path: Path) -> dict[str, str]:
    _, meta = read_header(path)
    if meta.get("method") != METHOD or "osr_format_version" not in meta:
        raise UserError(f"--module: {path} is not an {METHOD} module (no such metadata)")
    if meta["osr_format_version"] != FORMAT_VERSION:
        raise UserError(f"--module: {path} has module format version "
                        f"{meta['osr_format_version']!r}; this pcbmerge reads {FORMAT_VERSION}")
    for key in ("mode", "config", "frozen_sha256"):
        if key not in meta:
            raise UserError(f"--module: {path} lacks the metadata key '{key}'")
    return meta


def load_module(path: Path) -> tuple[ReprogramModule, dict[str, str]]:
    """The module stored in `path` and its metadata; strict: every tensor must fit."""
    path = module_file(path)
    meta = read_module_metadata(path)
    try:
        config = json.loads(meta["config"])
    except ValueError:
        raise UserError(f"--module: {path}: its config metadata is not JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"--module: {path}: its config metadata is not a JSON object")
    module = build_module(config)
    problem = load_strict(module, path)
    if problem is not None:
        raise UserError(f"--module: {path}: tensors do not fit its config ({problem})")
    module.eval()
    return module, meta


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


__all__ = ["load_module", "module_file", "module_metadata", "read_module_metadata",
           "save_module", "state_equal"]
