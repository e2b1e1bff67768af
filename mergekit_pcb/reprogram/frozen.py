"""The frozen model f: user code (`arch`, with consent) plus safetensors weights, or a
local Hugging Face image-to-image model directory (e.g. Swin2SR). f is in eval mode with
`requires_grad_(False)`; the SHA-256 of its weights identifies it in a module's metadata.
Weights are read from safetensors only (never unpickled).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_pcb.errors import CheckpointError, RecipeError, UserError
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.safetensors_format import tensor_bytes
from mergekit_pcb.reprogram.config import ModelSpec, resolve_path
from mergekit_pcb.reprogram.store import load_strict
from mergekit_pcb.usercode import check_plain_data, import_object, require_consent

PROBE = 24  # side of the blank image that finds f's output scale


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the state dict: sorted names, each with its dtype, shape and bytes."""
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name]
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]
                            ).encode())
        h.update(b"\0")
        h.update(tensor_bytes(t))
    return h.hexdigest()


@dataclass
class FrozenModel:
    module: nn.Module
    sha256: str
    description: str
    scale: int = 1
    hf: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hf:
            return self.module(x)
        # as the Hugging Face image processors do: pad (bottom, right) to a multiple of the
        # window, restore, crop the padding's share of the output away
        h, w = x.shape[-2:]
        multiple = int(getattr(self.module.config, "window_size", 1) or 1)
        ph, pw = -h % multiple, -w % multiple
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.module(pixel_values=x)
        y = out.reconstruction if hasattr(out, "reconstruction") else out[0]
        s = y.shape[-1] // x.shape[-1]
        return y[..., : h * s, : w * s]

    def to(self, device: str) -> FrozenModel:
        self.module.to(device)
        return self


def code_refs(spec: ModelSpec) -> list[tuple[str, str]]:
    return [("model.arch", spec.arch)] if spec.arch is not None else []


def check_model(spec: ModelSpec, root: Path) -> dict[str, Any]:
    """Every check that needs no code and no weights loaded: files exist and are readable
    safetensors. Returns the plan's description of the model."""
    if spec.hf is not None:
        path = resolve_path(spec.hf, root, "model.hf", directory=True)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"model.hf: {path} has no config.json (not a Hugging Face "
                                  "model directory)")
        with open_checkpoint(str(path)) as ckpt:
            n = len(ckpt.tensors)
        return {"hf": str(path), "tensors": n}
    assert spec.arch is not None and spec.weights is not None
    check_plain_data(spec.arch_kwargs, "model.arch_kwargs")
    path = resolve_path(spec.weights, root, "model.weights", directory=None)
    with open_checkpoint(str(path)) as ckpt:
        n = len(ckpt.tensors)
    return {"arch": spec.arch, "arch_kwargs": spec.arch_kwargs, "weights": str(path),
            "tensors": n}


def model_inputs(spec: ModelSpec, root: Path) -> list[Path]:
    """The files the model is read from (an output must never be written over them)."""
    ref, directory = (spec.hf, True) if spec.hf is not None else (spec.weights, None)
    assert ref is not None
    return [resolve_path(ref, root, "model", directory=directory)]


def load_frozen(spec: ModelSpec, root: Path, *, trust_code: bool, channels: int,
                device: str = "cpu") -> FrozenModel:
    """f, frozen, on `device`; its output scale found on a blank image."""
    info = check_model(spec, root)
    if spec.hf is not None:
        module = _load_hf(Path(info["hf"]))
        frozen = FrozenModel(module, "", info["hf"], hf=True)
    else:
        assert spec.arch is not None
        require_consent(code_refs(spec), trust_code)
        factory = import_object(spec.arch, root, "model.arch")
        module = factory(**spec.arch_kwargs)
        if not isinstance(module, nn.Module):
            raise RecipeError(f"model.arch: {spec.arch} returned {type(module).__name__}, not "
                              "a torch.nn.Module")
        _load_weights(module, Path(info["weights"]))
        frozen = FrozenModel(module, "", f"{spec.arch} with {info['weights']}")
    module.eval()
    module.requires_grad_(False)
    frozen.sha256 = weights_sha256(module)
    frozen.to(device)
    frozen.scale = _probe_scale(frozen, channels, device)
    return frozen


def _load_weights(module: nn.Module, path: Path) -> None:
    problem = load_strict(module, path)
    if problem is not None:
        raise CheckpointError(f"model.weights: {path} does not fit the model ({problem})")


def _load_hf(path: Path) -> nn.Module:
    import transformers
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _from_pretrained(transformers, path)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _from_pretrained(transformers: Any, path: Path) -> nn.Module:
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        try:
            # transformers 5 names the auto class ImageToImage, 4.x ImageSuperResolution
            cls: Any = getattr(transformers, "AutoModelForImageToImage", None)
            if cls is None:
                cls = transformers.AutoModelForImageSuperResolution
            return cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            raise CheckpointError(f"model.hf: {path} is a {config.model_type} model, not an "
                                  "image-to-image (super-resolution) model") from None
    except (OSError, ValueError, KeyError) as e:
        first = " ".join(str(e).strip().split())[:300]
        raise CheckpointError(f"model.hf: cannot load {path} ({first})") from None


@torch.no_grad()
def _probe_scale(frozen: FrozenModel, channels: int, device: str) -> int:
    x = torch.zeros(1, channels, PROBE, PROBE, device=device)
    try:
        y = frozen(x)
    except RuntimeError as e:
        first = " ".join(str(e).strip().split())[:300]
        raise UserError(f"model: the frozen model fails on a {channels}-channel image "
                        f"({first})") from None
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[1] != channels:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise UserError(f"model: the frozen model maps (1, {channels}, {PROBE}, {PROBE}) to "
                        f"{shape}; an image-to-image model keeps the channels")
    sh, sw = y.shape[-2] / PROBE, y.shape[-1] / PROBE
    if sh != sw or sh != int(sh) or sh < 1:
        raise UserError(f"model: the frozen model maps {PROBE}×{PROBE} to "
                        f"{y.shape[-2]}×{y.shape[-1]}: not an integer upscaling")
    return int(sh)


__all__ = ["FrozenModel", "check_model", "code_refs", "load_frozen", "model_inputs",
           "weights_sha256"]
