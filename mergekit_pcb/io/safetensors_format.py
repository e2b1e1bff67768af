"""The safetensors file format, read and written by hand.

We parse headers ourselves (instead of `safetensors.safe_open`) so that a corrupt header or
a truncated shard is reported with the file and tensor at fault before any work starts, and
so that tensor data is read with positioned reads into one buffer per tensor: resident
memory stays one tensor's worth however many shards are open.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import stat
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
# torch sizes storage in int64 bytes; a larger tensor cannot exist, whatever the header says.
MAX_TENSOR_BYTES = 2**63 - 1
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# Characters that would split a one-line error message or garble a terminal (control
# characters, line separators) or that no JSON writer can encode (lone surrogates).
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
}

# Values echoed in error messages come from hostile files: bounded in length and depth.
_brief = reprlib.Repr()
_brief.maxstring = _brief.maxother = 60
_brief.maxlevel = 2


def brief_repr(value: object) -> str:
    """A one-line repr of at most ~60 characters, safe on huge or deeply nested values."""
    text = _brief.repr(value)
    return text if len(text) <= 64 else text[:60] + "..."


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


def require_regular(path: Path) -> None:
    """Stat `path`; refuse anything but a regular file before it is ever opened.

    Opening a FIFO blocks forever and a device such as /dev/zero reads without end.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL byte
        raise CheckpointError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    if not stat.S_ISREG(st.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
        raise CheckpointError(f"cannot read {path}: it is {kind}, not a regular file")


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; FIFOs and devices are refused without blocking."""
    require_regular(path)
    try:
        # O_NONBLOCK: should the path turn into a FIFO after the stat, open() still returns
        # and the fstat below refuses it. It does nothing to reads of a regular file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"cannot read {path}: it is not a regular file")
    return os.fdopen(fd, "rb")


class _DuplicateKey(ValueError):
    """Raised from inside json.loads; the message is the reason, as for decode_json."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"has duplicate key {brief_repr(key)}")
            seen.add(key)
    return obj


def decode_json(raw: bytes) -> object:
    """Parse strict UTF-8 JSON; raise ValueError with a short reason ('is not JSON (...)').

    Duplicate keys are refused (the last would silently win: two tensors of one name), and
    so is nesting deep enough to exhaust the parser's recursion.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"is not UTF-8 (invalid byte at offset {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        raise
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"is not JSON ({e.msg} at character {e.pos})") from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise ValueError(f"is not JSON ({brief_repr(str(e))})") from None


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return tensor infos and metadata.

    Everything is checked before any tensor data is read or allocated, as strictly as the
    format's own (Rust) reader: known dtypes, sizes that match shapes, and tensors that
    tile the data section exactly, without overlaps, gaps or trailing bytes.
    """
    corrupt = f"corrupt safetensors file {path}"
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{corrupt}: shorter than 8 bytes")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len == 0:
                raise CheckpointError(f"{corrupt}: header length is 0")
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{corrupt}: header length {header_len} is over the "
                                      f"{MAX_HEADER_BYTES} byte limit")
            if 8 + header_len > size:
                raise CheckpointError(f"{corrupt}: header length {header_len} does not fit "
                                      f"in a file of {size} bytes")
            raw = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if len(raw) != header_len:  # the file shrank under us
        raise CheckpointError(f"truncated safetensors file {path}: header cut short")
    try:
        header = decode_json(raw)
    except ValueError as e:
        raise CheckpointError(f"{corrupt}: header {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{corrupt}: header is not a JSON object")
    metadata = _metadata(corrupt, header.pop("__metadata__", None))
    data_start = 8 + header_len
    data_size = size - data_start
    infos = {name: _tensor_info(path, name, entry, data_start, data_size)
             for name, entry in header.items()}
    _check_layout(path, infos, data_start, data_size)
    return infos, metadata


def _metadata(corrupt: str, value: object) -> dict[str, str]:
    if value is None:  # absent, or null as the Rust reader also accepts
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{corrupt}: __metadata__ must map strings to strings, "
                              f"got {brief_repr(value)}")
    for key, v in value.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{corrupt}: __metadata__ value for {brief_repr(key)} must "
                                  f"be a string, got {brief_repr(v)}")
    return value


def _tensor_info(
    path: Path, name: str, entry: object, data_start: int, data_size: int
) -> TensorInfo:
    where = f"corrupt safetensors file {path}: tensor {brief_repr(name)}"
    if UNPRINTABLE.search(name):
        raise CheckpointError(f"{where}: the name has control or unencodable characters")
    if not isinstance(entry, dict) or entry.keys() != ENTRY_KEYS:
        got = sorted(entry) if isinstance(entry, dict) else entry
        raise CheckpointError(f"{where}: header entry must be an object with exactly the keys "
                              f"dtype, shape, data_offsets; got {brief_repr(got)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str):  # a list or dict here is unhashable: check before lookup
        raise CheckpointError(f"{where}: dtype must be a string, got {brief_repr(code)}")
    if code not in DTYPE_FROM_CODE:
        raise CheckpointError(
            f"{path}: tensor {brief_repr(name)} has unsupported dtype {brief_repr(code)}")
    dtype = DTYPE_FROM_CODE[code]
    # type() is int, not isinstance: JSON true/false arrive as bool, an int subclass.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, "
                              f"got {brief_repr(shape)}")
    # Left to right with an early stop, as the Rust reader and torch's storage check do, so
    # that a long list of huge dimensions never builds a huge integer.
    expected = dtype.itemsize
    for d in shape:
        expected *= d
        if expected > MAX_TENSOR_BYTES or d > MAX_TENSOR_BYTES:
            raise CheckpointError(f"{where}: shape {brief_repr(shape)} {code} is over "
                                  f"{MAX_TENSOR_BYTES} bytes")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(x) is int for x in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be two integers [begin, end] with "
                              f"0 <= begin <= end, got {brief_repr(offsets)}")
    begin, end = offsets
    if end - begin != expected:
        raise CheckpointError(
            f"{where} has {end - begin} bytes for shape {brief_repr(shape)} {code} "
            f"({expected} expected)"
        )
    if end > data_size:
        raise CheckpointError(
            f"truncated safetensors file {path}: tensor {brief_repr(name)} ends at byte {end} "
            f"of the data but the file holds only {data_size} bytes of data"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _check_layout(path: Path, infos: dict[str, TensorInfo], data_start: int,
                  data_size: int) -> None:
    """Tensors must tile the data section: bytes shared by two tensors would alias them, and
    bytes owned by none mean a damaged or spliced file (the Rust reader refuses both)."""
    corrupt = f"corrupt safetensors file {path}"
    previous: TensorInfo | None = None
    covered = data_start
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start < covered:
            assert previous is not None  # nothing starts before the data section
            raise CheckpointError(
                f"{corrupt}: tensor {brief_repr(info.name)} (data bytes {info.start - data_start}"
                f" to {info.end - data_start}) overlaps tensor {brief_repr(previous.name)} "
                f"(data bytes {previous.start - data_start} to {previous.end - data_start})")
        if info.start > covered:
            after = "the start of the data" if previous is None \
                else f"tensor {brief_repr(previous.name)}"
            raise CheckpointError(f"{corrupt}: {info.start - covered} bytes between {after} "
                                  f"and tensor {brief_repr(info.name)} belong to no tensor")
        previous, covered = info, info.end
    if covered < data_start + data_size:
        raise CheckpointError(f"{corrupt}: {data_start + data_size - covered} bytes at the end "
                              "of the file belong to no tensor")


def _read_at(handle: BinaryIO, into: memoryview, offset: int) -> int:
    """Fill `into` from `offset` of the file; the count read (short only at the end of the
    file). A positioned read leaves the handle's position alone, so threads that share a
    checkpoint's handle (a large tensor read by the thread that merges it, beside the
    read-ahead thread) cannot move each other's reads."""
    if not hasattr(os, "preadv"):  # no positioned read here (Windows): seek, then read
        handle.seek(offset)
        return handle.readinto(into) or 0
    fd, got = handle.fileno(), 0
    while got < len(into):  # a read returns at most about 2 GB at once
        n = os.preadv(fd, [into[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


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
    got = _read_at(handle, memoryview(buffer.numpy()), info.start + first * size)
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
