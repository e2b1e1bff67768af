"""`linear`: Σ wᵢθᵢ / Σ wᵢ (`normalize: false` drops the division)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods.base import WEIGHT, WEIGHT_RANGE, MergeMethod, ParamSpec, TensorInputs


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

    @classmethod
    def check_params(cls, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                     tensor: str) -> None:
        """With `normalize`, each weight is divided by their sum: that sum must not cancel to
        (nearly) zero, i.e. every wᵢ/Σw stays inside the weight range. The sum is taken as
        `linear_merge` takes it (float32, or float64 for float64 inputs), so check both."""
        if not params["normalize"] or not model_params:
            return
        weights = [p["weight"] for p in model_params]
        sums = (float(torch.tensor(weights, dtype=torch.float32).sum()), math.fsum(weights))
        smallest = min(abs(s) for s in sums)
        if smallest == 0 or max(abs(w) for w in weights) / smallest > WEIGHT_RANGE.high:
            raise RecipeError(
                f"linear: the weights for tensor '{tensor}' sum to zero or nearly "
                f"({sums[1]:g}), and normalize: true divides by their sum"
            )

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        weights = [p["weight"] for p in inputs.model_params]
        self.check_params(inputs.params, inputs.model_params, inputs.name)
        return linear_merge(inputs.models, weights, inputs.params["normalize"])
