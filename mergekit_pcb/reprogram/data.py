"""Paired images: folders of PNG/JPEG paired by file name (stem), or a tensor file.

A split is a list of (degraded, clean) pairs of float32 tensors (C, H, W) in [0, 1]
(tensor files may hold values outside, e.g. unclipped noise). Images of one split may have
different sizes; the clean image is the frozen model's scale times the degraded one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_pcb.errors import UserError
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.reprogram.config import PairSource, resolve_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TENSOR_KEYS = ("degraded", "clean")


@dataclass
class PairSet:
    names: list[str] = field(default_factory=list)
    degraded: list[torch.Tensor] = field(default_factory=list)
    clean: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def image_files(folder: Path, key: str) -> dict[str, Path]:
    """stem -> file, for the PNG/JPEG files of `folder` (hidden files skipped)."""
    out: dict[str, Path] = {}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"{key}: cannot read folder {folder}: {e.strerror}") from None
    for entry in entries:
        p = Path(entry.path)
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not entry.is_file():
            raise UserError(f"{key}: {p} is not a regular file")
        if p.stem in out:
            raise UserError(f"{key}: {out[p.stem].name} and {p.name} in {folder} have the same "
                            "name (images pair by file name without extension)")
        out[p.stem] = p
    if not out:
        raise UserError(f"{key}: no PNG or JPEG images in {folder}")
    return out


def image_size(path: Path, key: str) -> tuple[int, int]:
    """(H, W) from the file's header, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"{key}: cannot read image {path} ({e})") from None
    return h, w


def read_image(path: Path, channels: int, key: str) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1]; colour converted to `channels` (1 grey, 3 RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"{key}: cannot read image {path} ({e})") from None
    t = torch.from_numpy(arr.copy()).float() / 255.0
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def write_image(path: Path, image: torch.Tensor) -> None:
    """(C, H, W) in [0, 1] (clamped) as an 8-bit PNG."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    arr_np = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    Image.fromarray(arr_np).save(path, format="PNG")


def pair_files(src: PairSource, root: Path, key: str) -> list[tuple[str, Path, Path]]:
    """(name, degraded file, clean file), paired by stem; every file must have its pair."""
    assert src.degraded is not None and src.clean is not None
    ddir = resolve_path(src.degraded, root, f"{key}.degraded", directory=True)
    cdir = resolve_path(src.clean, root, f"{key}.clean", directory=True)
    if ddir.resolve() == cdir.resolve():
        raise UserError(f"{key}: 'degraded' and 'clean' are the same folder {ddir}")
    deg = image_files(ddir, f"{key}.degraded")
    cln = image_files(cdir, f"{key}.clean")
    for name, p in deg.items():
        if name not in cln:
            raise UserError(f"{key}: {p} has no clean image of the same name in {cdir}")
    for name, p in cln.items():
        if name not in deg:
            raise UserError(f"{key}: {p} has no degraded image of the same name in {ddir}")
    return [(name, deg[name], cln[name]) for name in deg]


def check_split(src: PairSource, root: Path, key: str, channels: int) -> dict[str, Any]:
    """The split's checks that read headers only: pairs, sizes, tensor keys and shapes."""
    if src.tensors is not None:
        path = resolve_path(src.tensors, root, f"{key}.tensors", directory=False)
        shapes = _tensor_shapes(path, f"{key}.tensors", channels)
        (dh, dw), (ch, cw) = shapes[0][2:], shapes[1][2:]
        if ch / dh != cw / dw or ch % dh or ch < dh:
            raise UserError(f"{key}: 'clean' is {ch}×{cw} and 'degraded' {dh}×{dw} in {path}: "
                            "the clean images must be the same size (or an integer scale)")
        return {"tensors": str(path), "pairs": shapes[0][0], "scale": ch // dh,
                "min_size": [dh, dw]}
    pairs = pair_files(src, root, key)
    scale = None
    min_h = min_w = 1 << 30
    for _, dp, cp in pairs:
        (dh, dw), (ch, cw) = image_size(dp, key), image_size(cp, key)
        min_h, min_w = min(min_h, dh), min(min_w, dw)
        s = ch / dh
        if s != cw / dw or s != int(s) or s < 1 or (scale is not None and s != scale):
            raise UserError(f"{key}: {cp} is {ch}×{cw} and {dp} is {dh}×{dw}: the clean "
                            "image must be the same size (or one integer scale throughout)")
        scale = s
    return {"degraded": str(pairs[0][1].parent), "clean": str(pairs[0][2].parent),
            "pairs": len(pairs), "scale": int(scale or 1), "min_size": [min_h, min_w]}


def _tensor_shapes(path: Path, key: str, channels: int) -> list[tuple[int, ...]]:
    with open_checkpoint(str(path)) as ckpt:
        missing = [k for k in TENSOR_KEYS if k not in ckpt]
        if missing:
            raise UserError(f"{key}: {path} has no tensor '{missing[0]}' (it needs 'degraded' "
                            "and 'clean', each (N, C, H, W))")
        shapes = [tuple(ckpt.info(k).shape) for k in TENSOR_KEYS]
        dtypes = [ckpt.info(k).dtype for k in TENSOR_KEYS]
    for k, shape, dtype in zip(TENSOR_KEYS, shapes, dtypes, strict=True):
        if len(shape) != 4 or shape[0] < 1 or shape[1] != channels:
            raise UserError(f"{key}: '{k}' in {path} has shape {list(shape)}; expected (N, "
                            f"{channels}, H, W) with N >= 1")
        if not (dtype.is_floating_point or dtype == torch.uint8):
            raise UserError(f"{key}: '{k}' in {path} is {dtype}; expected a float or uint8 "
                            "tensor")
    if shapes[0][0] != shapes[1][0]:
        raise UserError(f"{key}: {path} holds {shapes[0][0]} degraded and {shapes[1][0]} clean "
                        "images")
    return shapes


def load_split(src: PairSource, root: Path, key: str, channels: int) -> PairSet:
    check_split(src, root, key, channels)
    if src.tensors is not None:
        path = resolve_path(src.tensors, root, f"{key}.tensors", directory=False)
        with open_checkpoint(str(path)) as ckpt:
            deg, cln = (_as_float(ckpt.read(k)) for k in TENSOR_KEYS)
        for t, k in ((deg, "degraded"), (cln, "clean")):
            if not bool(torch.isfinite(t).all()):
                raise UserError(f"{key}: '{k}' in {path} holds NaN or infinite values")
        return PairSet([f"{i:05d}" for i in range(len(deg))], list(deg), list(cln))
    out = PairSet()
    for name, dp, cp in pair_files(src, root, key):
        out.names.append(name)
        out.degraded.append(read_image(dp, channels, key))
        out.clean.append(read_image(cp, channels, key))
    return out


def load_reference(ref: str, root: Path, key: str, channels: int) -> list[torch.Tensor]:
    """Images of the frozen model's known domain: a folder, or a tensor file ('clean')."""
    path = resolve_path(ref, root, key, directory=None)
    if path.is_dir():
        return [read_image(p, channels, key) for p in image_files(path, key).values()]
    with open_checkpoint(str(path)) as ckpt:
        if "clean" not in ckpt:
            raise UserError(f"{key}: {path} has no tensor 'clean'")
        t = _as_float(ckpt.read("clean"))
    if t.dim() != 4 or t.shape[1] != channels:
        raise UserError(f"{key}: 'clean' in {path} has shape {list(t.shape)}; expected "
                        f"(N, {channels}, H, W)")
    return list(t)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


__all__ = ["IMAGE_SUFFIXES", "PairSet", "check_split", "image_files", "load_reference",
           "load_split", "pair_files", "read_image", "write_image"]
