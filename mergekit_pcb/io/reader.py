"""Lazy checkpoint reading: tensor names, shapes and dtypes up front, data one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.io.resolve import resolve_model_path
from mergekit_pcb.io.safetensors_format import TensorInfo, read_header, read_tensor

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """One input model: its tensor table and the files behind it.

    Safetensors data is read with positioned reads, one tensor at a time. Pickled
    checkpoints (only with `allow_pickle`) are loaded with `torch.load(weights_only=True,
    mmap=True)` so that their storage stays memory-mapped as well.
    """

    def __init__(self, ref: str, root: Path, tensors: dict[str, TensorInfo],
                 pickle_files: dict[Path, None] | None = None) -> None:
        self.ref = ref
        self.root = root  # a directory (config, tokenizer) or the single file's directory
        self.tensors = tensors
        self._handles: dict[Path, BinaryIO] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._pickle_files = pickle_files or {}

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {len(self.tensors)} tensors)"

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is missing from model {self.ref}") from None

    def read(self, name: str, start: int | None = None, stop: int | None = None
             ) -> torch.Tensor:
        """The tensor, or with `start`/`stop` its flat elements [start, stop) as 1-D."""
        info = self.info(name)
        if info.file in self._pickle_files:
            tensor = self._read_pickled(info)
            return tensor if start is None and stop is None else tensor.reshape(-1)[start:stop]
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = open(info.file, "rb")  # noqa: SIM115 - kept open across reads
            except OSError as e:
                raise CheckpointError(f"cannot open {info.file}: {e.strerror or e}") from e
            self._handles[info.file] = handle
        return read_tensor(handle, info, start, stop)

    def _read_pickled(self, info: TensorInfo) -> torch.Tensor:
        state = self._pickled.get(info.file)
        if state is None:
            state = _load_pickle(info.file)
            self._pickled = {info.file: state}  # keep one pickled file mapped at a time
        return state[info.name].clone()

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        self._pickled.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(ref: str, *, allow_pickle: bool = False,
                    base_dir: Path | None = None) -> Checkpoint:
    """Open a model reference: a directory, a `.safetensors` file or a hub id."""
    path = resolve_model_path(ref, base_dir=base_dir, allow_pickle=allow_pickle)
    if path.is_file():
        if path.suffix == ".safetensors":
            return Checkpoint(ref, path.parent, _read_files(ref, [path]))
        if path.suffix in (".bin", ".pt", ".pth"):
            return _open_pickled(ref, path.parent, [path], allow_pickle)
        raise CheckpointError(f"model {ref}: {path} is not a .safetensors file or directory")
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        files = _files_from_index(ref, index)
        tensors = _read_files(ref, files)
        _check_index_matches(ref, index, files, tensors)
        return Checkpoint(ref, path, tensors)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return Checkpoint(ref, path, _read_files(ref, shards))
    pickled = _pickle_files(path)
    if pickled:
        return _open_pickled(ref, path, pickled, allow_pickle)
    raise CheckpointError(f"model {ref}: no .safetensors weights found in {path}")


def _files_from_index(ref: str, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"model {ref}: corrupt index {index} ({e})") from e
    files = []
    for fname in dict.fromkeys(weight_map.values()):
        f = index.parent / fname
        if not f.is_file():
            raise CheckpointError(f"model {ref}: shard {f} named in {index.name} is missing")
        files.append(f)
    return files


def _check_index_matches(ref: str, index: Path, files: list[Path],
                         tensors: dict[str, TensorInfo]) -> None:
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    for name, fname in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != fname:
            raise CheckpointError(
                f"model {ref}: {index.name} places tensor '{name}' in {fname}, "
                "but that shard does not hold it"
            )


def _read_files(ref: str, files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos, _ = read_header(f)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(
                    f"model {ref}: tensor '{name}' appears in both {tensors[name].file.name} "
                    f"and {f.name}"
                )
            tensors[name] = info
    return tensors


def _pickle_files(path: Path) -> list[Path]:
    index = path / PICKLE_INDEX
    if index.is_file():
        try:
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"corrupt index {index} ({e})") from e
        return [path / n for n in names]
    return sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))


def _open_pickled(ref: str, root: Path, files: list[Path], allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        raise CheckpointError(
            f"model {ref}: {files[0].name} is a pickled checkpoint; pickles can run code when "
            "loaded, so they are refused unless you pass --allow-pickle"
        )
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, t in _load_pickle(f).items():
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), f, 0,
                                       t.numel() * t.element_size())
    return Checkpoint(ref, root, tensors, pickle_files=dict.fromkeys(files))


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise CheckpointError(f"cannot load pickled checkpoint {path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"pickled checkpoint {path} is not a flat dict of tensors")
    return state


def iter_config_files(root: Path) -> Iterator[Path]:
    """Non-weight JSON files of a model directory (config, generation config)."""
    for name in ("config.json", "generation_config.json"):
        p = root / name
        if p.is_file():
            yield p
