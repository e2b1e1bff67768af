"""`sce`: Select, Calculate, Erase (FuseChat 2.0, Wan et al., 2024), as mergekit 0.1.5.

Per tensor, over the task vectors τᵢ = θᵢ − θ₀:
1. select: with `select_topk` < 1, keep the ⌊select_topk · #(var ≠ 0)⌋ entries of largest
   variance across the models (`torch.topk`, as mergekit), zero the rest in every τᵢ;
2. calculate: model weight ∝ mean(τᵢ²) (uniform when the total is below 1e-6);
3. erase: TIES's sign election; the result is θ₀ + Σᵢ wᵢ·mᵢ·τᵢ / max(Σᵢ wᵢ·mᵢ, 1e-6).
Deterministic; no per-model weights and no λ (mergekit has none). `requires_base`: the base
is held apart, every other recipe model is a task.
"""

from __future__ import annotations

import torch

from mergekit_pcb.methods.base import MergeMethod, ParamSpec, Range, TensorInputs
from mergekit_pcb.methods.ties import INT8_MASK


def sce_select_mask(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 where the variance across models ranks in the top `fraction` of its nonzeros."""
    if fraction <= 0:
        return torch.zeros_like(tvs[0])
    if fraction >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask


def sce_weights(tvs: torch.Tensor) -> torch.Tensor:
    energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()  # a Python float, as mergekit divides by it
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce_merge(base: torch.Tensor, models: list[torch.Tensor],
              select_topk: float = 1.0) -> torch.Tensor:
    tvs = torch.stack([m - base for m in models], dim=0)
    if select_topk < 1:
        tvs = tvs * sce_select_mask(tvs, select_topk).unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = tvs.sign() == majority
    weights = sce_weights(tvs)
    while weights.dim() < tvs.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


class Sce(MergeMethod):
    name = "sce"
    summary = "SCE: select high-variance entries, weight tasks by energy, erase by sign"
    params = (ParamSpec("select_topk", 1.0, "fraction of the entries with nonzero variance "
                        "across models kept (1 keeps all)", bounds=Range(0.0, 1.0)),
              INT8_MASK)

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return sce_merge(inputs.base, list(inputs.models), float(inputs.params["select_topk"]))
