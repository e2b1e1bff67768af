"""Sharded safetensors output, written tensor by tensor, and the atomic output directory.

Every output tensor's name, dtype and shape are known before the merge starts, so each
shard's header is written first and tensors are appended as they are computed: the writer
holds no tensor in memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from mergekit_pcb.errors import OutputError
from mergekit_pcb.io.safetensors_format import encode_header, tensor_bytes

try:  # ISA-L's CRC-32 is zlib's, about 8× faster (20 MB: 0.9 ms against 8.2 ms)
    from isal.isal_zlib import crc32
except ImportError:  # a platform without its wheels
    from zlib import crc32

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs are then written unlocked
    fcntl = None  # type: ignore[assignment]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    file_name: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> list[Shard]:
    """Greedy, in order: a shard closes when the next tensor would push it past `shard_size`."""
    groups: list[list[OutputTensor]] = [[]]
    used = 0
    for t in tensors:
        if groups[-1] and used + t.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


MAX_SHARD_SIZE = 10**15  # 1 PB: anything larger is a typo, not a plan


def parse_size(text: str | int, flag: str = "--shard-size") -> int:
    """'5GB', '500M', '2GiB', '5B' or a plain byte count -> bytes (1 byte to 1 PB).

    A single-letter K, M or B reads as mergekit's `parse_kmb` reads it (thousand, million,
    billion bytes: `--out-shard-size 5B` is 5e9 bytes), so every size mergekit takes means
    the same here; KB/MB/GB/TB and KiB/MiB/GiB/TiB are byte units."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise OutputError(f"{flag}: cannot read size {text!r} (e.g. 5GB, 500MB)")
    if isinstance(text, int):
        value: float = text
    else:
        s = text.strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
                 "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "B": 10**9}
        unit = next((u for u in units if s.endswith(u)), "")
        number, factor = s[: len(s) - len(unit)], units.get(unit, 1)
        try:
            value = float(number) * factor
        except ValueError:
            raise OutputError(f"{flag}: cannot read size {text!r} (e.g. 5GB, 500MB)"
                              ) from None
    # float() takes 'inf' and 'nan', whose int() raises: check before converting
    if not math.isfinite(value):
        raise OutputError(f"{flag} must be a finite size, got {text!r}")
    if value > MAX_SHARD_SIZE:
        raise OutputError(f"{flag} {text!r} is larger than 1PB")
    if int(value) <= 0:
        raise OutputError(f"{flag} must be positive, got {text!r}")
    return int(value)


# Output bytes written between flushes to disk (see `ShardedSafetensorsWriter._append`).
SYNC_EVERY_BYTES = 256 << 20


class ShardedSafetensorsWriter:
    """Writes tensors, in plan order, into pre-planned shards under `directory`."""

    def __init__(self, directory: Path, shards: list[Shard],
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue: Iterator[tuple[Shard, OutputTensor]] = (
            (s, t) for s in shards for t in s.tensors
        )
        self._current: Shard | None = None
        self._handle: BinaryIO | None = None
        self._open_tensor: tuple[Shard, OutputTensor] | None = None
        self._written = 0
        self._unsynced = 0  # bytes written since the last flush to disk

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected = next(self._queue)
        if name != expected.name or tuple(tensor.shape) != expected.shape \
                or tensor.dtype != expected.dtype:
            raise RuntimeError(
                f"writer expected {expected.name} {expected.shape} {expected.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._append(shard, tensor)

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write one tensor from consecutive flat slices (large tensors stream in parts)."""
        self.begin(name)
        for chunk in chunks:
            self.add(chunk)
        self.end()

    def begin(self, name: str) -> None:
        """Start the next planned tensor; `add` its slices in order, then `end` it."""
        shard, expected = next(self._queue)
        if name != expected.name:
            raise RuntimeError(f"writer expected {expected.name}, got {name}")
        self._open_tensor = (shard, expected)
        self._written = 0

    def add(self, chunk: torch.Tensor) -> None:
        assert self._open_tensor is not None, "add() outside begin()/end()"
        shard, expected = self._open_tensor
        if chunk.dtype != expected.dtype:
            raise RuntimeError(f"writer expected {expected.name} {expected.dtype}, "
                               f"got {chunk.dtype}")
        self._append(shard, chunk)
        self._written += chunk.numel()

    def end(self) -> None:
        assert self._open_tensor is not None, "end() outside begin()"
        shard, expected = self._open_tensor
        if self._written * expected.dtype.itemsize != expected.nbytes:
            raise RuntimeError(f"writer got {self._written} elements for {expected.name}, "
                               f"expected shape {expected.shape}")
        if self._written == 0 and shard is not self._current:
            self._open(shard)
        self._open_tensor = None

    def _append(self, shard: Shard, tensor: torch.Tensor) -> None:
        if shard is not self._current:
            self._open(shard)
        assert self._handle is not None
        with disk_errors(self.directory.parent):
            data = tensor_bytes(tensor)
            self._handle.write(data)
            self._unsynced += len(data)
            if self._unsynced >= SYNC_EVERY_BYTES:
                # The kernel would hold a whole shard's dirty pages until the closing fsync,
                # which then waits for all of them; flushing as we go overlaps the disk with
                # the merge (this runs on the write-behind thread).
                self._handle.flush()
                os.fdatasync(self._handle.fileno())
                self._unsynced = 0

    def _open(self, shard: Shard) -> None:
        self._close_handle()
        self._current = shard
        with disk_errors(self.directory.parent):
            self._handle = open(self.directory / shard.file_name, "wb")  # noqa: SIM115
            entries = [(t.name, t.dtype, t.shape) for t in shard.tensors]
            self._handle.write(encode_header(entries, self.metadata))

    def _close_handle(self) -> None:
        if self._handle is not None:
            with disk_errors(self.directory.parent):
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
            self._handle = None
            self._unsynced = 0

    def close(self) -> None:
        """Finish the last shard and write the index (sharded output only)."""
        if next(self._queue, None) is not None:
            raise RuntimeError("writer closed before every planned tensor was written")
        for shard in self.shards:  # empty shards (no tensors written) still need a header
            if not (self.directory / shard.file_name).exists():
                self._open(shard)
        self._close_handle()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.name: s.file_name for s in self.shards for t in s.tensors},
            }
            with disk_errors(self.directory.parent):
                (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@contextlib.contextmanager
def disk_errors(where: Path, what: str = "the output") -> Iterator[None]:
    """OS errors a user can fix (full disk, permissions) as one-line OutputErrors."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {what} in {where}") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"cannot write {what} in {where}: {e.strerror}") from e
        raise


# ---- where outputs may go -------------------------------------------------------------------
#
# `-o` (and an evolution run directory) is replaced wholesale with --force, so a path that
# names an input, the folder holding the inputs, the working directory or the home directory
# would be deleted. Those are refused even with --force, and --force replaces only what a
# pcbmerge run wrote (the MARKER file below).

MARKER = ".pcbmerge-output"
MARKER_TOOL = "mergekit-pcb"
_LEFTOVER = re.compile(r"(partial|old)-([0-9]+)")


def marker_text(kind: str) -> str:
    """The marker's content: {"tool": "mergekit-pcb", "kind": kind}."""
    return json.dumps({"tool": MARKER_TOOL, "kind": kind}) + "\n"


def is_pcbmerge_output(path: Path | str) -> bool:
    """True when `path` is a directory that a pcbmerge run wrote (it holds a valid marker)."""
    marker = Path(path) / MARKER
    try:
        # size cap: a huge file under that name is not ours and not worth reading
        if not Path(path).is_dir() or not marker.is_file() or marker.stat().st_size > 4096:
            return False
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("tool") == MARKER_TOOL


def check_destination(destination: Path | str, *, force: bool,
                      inputs: Iterable[Path | str] = (), what: str = "output") -> Path:
    """Refuse a destination that --force must not (or cannot) replace; return it resolved.

    Refused even with `force`: a destination that, symlinks resolved, is, contains or lies
    inside one of `inputs`; the working directory or a folder above it; the filesystem root
    or the home directory (or a folder above it); an existing file; an existing non-empty
    directory without the pcbmerge marker. Without `force` any existing destination is
    refused. Nothing is created or changed.
    """
    d, shown = _check_location(destination, tuple(inputs), what)
    try:
        exists = os.path.lexists(d)
        is_dir = d.is_dir()
    except OSError as e:
        raise OutputError(f"cannot access {what} {shown}: {e.strerror}") from None
    if not exists:
        return d
    if not is_dir:
        raise OutputError(f"{what} {d} exists and is not a directory")
    if not force:
        raise OutputError(f"{what} {d} already exists; pass --force to replace it")
    # an empty directory has nothing to lose (e.g. made with mkdir before the run)
    if not is_pcbmerge_output(d) and not _is_empty_dir(d):
        raise OutputError(f"{what} {d} was not written by pcbmerge (it has no {MARKER} file); "
                          "refusing to replace it")
    return d


@contextlib.contextmanager
def atomic_output_dir(destination: Path | str, *, force: bool,
                      inputs: Iterable[Path | str] = (), kind: str = "merge") -> Iterator[Path]:
    """Yield a temporary directory beside `destination`; rename it into place on success.

    The destination is checked with `check_destination` (so `inputs` are never written over)
    and locked for the whole write: a second run writing the same destination meanwhile gets
    an OutputError instead of silently replacing the first one's output. Leftovers of killed
    runs beside the destination are removed first. The output gets the MARKER file (with
    `kind`) so that a later --force run may replace it. On any error the temporary directory
    is removed and `destination` is left as it was.
    """
    inputs = tuple(inputs)
    destination = check_destination(destination, force=force, inputs=inputs)
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {parent}: {e.strerror}") from e
    with output_lock(destination):
        remove_stale_partials(destination)
        # the check above ran unlocked: another run may have written the destination since
        check_destination(destination, force=force, inputs=inputs)
        tmp = parent / f".{destination.name}.partial-{os.getpid()}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot write in {parent}: {e.strerror}") from e
        try:
            yield tmp
            with disk_errors(parent):
                (tmp / MARKER).write_text(marker_text(kind))
            _move_into_place(tmp, destination, force=force, inputs=inputs)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _move_into_place(tmp: Path, destination: Path, *, force: bool,
                     inputs: tuple[Path | str, ...]) -> None:
    parent = destination.parent
    if not os.path.lexists(destination):
        try:
            os.rename(tmp, destination)
        except OSError as e:  # appeared meanwhile, made by something that takes no lock
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputError(f"output {destination} already exists; pass --force to "
                                  "replace it") from None
            raise
        return
    # the body may have run for hours: check once more what is about to be replaced
    check_destination(destination, force=force, inputs=inputs)
    trash = parent / f".{destination.name}.old-{os.getpid()}"
    os.replace(destination, trash)
    try:
        os.replace(tmp, destination)
    except BaseException:
        os.replace(trash, destination)
        raise
    _remove(trash)


def prepare_run_dir(root: Path | str, *, force: bool, inputs: Iterable[Path | str] = (),
                    state_file: str = "state.json", resume: bool = False) -> Path:
    """Check an evolution run directory before a run starts; return it resolved.

    The same location rules as `check_destination` apply (never an input, the working
    directory, home or root). A non-empty directory is left alone with `resume`; otherwise
    it is removed only with `force` and only when it holds `state_file` (a pcbmerge run
    wrote it). Anything else is an OutputError and nothing is touched.
    """
    what = "run directory"
    d, shown = _check_location(root, tuple(inputs), what)
    if not os.path.lexists(d):
        return d
    if not d.is_dir():
        raise OutputError(f"{what} {shown} exists and is not a directory")
    if resume or _is_empty_dir(d):
        return d
    if not (d / state_file).is_file():
        raise OutputError(f"{what} {d} is not empty and has no {state_file}: not written by "
                          "pcbmerge; refusing to use it (choose another --run-dir)")
    if not force:
        raise OutputError(f"{what} {d} holds a run; pass --resume to continue it or --force "
                          "to start over")
    try:
        shutil.rmtree(d)
    except OSError as e:
        raise OutputError(f"cannot remove {what} {d}: {e.strerror}") from e
    return d


@contextlib.contextmanager
def output_lock(destination: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `.NAME.lock` beside `destination` for the block.

    flock is released by the kernel when its holder dies, so a lock file left by a killed
    run does not block anyone. Raises OutputError when another process holds it.
    """
    lock_path = destination.parent / f".{destination.name}.lock"
    fd = _take_lock(lock_path, destination)
    try:
        yield lock_path
    finally:
        if fd is not None:
            # unlinked while still held: see the inode check in _take_lock
            with contextlib.suppress(OSError):
                lock_path.unlink()
            os.close(fd)


def _take_lock(lock_path: Path, destination: Path) -> int | None:
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write in {lock_path.parent}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another pcbmerge run is writing {destination}; wait for it to "
                              "finish") from None
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return fd  # a filesystem without flock: go on unlocked, as before locks
            os.close(fd)
            raise
        # a holder unlinks the file before releasing it; a lock won on that unlinked inode
        # would guard nothing while a newcomer locks a fresh file: retry on a mismatch
        try:
            st = os.stat(lock_path)
        except FileNotFoundError:
            os.close(fd)
            continue
        mine = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            with contextlib.suppress(OSError):  # who holds it, for a curious user
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def remove_stale_partials(destination: Path) -> list[Path]:
    """Remove `.NAME.partial-PID` and `.NAME.old-PID` beside `destination` whose run is dead.

    A run killed between its two renames leaves the previous output only as `.old-PID`;
    when `destination` is missing that one is put back, so a killed --force run leaves the
    destination as it was. Call with the destination's lock held. Returns the paths removed
    or restored.
    """
    parent, prefix = destination.parent, f".{destination.name}."
    try:
        names = sorted(os.listdir(parent))  # "old-" sorts before "partial-"
    except OSError:
        return []
    touched: list[Path] = []
    for name in names:
        m = _LEFTOVER.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if m is None or not _leftover_is_stale(int(m[2])):
            continue
        path = parent / name
        if m[1] == "old" and not os.path.lexists(destination) and path.is_dir():
            try:
                os.rename(path, destination)
                touched.append(path)
            except OSError:
                pass  # could not put it back: leave it rather than lose the only copy
            continue
        _remove(path)
        touched.append(path)
    return touched


def _leftover_is_stale(pid: int) -> bool:
    """Whether the run with this PID is gone (its leftovers may go). Unsure means no."""
    if pid <= 0 or sys.platform == "win32":  # os.kill(pid, 0) would terminate on Windows
        return False
    if pid == os.getpid():
        return True  # ours, from an earlier attempt in this process; we hold the lock now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, owned by someone else
        return False
    return False


def _check_location(path: Path | str, inputs: tuple[Path | str, ...],
                    what: str) -> tuple[Path, str]:
    """The rules shared by outputs and run directories; returns (resolved, as shown)."""
    given = Path(path)
    try:
        d = given.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise OutputError(f"cannot resolve {what} {given}: {e}") from None
    absolute = Path(os.path.abspath(given))
    shown = str(d) if absolute == d else f"{absolute} (-> {d})"
    for raw in inputs:
        for form in _input_forms(raw):
            if d == form:
                raise OutputError(f"{what} {shown} is the input {form}; refusing to write "
                                  "over an input")
            if form.is_relative_to(d):
                raise OutputError(f"{what} {shown} contains the input {form}; refusing to "
                                  "replace it")
            if d.is_relative_to(form):
                raise OutputError(f"{what} {shown} lies inside the input {form}; refusing to "
                                  "write into an input")
    if d.parent == d:
        raise OutputError(f"{what} {shown} is the filesystem root; refusing to use it")
    cwd = _cwd()
    if cwd is not None and cwd.is_relative_to(d):
        where = "is the current directory" if cwd == d else f"contains the current directory {cwd}"
        raise OutputError(f"{what} {shown} {where}; refusing to use it")
    home = _home()
    if home is not None and home.is_relative_to(d):
        where = "is your home directory" if home == d else f"contains your home directory {home}"
        raise OutputError(f"{what} {shown} {where}; refusing to use it")
    return d, shown


def _input_forms(raw: Path | str) -> list[Path]:
    """An input resolved and, when a symlink leads there, also as written: the folder that
    holds a link to a model is as much 'the folder holding the inputs'."""
    absolute = Path(os.path.abspath(raw))
    try:
        real = Path(raw).resolve()
    except (OSError, RuntimeError):
        return [absolute]
    return [real] if real == absolute else [real, absolute]


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the working directory was deleted
        return None


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (OSError, RuntimeError, KeyError):  # no HOME and no passwd entry
        return None


def _is_empty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():  # rmtree never follows a link out of here
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- single files


def write_safetensors(path: Path, layout: list[OutputTensor],
                      tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None, *, durable: bool = False,
                      reuse: Path | None = None) -> int:
    """Stream `tensors` (in layout order) into one file, via a temporary name and a rename.

    A member file is complete or absent after any kill. `durable` adds an fsync (for the
    final output); members skip it: a killed process loses nothing already written, and
    after an OS crash a short member file fails its header check on resume.

    `reuse` names a dead member file (a spare) to write over in place: its blocks and cached
    pages are already there, and overwriting them costs a small part of filling a new file
    (measured 11 ms against 270 ms for 120 MB). It is renamed to the temporary name first,
    so a kill mid-write leaves garbage, never a half-new member.

    Returns the CRC-32 of the file's bytes: the run state records it, so that a resume can
    tell a member that never fully reached the disk (an operating-system crash after an
    in-place write leaves the spare's old blocks, at the right length) from a sound one.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    entries = [(s.name, s.dtype, s.shape) for s in layout]
    mode = "wb"
    if reuse is not None:
        try:
            os.replace(reuse, tmp)
            mode = "r+b"
        except FileNotFoundError:
            pass
    try:
        with disk_errors(path.parent, "the run state"), open(tmp, mode) as f:
            header = encode_header(entries, {"format": "pt", **(metadata or {})})
            f.write(header)
            crc = crc32(header)
            expected = iter(layout)
            for name, t in tensors:
                spec = next(expected)
                if name != spec.name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                    raise RuntimeError(f"writer expected {spec.name} {spec.shape} {spec.dtype}, "
                                       f"got {name} {tuple(t.shape)} {t.dtype}")
                data = tensor_bytes(t)
                f.write(data)
                crc = crc32(data, crc)
            if next(expected, None) is not None:
                raise RuntimeError("writer closed before every tensor was written")
            f.truncate()
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return crc


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 16 MB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = crc32(block, crc)
    return crc
