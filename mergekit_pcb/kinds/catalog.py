"""Every kind's methods as `pcbmerge methods` lists them, without importing torch.

The listing is data declared in the methods' and searches' modules, and those import torch
(about two seconds before the first line is printed). So the listing is kept on disk, in
the user's cache directory, under a key made from this package's source files (each
path, size and modification time) and the Python and pydantic versions: a changed, added
or removed module gives another key, so a listing read back is the one the code would
build. On a miss (the first run after an install or an edit) it is built from the registries (torch
imported, as before) and written; when torch is loaded anyway, it is built and nothing is
written. A new method or kind needs nothing here: it is listed from its registry entry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import mergekit_pcb
from mergekit_pcb.kinds.base import MethodInfo

PACKAGE = Path(mergekit_pcb.__file__).parent


def cache_dir() -> Path:
    """Where the listing is kept: `$XDG_CACHE_HOME/mergekit_pcb` (default ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mergekit_pcb"


def source_key() -> str:
    """A digest of the package's source files (path, size, mtime), Python's version and
    pydantic's (the searches' parameters are listed from pydantic schemas): what the
    listing is built from (a stat of each file, about a millisecond in all)."""
    try:
        pydantic = importlib.metadata.version("pydantic")
    except importlib.metadata.PackageNotFoundError:
        pydantic = "?"
    h = hashlib.sha256(f"{mergekit_pcb.__version__}\0{sys.version}\0{pydantic}".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        st = path.stat()
        h.update(f"\0{path.relative_to(PACKAGE)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _build() -> list[MethodInfo]:
    from mergekit_pcb.kinds import all_methods

    return all_methods()


def _read(path: Path) -> list[MethodInfo] | None:
    try:
        rows = json.loads(path.read_text())
        return [MethodInfo(**row) for row in rows]
    except (OSError, ValueError, TypeError):
        return None  # absent, or written by something else: build it again


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole then renamed: a concurrent `pcbmerge methods` reads all or nothing
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".methods-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        # one listing per source state: those of earlier states will not be read again
        for old in path.parent.glob("methods-*.json"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only or full home: list without keeping it, as before the cache


def listing() -> list[MethodInfo]:
    """Every method of every recipe kind, in `kinds.all_methods()`'s order and values."""
    if "torch" in sys.modules:  # the registries cost nothing more: no file to keep
        return _build()
    path = cache_dir() / f"methods-{source_key()}.json"
    cached = _read(path)
    if cached is not None:
        return cached
    infos = _build()
    rows = [asdict(m) for m in infos]
    text = json.dumps(rows)
    # a default the JSON cannot hold as it is (a tuple) would read back otherwise: keep
    # only a listing that reads back equal
    if json.loads(text) == rows:
        _write(path, text)
    return infos
