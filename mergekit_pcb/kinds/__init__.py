"""The registry of recipe kinds: `merge_method` -> its kind (merge, search), each with its
schema, plan and runner. A new kind is one module here and one entry in `KINDS`.

The kinds' modules import torch (seconds), so they are imported when `KINDS` is first read,
not with this package: `pcbmerge methods` lists them from `kinds.catalog` without them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from mergekit_pcb.errors import RecipeError, unknown_method
from mergekit_pcb.kinds.base import COMMON_FLAGS, MethodInfo, RecipeKind, RunOptions


@functools.cache
def kinds() -> dict[str, RecipeKind]:
    """`KINDS`: name -> kind, in the order `pcbmerge methods` lists them."""
    from mergekit_pcb.kinds.coefsearch import CoefficientSearchKind
    from mergekit_pcb.kinds.merge import MergeKind
    from mergekit_pcb.kinds.reprogram import ReprogramKind
    from mergekit_pcb.kinds.search import SearchKind

    return {k.name: k for k in (MergeKind(), SearchKind(), CoefficientSearchKind(),
                                ReprogramKind())}


def __getattr__(name: str) -> Any:
    """`KINDS`, imported on first use and kept (PEP 562)."""
    if name == "KINDS":
        return kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def all_methods() -> list[MethodInfo]:
    return [m for kind in kinds().values() for m in kind.methods()]


def kind_of(data: Any, source: Path) -> tuple[RecipeKind, str]:
    """The kind serving a parsed recipe, and its `merge_method`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys to values")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise RecipeError(f"{source}: missing required key 'merge_method'" if method is None
                          else f"{source}: 'merge_method': must be a string")
    for kind in kinds().values():
        if any(m.name == method for m in kind.methods()):
            return kind, method
    raise unknown_method(f"{source}: merge_method", method, (m.name for m in all_methods()))


__all__ = ["COMMON_FLAGS", "KINDS", "MethodInfo", "RecipeKind", "RunOptions", "all_methods",
           "kind_of", "kinds"]
