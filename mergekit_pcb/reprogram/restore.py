"""Applying a module (or f alone) to images of any size, and `pcbmerge restore`.

`pcbmerge restore --model M --module MOD IN_DIR OUT_DIR` takes the frozen model as
- an osr-reprogram recipe (.yaml): its `model:` block, paths relative to the recipe;
- a Hugging Face image-to-image model directory (it holds config.json);
- a .safetensors file (or a folder of them) with `--arch package.module:factory` and
  optionally `--arch-kwargs '{"width": 16}'` (code: needs --trust-code).
It refuses a module whose recorded SHA-256 is not that of the model's weights. Restored
images are PNG files named after the inputs, written into a folder built beside OUT_DIR
and renamed into place (an existing OUT_DIR is replaced only with --force).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.errors import RecipeError, UserError
from mergekit_pcb.io.writer import atomic_output_dir
from mergekit_pcb.recipe.schema import read_yaml
from mergekit_pcb.reprogram.config import ModelSpec, parse_reprogram_recipe
from mergekit_pcb.reprogram.data import image_files, read_image, write_image
from mergekit_pcb.reprogram.frozen import FrozenModel, load_frozen, model_inputs
from mergekit_pcb.reprogram.modules import ReprogramModule
from mergekit_pcb.reprogram.store import load_module, module_file

BATCH = 8


@torch.no_grad()
def apply_batch(module: ReprogramModule | None, frozen: FrozenModel, x: torch.Tensor
                ) -> torch.Tensor:
    """module(x, f), or f(x) with no module, on a batch (B, C, H, W) of one size."""
    return frozen(x) if module is None else module(x, frozen)


def apply_images(module: ReprogramModule | None, frozen: FrozenModel,
                 images: list[torch.Tensor], device: str = "cpu") -> list[torch.Tensor]:
    """Each image (C, H, W) of any size restored; images of one size go in batches."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[tuple(img.shape)].append(i)
    for rows in groups.values():
        for k in range(0, len(rows), BATCH):
            part = rows[k:k + BATCH]
            x = torch.stack([images[i] for i in part]).to(device)
            y = apply_batch(module, frozen, x).cpu()
            for j, i in enumerate(part):
                out[i] = y[j]
    return [o for o in out if o is not None]


def model_spec_option(model: Path, arch: str | None, arch_kwargs: str | None
                      ) -> tuple[ModelSpec, Path]:
    """`--model` (with `--arch`/`--arch-kwargs`) as a model spec and the folder its relative
    paths are read from."""
    if model.suffix.lower() in (".yaml", ".yml") and model.is_file():
        if arch is not None or arch_kwargs is not None:
            raise UserError("--arch: not used with a recipe as --model (the recipe's model: "
                            "block names the architecture)")
        recipe = parse_reprogram_recipe(read_yaml(model), str(model))
        return recipe.model, model.parent
    if not model.exists():
        raise UserError(f"--model: {model} not found")
    if arch is None:
        if model.is_dir() and (model / "config.json").is_file():
            return ModelSpec(hf=str(model)), Path.cwd()
        raise UserError(f"--model: {model} is not a recipe or a Hugging Face model directory; "
                        "weights (.safetensors) need --arch package.module:factory")
    kwargs: Any = {}
    if arch_kwargs is not None:
        try:
            kwargs = json.loads(arch_kwargs)
        except ValueError:
            raise UserError(f"--arch-kwargs: not JSON: {arch_kwargs[:100]!r}") from None
        if not isinstance(kwargs, dict):
            raise UserError("--arch-kwargs: must be a JSON object")
    try:
        spec = ModelSpec(arch=arch, arch_kwargs=kwargs, weights=str(model))
    except ValueError as e:
        raise RecipeError(f"--arch: {' '.join(str(e).split())[:200]}") from None
    if ":" not in arch or arch.startswith(":") or arch.endswith(":"):
        raise UserError(f"--arch: '{arch}' is not package.module:factory")
    return spec, Path.cwd()


def check_hash(meta: dict[str, str], frozen: FrozenModel, module_path: Path, model: Path
               ) -> None:
    expected = meta["frozen_sha256"]
    if expected != frozen.sha256:
        raise UserError(f"--module: {module_path} was trained for a frozen model with weights "
                        f"SHA-256 {expected[:16]}…, but --model {model} has {frozen.sha256[:16]}"
                        "…; a module fits only the model it was trained for")


def restore_folder(model: Path, module: Path, in_dir: Path, out_dir: Path, *,
                   arch: str | None = None, arch_kwargs: str | None = None,
                   force: bool = False, trust_code: bool = False, device: str = "cpu"
                   ) -> dict[str, Any]:
    start = time.perf_counter()
    spec, root = model_spec_option(model, arch, arch_kwargs)
    mpath = module_file(module)
    if not in_dir.is_dir():
        raise UserError(f"IN_DIR: folder not found: {in_dir}")
    files = image_files(in_dir, "IN_DIR")
    mod, meta = load_module(mpath)
    frozen = load_frozen(spec, root, trust_code=trust_code, channels=mod.channels,
                         device=device)
    check_hash(meta, frozen, mpath, model)
    mod.to(device)
    inputs = [in_dir, mpath, *model_inputs(spec, root)]
    images = [read_image(p, mod.channels, "IN_DIR") for p in files.values()]
    with atomic_output_dir(out_dir, force=force, inputs=inputs, kind="restore") as tmp:
        restored = apply_images(mod, frozen, images, device)
        for name, img in zip(files, restored, strict=True):
            write_image(tmp / f"{name}.png", img)
    return {"kind": "restore", "output": str(out_dir), "images": len(images),
            "mode": mod.mode, "frozen_sha256": frozen.sha256,
            "seconds": round(time.perf_counter() - start, 3)}


__all__ = ["apply_batch", "apply_images", "check_hash", "model_spec_option", "restore_folder"]
