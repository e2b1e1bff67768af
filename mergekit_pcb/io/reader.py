"""Lazy checkpoint reading: tensor names, shapes and dtypes up front, data one tensor at a time."""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.io.resolve import resolve_model_path
from mergekit_pcb.io.safetensors_format import (
    UNPRINTABLE,
    TensorInfo,
    brief_repr,
    decode_json,
    open_regular,
    read_header,
    read_tensor,
    require_regular,
)

__all__ = ["Checkpoint", "TensorInfo", "inside_model_dir", "open_plain_checkpoint"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Real indexes are a few hundred KB even for the largest models; past this one is corrupt.
MAX_INDEX_BYTES = 64_000_000


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
        # Whether `root` is the model's own directory (opened as one): only then does an
        # output carry over its other files (a single file's folder may hold anything).
        self.own_directory = False
        # What a reader may key derived values by, across merges: a file's (path, device,
        # inode, mtime, size) when it was opened; None when no such key is safe.
        self.identity: Hashable | None = None
        self.tensors = tensors
        self._handles: dict[Path, BinaryIO] = {}
        self._open_lock = threading.Lock()
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
        with self._open_lock:  # threads read one checkpoint side by side
            handle = self._handles.get(info.file)
            if handle is None:
                handle = open_regular(info.file)  # kept open across reads
                self._handles[info.file] = handle
        return read_tensor(handle, info, start, stop)

    def _read_pickled(self, info: TensorInfo) -> torch.Tensor:
        state = self._pickled.get(info.file)
        if state is None:
            state = _load_pickle(info.file)
            self._pickled = {info.file: state}  # keep one pickled file mapped at a time
        return state[info.name].clone()

    @property
    def pickled(self) -> bool:
        """Whether any of its files is a pickle (loaded through `torch.load`)."""
        return bool(self._pickle_files)

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


def open_plain_checkpoint(ref: str, *, allow_pickle: bool = False,
                          base_dir: Path | None = None, resolved: Path | None = None
                          ) -> Checkpoint:
    """Open a model reference: a directory, a `.safetensors` file or a hub id (not
    `BASE+ADAPTER`: `io.checkpoints.open_checkpoint` opens any reference).

    Inside a directory, only regular files that stay in it (after symlinks) are opened: an
    index naming `../../etc/passwd`, an absolute path or a FIFO is refused unopened.
    `resolved`: the path `resolve_model_path` already gave for `ref` (not asked again).
    """
    path = resolved if resolved is not None else resolve_model_path(
        ref, base_dir=base_dir, allow_pickle=allow_pickle)
    if not path.is_dir():
        if path.suffix == ".safetensors":
            return Checkpoint(ref, path.parent, _read_files(ref, [path]))
        if path.suffix in (".bin", ".pt", ".pth"):
            _refuse_pickle_unless(allow_pickle, ref, path.name)
            return _open_pickled(ref, path.parent, [path])
        raise CheckpointError(f"model {ref}: {path} is not a .safetensors file or directory")
    if os.path.lexists(path / SAFETENSORS_INDEX):
        weight_map = _read_weight_map(ref, path, SAFETENSORS_INDEX)
        files = [_model_file(ref, path, name, f" named in {SAFETENSORS_INDEX}")
                 for name in dict.fromkeys(weight_map.values())]
        tensors = _read_files(ref, files)
        _check_index_matches(ref, weight_map, tensors)
        return _own_directory(Checkpoint(ref, path, tensors))
    if os.path.lexists(path / "adapter_config.json"):
        raise CheckpointError(f"model {ref}: a PEFT adapter, not a model; name it over its "
                              f"base as BASE+{ref} or with a models[].adapter key")
    shards = [_model_file(ref, path, p.name) for p in sorted(path.glob("*.safetensors"))]
    if shards:
        return _own_directory(Checkpoint(ref, path, _read_files(ref, shards)))
    pickled = _pickle_names(ref, path)
    if pickled:
        _refuse_pickle_unless(allow_pickle, ref, pickled[0])
        where = f" named in {PICKLE_INDEX}" if os.path.lexists(path / PICKLE_INDEX) else ""
        return _own_directory(
            _open_pickled(ref, path, [_model_file(ref, path, n, where) for n in pickled]))
    raise CheckpointError(f"model {ref}: no .safetensors weights found in {path}")


def _own_directory(ckpt: Checkpoint) -> Checkpoint:
    ckpt.own_directory = True
    return ckpt


def _allowed_roots(root: Path) -> list[Path]:
    """Where files of model directory `root` may live once symlinks are followed.

    A Hugging Face cache snapshot (`models--org--name/snapshots/<commit>/`) holds only
    symlinks into the repository's `blobs/`, so that folder counts as inside too.
    """
    real = root.resolve()
    if real.parent.name == "snapshots":
        return [real, real.parent.parent / "blobs"]
    return [real]


def inside_model_dir(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks followed, stays inside model directory `root`."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False
    return any(real.is_relative_to(r) for r in _allowed_roots(root))


def _model_file(ref: str, root: Path, name: str, where: str = "") -> Path:
    """`root / name`, checked to be a regular file inside `root`; never opened here.

    `name` must be a plain file name: absolute paths and `..` could reach any file on the
    machine, and symlinks leading out of the directory are refused the same way.
    """
    # UNPRINTABLE: a NUL or newline in a name; 255 bytes: the longest name file systems allow.
    if name in ("", ".", "..") or "/" in name or UNPRINTABLE.search(name) \
            or len(name.encode()) > 255:
        raise CheckpointError(f"model {ref}: file name {brief_repr(name)}{where} is not a plain "
                              "file name in the model directory")
    f = root / name
    try:
        real = f.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise CheckpointError(f"model {ref}: cannot resolve {f}{where} ({e})") from e
    if not any(real.is_relative_to(r) for r in _allowed_roots(root)):
        raise CheckpointError(f"model {ref}: {f}{where} is a symlink leading outside the model "
                              f"directory {root}")
    if not real.exists():  # a dangling symlink too
        raise CheckpointError(f"model {ref}: {f}{where} is missing")
    require_regular(f)
    return f


def _read_weight_map(ref: str, root: Path, name: str) -> dict[str, str]:
    """The `weight_map` of index `root / name`: tensor name -> shard file name."""
    index = _model_file(ref, root, name)
    corrupt = f"model {ref}: corrupt index {index}"
    with open_regular(index) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise CheckpointError(f"{corrupt}: {size} bytes, and an index over "
                                      f"{MAX_INDEX_BYTES} bytes cannot be genuine")
            raw = f.read(MAX_INDEX_BYTES + 1)  # bounded even if the file grows meanwhile
        except OSError as e:
            raise CheckpointError(f"model {ref}: cannot read {index}: {e.strerror or e}") from e
    if len(raw) > MAX_INDEX_BYTES:
        raise CheckpointError(f"{corrupt}: over {MAX_INDEX_BYTES} bytes")
    try:
        data = decode_json(raw)
    except ValueError as e:
        raise CheckpointError(f"{corrupt}: the file {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{corrupt}: not a JSON object")
    if "weight_map" not in data:
        raise CheckpointError(f"{corrupt}: no 'weight_map'")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{corrupt}: 'weight_map' must map tensor names to shard file "
                              f"names, got {brief_repr(weight_map)}")
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"{corrupt}: weight_map[{brief_repr(tensor)}] must be a file "
                                  f"name, got {brief_repr(fname)}")
    return weight_map


def _check_index_matches(ref: str, weight_map: dict[str, str],
                         tensors: dict[str, TensorInfo]) -> None:
    for name, fname in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != fname:
            raise CheckpointError(
                f"model {ref}: {SAFETENSORS_INDEX} places tensor {brief_repr(name)} in "
                f"{brief_repr(fname)}, but that shard does not hold it"
            )


def _read_files(ref: str, files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos, _ = read_header(f)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(
                    f"model {ref}: tensor {brief_repr(name)} appears in both "
                    f"{tensors[name].file.name} and {f.name}"
                )
            tensors[name] = info
    return tensors


def _pickle_names(ref: str, path: Path) -> list[str]:
    """Pickled weight file names of directory `path`: from its index, else by extension."""
    if os.path.lexists(path / PICKLE_INDEX):
        return list(dict.fromkeys(_read_weight_map(ref, path, PICKLE_INDEX).values()))
    return [p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in sorted(path.glob(pattern))]


def _refuse_pickle_unless(allow_pickle: bool, ref: str, name: str) -> None:
    if not allow_pickle:
        raise CheckpointError(
            f"model {ref}: {name} is a pickled checkpoint; pickles can run code when "
            "loaded, so they are refused unless you pass --allow-pickle"
        )


def _open_pickled(ref: str, root: Path, files: list[Path]) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, t in _load_pickle(f).items():
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), f, 0,
                                       t.numel() * t.element_size())
    return Checkpoint(ref, root, tensors, pickle_files=dict.fromkeys(files))


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    require_regular(path)  # torch.load opens by name: a FIFO would block it forever
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
