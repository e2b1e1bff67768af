"""`multislerp`: barycentric interpolation of several models on a hypersphere (mergekit 0.1.5).

Each task vector τᵢ = θᵢ − θ₀ (flattened) is projected to the unit sphere; the weighted
mean direction is the tangent point; the weighted tangent vectors are mapped back with the
exponential map and scaled by the weighted mean norm; the base is added back. Weights are
normalized to sum 1 unless `normalize_weights: false`. One model returns that model.

Plan mapping: the base is optional, as in mergekit (`optional_base`): with a base it
interpolates task vectors, without one the models themselves. As in mergekit, when the
weighted mean direction vanishes (antipodal inputs) two models fall back to linear
interpolation and more are an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.errors import CheckpointError, RecipeError
from mergekit_pcb.methods.base import WEIGHT, MergeMethod, ParamSpec, Range, TensorInputs

EPS = ParamSpec("eps", 1e-8, "added to norms before dividing by them", bounds=Range(0.0, 1.0))


def multislerp(models: Sequence[torch.Tensor], weights: Sequence[float],
               base: torch.Tensor | None, normalize_weights: bool = True,
               eps: float = 1e-8, name: str = "") -> torch.Tensor:
    if len(models) == 1:
        return models[0]
    tensors = torch.stack(list(models), dim=0)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    w = torch.tensor(list(weights), dtype=tensors.dtype, device=tensors.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] != 2:
            raise CheckpointError(
                f"tensor '{name}': multislerp's weighted mean direction is zero (antipodal "
                "task vectors whose weights cancel); change the weights")
        res = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
        return res + base if base is not None else res
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * w).sum()
    result = result.view(tensors.shape[1:])
    return result + base if base is not None else result


class Multislerp(MergeMethod):
    name = "multislerp"
    summary = "weighted spherical interpolation of several task vectors (or models)"
    optional_base = True
    params = (WEIGHT,
              ParamSpec("normalize_weights", True, "divide the weights by their sum",
                        kind=bool),
              EPS)

    @classmethod
    def check_params(cls, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                     tensor: str) -> None:
        # Dividing by a zero weight sum would give NaN everywhere (mergekit does).
        if params["normalize_weights"] and len(model_params) > 1 \
                and sum(p["weight"] for p in model_params) == 0:
            raise RecipeError(f"multislerp: the weights for tensor '{tensor}' sum to zero, and "
                              "normalize_weights: true divides by their sum")

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        return multislerp(inputs.models, [p["weight"] for p in inputs.model_params],
                          inputs.base, bool(inputs.params["normalize_weights"]),
                          float(inputs.params["eps"]), inputs.name)
