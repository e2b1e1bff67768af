"""Code a recipe names (`package.module:attr`), imported only with the user's consent.

A recipe is data; the code it names is not. Like transformers' `trust_remote_code`, nothing
is imported (import-time code included) unless the user passes `--trust-code`. Keyword
arguments handed to that code must be plain data.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mergekit_pcb.errors import RecipeError

TRUST_FLAG = "--trust-code"
# Plain-data limits for arguments given to recipe code: no object graph from YAML aliases
# grows past these, whatever the recipe holds.
MAX_KWARGS_ITEMS = 10_000
MAX_KWARGS_DEPTH = 20


def require_consent(refs: Iterable[tuple[str, str]], trusted: bool) -> None:
    """Refuse, naming the key and the module, if code is named and not trusted.

    `refs` holds (recipe key, 'package.module:attr') pairs; call before anything is
    imported or run.
    """
    if trusted:
        return
    for key, ref in refs:
        module = ref.partition(":")[0]
        raise RecipeError(f"{key}: '{ref}' is code (module '{module}'), and recipe code runs "
                          f"only with consent; pass {TRUST_FLAG} if you trust it")


def check_plain_data(value: Any, key: str) -> None:
    """`value` is JSON-like data (str, finite numbers, bools, None, lists, str-keyed maps)
    of bounded size and depth."""
    count = 0

    def walk(v: Any, depth: int, where: str) -> None:
        nonlocal count
        count += 1
        if count > MAX_KWARGS_ITEMS:
            raise RecipeError(f"{key}: more than {MAX_KWARGS_ITEMS} values")
        if depth > MAX_KWARGS_DEPTH:
            raise RecipeError(f"{where}: nested deeper than {MAX_KWARGS_DEPTH} levels")
        if v is None or isinstance(v, (bool, int, str)):
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                raise RecipeError(f"{where}: must be a finite number, got {v}")
            return
        if isinstance(v, list):
            for i, item in enumerate(v):
                walk(item, depth + 1, f"{where}[{i}]")
            return
        if isinstance(v, Mapping):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise RecipeError(f"{where}: keys must be strings, got {k!r}")
                walk(item, depth + 1, f"{where}.{k}")
            return
        raise RecipeError(f"{where}: must be plain data, got {type(v).__name__}")

    walk(value, 0, key)


def _importable(root: Path) -> None:
    for entry in (str(root), str(Path.cwd())):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def import_object(ref: str, root: Path, key: str) -> Any:
    """`package.module:attr`, with the recipe's directory importable. The caller has checked
    consent (`require_consent`)."""
    module_name, _, attr = ref.partition(":")
    _importable(root)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RecipeError(f"{key}: cannot import module '{module_name}' ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{key}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"{key}: '{ref}' is not callable")
    return obj


def code_digest(ref: str, root: Path) -> str | None:
    """SHA-256 of the source file of the module `ref` names, located the way an import
    would find it but without running anything; None when there is no such file."""
    parts = ref.partition(":")[0].split(".")
    search: list[str] | None = [str(root), str(Path.cwd()), *sys.path]
    spec = None
    for i in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), search)
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return None
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


__all__ = ["TRUST_FLAG", "check_plain_data", "code_digest", "import_object", "require_consent"]
