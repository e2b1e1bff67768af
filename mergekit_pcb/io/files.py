"""Small files every engine reads or writes: data files named by a recipe, JSON state
written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mergekit_pcb.errors import UserError


def resolve_data_file(ref: str, root: Path, key: str) -> Path:
    """A data path: absolute, else relative to the recipe's directory, else to the cwd."""
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else [root / p, Path.cwd() / p]
    for c in candidates:
        try:
            if c.is_file():
                return c
        except OSError:  # a name too long for the file system, say
            continue
    raise UserError(f"{key}: data file not found: {ref} (looked in "
                    f"{', '.join(str(c.parent) for c in candidates)})")


def atomic_write_json(path: Path, data: Any, *, durable: bool = False) -> None:
    """Write temp + os.replace: after a kill, the old file or the new one, never a mix.

    `durable` also fsyncs the file and its directory.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["atomic_write_json", "resolve_data_file"]
