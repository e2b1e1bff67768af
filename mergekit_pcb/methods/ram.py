"""`ram` and `ramplus_tl`: Reinforced Agent Merging (mergekit 0.1.5).

Per entry, a model contributes where |τᵢ| > `epsilon`. Entries only one model changes take
its τ whole; entries several change take their mean: θ₀ + Σᵢ (τᵢ·uniqueᵢ + τᵢ·sharedᵢ/cᵢ).
`ramplus_tl` scales each model's unique entries by 1 + r·clamp(ρᵢ, 0, alpha), with ρᵢ its
count of shared over unique entries in this tensor (ρ divides by max(unique, epsilon):
epsilon 0 gives 0/0 for a model that changes nothing, a NaN the engine reports, where
mergekit writes it). Deterministic; `requires_base`.
`ram` is elementwise (the engine may stream it in slices); `ramplus_tl`'s ρ is per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.methods.base import WEIGHT_RANGE, MergeMethod, ParamSpec, TensorInputs
from mergekit_pcb.methods.della import EPSILON_RANGE


def _ram_vectors(base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    tv = torch.stack([m - base for m in models], dim=0).view(len(models), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


def ram_merge(base: torch.Tensor, models: Sequence[torch.Tensor],
              epsilon: float = 1e-5) -> torch.Tensor:
    tv, nonzero, counts, shared, unique = _ram_vectors(base, models, epsilon)
    tv_z = tv * nonzero
    merged = ((tv_z * unique) + (tv_z * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl_merge(base: torch.Tensor, models: Sequence[torch.Tensor], r: float = 0.1,
                     alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    tv, nonzero, counts, shared, unique = _ram_vectors(base, models, epsilon)
    shared_counts = (nonzero & shared).sum(dim=1)
    unique_counts = (nonzero & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    tv_z = tv * nonzero
    merged = ((tv_z * unique * boost.unsqueeze(-1))
              + (tv_z * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


# Same range as DELLA's `epsilon` (one rule per parameter name); here a magnitude floor.
EPSILON_RAM = ParamSpec("epsilon", 1e-5, "|τ| above which a model counts as changing an "
                        "entry", bounds=EPSILON_RANGE)


class Ram(MergeMethod):
    name = "ram"
    summary = "RAM: unique task-vector entries whole, shared ones averaged"
    params = (EPSILON_RAM,)

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return ram_merge(inputs.base, inputs.models, float(inputs.params["epsilon"]))


class RamPlusTl(MergeMethod):
    name = "ramplus_tl"
    summary = "RAM+ (tensor-local): RAM with unique entries boosted by the overlap ratio"
    params = (ParamSpec("r", 0.1, "strength of the unique-entry boost", bounds=WEIGHT_RANGE),
              ParamSpec("alpha", 0.2, "cap on the overlap ratio in the boost",
                        bounds=WEIGHT_RANGE),
              EPSILON_RAM)
    float32_result = True  # the overlap ratio is float32 (counts divided), as in mergekit

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        p = inputs.params
        return ramplus_tl_merge(inputs.base, inputs.models, float(p["r"]), float(p["alpha"]),
                                float(p["epsilon"]))
