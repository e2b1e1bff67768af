"""The safetensors file format, read and written by hand.

We parse headers ourselves (instead of `safetensors.safe_open`) so that a corrupt header or
a truncated shard is reported with the file and tensor at fault before any work starts, and
so that tensor data is read with positioned reads into one buffer per tensor: resident
memory stays one tensor's worth however many shards are open.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from mergekit_pcb.errors import CheckpointError

# Format dtype codes <-> torch dtypes.
DTYPE_FROM_CODE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_CODE.items()}

# A header larger than this is certainly corrupt (the format's own reader caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return tensor infos and metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"corrupt safetensors file {path}: shorter than 8 bytes")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"corrupt safetensors file {path}: header length {header_len} does not fit "
                    f"in a file of {size} bytes"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry, data_start, data_size)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(
    path: Path, name: str, entry: object, data_start: int, data_size: int
) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"corrupt safetensors file {path}: bad header entry for '{name}'")
    code = entry["dtype"]
    if code not in DTYPE_FROM_CODE:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {code!r}")
    dtype = DTYPE_FROM_CODE[code]
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (int(x) for x in entry["data_offsets"])
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * dtype.itemsize
    if end - begin != expected or begin < 0:
        raise CheckpointError(
            f"corrupt safetensors file {path}: tensor '{name}' has {end - begin} bytes "
            f"for shape {list(shape)} {code} ({expected} expected)"
        )
    if end > data_size:
        raise CheckpointError(
            f"truncated safetensors file {path}: tensor '{name}' ends at byte {end} of the data "
            f"but the file holds only {data_size} bytes of data"
        )
    return TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)


def read_tensor(handle: BinaryIO, info: TensorInfo, start: int | None = None,
                stop: int | None = None) -> torch.Tensor:
    """Read one tensor with a positioned read into a fresh buffer.

    With `start`/`stop`, only flat elements [start, stop) are read, as a 1-D tensor: large
    tensors can stream in slices.
    """
    whole = start is None and stop is None
    first = 0 if start is None else start
    last = info.numel if stop is None else stop
    size = info.dtype.itemsize
    nbytes = (last - first) * size
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    handle.seek(info.start + first * size)
    got = handle.readinto(memoryview(buffer.numpy())) if nbytes else 0
    if got != nbytes:
        raise CheckpointError(
            f"truncated safetensors file {info.file}: tensor '{info.name}' is cut short "
            f"({got} of {nbytes} bytes)"
        )
    flat = buffer.view(info.dtype)
    return flat.reshape(info.shape) if whole else flat


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out back to back in order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        header[name] = {
            "dtype": CODE_FROM_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without copying when already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
