"""`linear`: Σ wᵢθᵢ / Σ wᵢ (`normalize: false` drops the division)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.methods.base import WEIGHT, MergeMethod, ParamSpec, TensorInputs


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 normalize: bool = True) -> torch.Tensor:
    """Σ wᵢθᵢ (/ Σ wᵢ), accumulated as mergekit does for identical rounding: one fused
    multiply-add per model into float32 (float64 for float64 inputs)."""
    dtype = tensors[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weights), dtype=acc, device=tensors[0].device)
    out = torch.zeros(tensors[0].shape, dtype=acc, device=tensors[0].device)
    for tensor, weight in zip(tensors, w, strict=True):
        out.addcmul_(tensor, weight)
    if normalize:
        out.div_(w.sum())
    return out.to(dtype)


class Linear(MergeMethod):
    name = "linear"
    summary = "weighted average of the models' parameters"
    requires_base = False
    params = (
        WEIGHT,
        ParamSpec("normalize", True, "divide by the sum of the weights", kind=bool),
    )

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        weights = [p["weight"] for p in inputs.model_params]
        if inputs.params["normalize"] and abs(sum(weights)) < 1e-12:
            from mergekit_pcb.errors import RecipeError

            raise RecipeError(f"linear: the weights for tensor '{inputs.name}' sum to zero")
        return linear_merge(inputs.models, weights, inputs.params["normalize"])
