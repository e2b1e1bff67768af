"""The method registry: name -> MergeMethod class."""

from __future__ import annotations

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods.base import MergeMethod, ParamSpec, TensorInputs
from mergekit_pcb.methods.dare import DareLinear, DareTies
from mergekit_pcb.methods.linear import Linear
from mergekit_pcb.methods.pcb import Pcb
from mergekit_pcb.methods.task_arithmetic import TaskArithmetic
from mergekit_pcb.methods.ties import Ties

REGISTRY: dict[str, type[MergeMethod]] = {
    m.name: m for m in (Pcb, Linear, TaskArithmetic, Ties, DareLinear, DareTies)
}


def get_method(name: str, where: str = "merge_method") -> MergeMethod:
    try:
        return REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise RecipeError(f"{where}: unknown method '{name}' (known: {known})") from None


__all__ = ["REGISTRY", "MergeMethod", "ParamSpec", "TensorInputs", "get_method"]
