"""`nuslerp`: weighted SLERP of two task vectors (mergekit 0.1.5).

t = w₂/(w₁ + w₂) (0.5 when the weights sum to within 1e-6 of zero); the result is
θ₀ + slerp(t, τ₁, τ₂) over the flattened tensors (`nuslerp_flatten: true`, the default),
or row by row along the last axis, or along the first axis with `nuslerp_row_wise`
(and `nuslerp_flatten: false`). Nearly collinear rows (1 − cos² ≤ 1e-16) interpolate
linearly.

Plan mapping: the base is optional, as in mergekit (`optional_base`): without one the
models themselves are interpolated. mergekit takes exactly two models
besides the base; extension (not mergekit): k models fold left to right,
r ← nuslerp(wᵢ/(W + wᵢ), r, τᵢ) with W the weight folded so far (which is the two-model
rule for k = 2, and returns the model itself for k = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_pcb.methods.base import WEIGHT, MergeMethod, ParamSpec, TensorInputs


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1,
            eps: float = 1e-8, flatten: bool = False) -> torch.Tensor:
    out_shape = v0.shape

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # finite on the unused branch
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def pair_t(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp_merge(base: torch.Tensor | None, models: Sequence[torch.Tensor],
                  weights: Sequence[float], row_wise: bool = False, flatten: bool = True
                  ) -> torch.Tensor:
    """The fold of `models` (their task vectors when a base is given)."""
    dim = 0 if row_wise else -1
    if base is None:
        result = models[0]
        for m, w, folded in zip(models[1:], weights[1:], _folded(weights), strict=True):
            result = nuslerp(pair_t(folded, w), result, m, dim=dim, flatten=flatten)
        return result
    result = models[0] - base
    if len(models) == 1:
        return base + result
    for m, w, folded in zip(models[1:], weights[1:], _folded(weights), strict=True):
        result = nuslerp(pair_t(folded, w), result, m - base, dim=dim, flatten=flatten)
    return base + result


def _folded(weights: Sequence[float]) -> list[float]:
    """The weight folded before each model after the first."""
    out, total = [], weights[0]
    for w in weights[1:]:
        out.append(total)
        total += w
    return out


class Nuslerp(MergeMethod):
    name = "nuslerp"
    summary = "weighted spherical interpolation of two task vectors (or models)"
    optional_base = True
    params = (WEIGHT,
              ParamSpec("nuslerp_row_wise", False, "interpolate along the first axis (with "
                        "nuslerp_flatten: false)", kind=bool),
              ParamSpec("nuslerp_flatten", True, "interpolate the whole tensor as one vector",
                        kind=bool))

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        return nuslerp_merge(inputs.base, inputs.models,
                             [p["weight"] for p in inputs.model_params],
                             bool(inputs.params["nuslerp_row_wise"]),
                             bool(inputs.params["nuslerp_flatten"]))
