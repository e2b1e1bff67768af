"""The method registry: name -> MergeMethod class."""

from __future__ import annotations

from mergekit_pcb.errors import unknown_method
from mergekit_pcb.methods.arcee_fusion import ArceeFusion
from mergekit_pcb.methods.base import MergeMethod, ParamSpec, TensorInputs
from mergekit_pcb.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from mergekit_pcb.methods.cart import Cart
from mergekit_pcb.methods.dare import DareLinear, DareTies
from mergekit_pcb.methods.della import Della, DellaLinear
from mergekit_pcb.methods.iso_c import IsoC
from mergekit_pcb.methods.iso_cts import IsoCts
from mergekit_pcb.methods.karcher import Karcher
from mergekit_pcb.methods.knots import Knots
from mergekit_pcb.methods.linear import Linear
from mergekit_pcb.methods.model_stock import ModelStock
from mergekit_pcb.methods.multislerp import Multislerp
from mergekit_pcb.methods.nearswap import Nearswap
from mergekit_pcb.methods.nuslerp import Nuslerp
from mergekit_pcb.methods.passthrough import Passthrough
from mergekit_pcb.methods.pcb import Pcb
from mergekit_pcb.methods.ram import Ram, RamPlusTl
from mergekit_pcb.methods.sce import Sce
from mergekit_pcb.methods.slerp import Slerp
from mergekit_pcb.methods.task_arithmetic import TaskArithmetic
from mergekit_pcb.methods.ties import Ties
from mergekit_pcb.methods.tsv_m import TsvM
from mergekit_pcb.methods.wudi import Wudi

REGISTRY: dict[str, type[MergeMethod]] = {
    m.name: m for m in (
        Pcb, Linear, TaskArithmetic, Ties, DareLinear, DareTies,
        # the rest of mergekit 0.1.5's methods, each with mergekit's parameter names
        Slerp, Passthrough, Breadcrumbs, BreadcrumbsTies, Della, DellaLinear, ModelStock,
        Sce, Nearswap, Multislerp, Karcher, Nuslerp, ArceeFusion, Ram, RamPlusTl,
        # spectral merges, per matrix through singular values and vectors (methods.spectral)
        TsvM, IsoC, IsoCts, Cart, Wudi,
        # LoRA adapters merged in the basis their updates share (also any checkpoints)
        Knots,
    )
}


def get_method(name: str, where: str = "merge_method") -> MergeMethod:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise unknown_method(where, name, REGISTRY) from None


__all__ = ["REGISTRY", "MergeMethod", "ParamSpec", "TensorInputs", "get_method"]
