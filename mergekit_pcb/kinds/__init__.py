"""The registry of recipe kinds: `merge_method` -> its kind (merge, search), each with its
schema, plan and runner. A new kind is one module here and one entry in `KINDS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_pcb.errors import RecipeError, unknown_method
from mergekit_pcb.kinds.base import COMMON_FLAGS, MethodInfo, RecipeKind, RunOptions
from mergekit_pcb.kinds.coefsearch import CoefficientSearchKind
from mergekit_pcb.kinds.merge import MergeKind
from mergekit_pcb.kinds.reprogram import ReprogramKind
from mergekit_pcb.kinds.search import SearchKind

KINDS: dict[str, RecipeKind] = {k.name: k for k in (MergeKind(), SearchKind(),
                                                    CoefficientSearchKind(), ReprogramKind())}


def all_methods() -> list[MethodInfo]:
    return [m for kind in KINDS.values() for m in kind.methods()]


def kind_of(data: Any, source: Path) -> tuple[RecipeKind, str]:
    """The kind serving a parsed recipe, and its `merge_method`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys to values")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise RecipeError(f"{source}: missing required key 'merge_method'" if method is None
                          else f"{source}: 'merge_method': must be a string")
    for kind in KINDS.values():
        if any(m.name == method for m in kind.methods()):
            return kind, method
    raise unknown_method(f"{source}: merge_method", method, (m.name for m in all_methods()))


__all__ = ["COMMON_FLAGS", "KINDS", "MethodInfo", "RecipeKind", "RunOptions", "all_methods",
           "kind_of"]
