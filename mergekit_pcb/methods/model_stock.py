"""`model_stock`: Model Stock (Jang et al., 2024), as mergekit 0.1.5 computes it.

With offsets τᵢ = θᵢ − θ₀, cos θ is the mean over model pairs of cos(τᵢ, τⱼ) (norm product
floored at 1e-6, clamped to [−1, 1]); t = k·cos θ / (1 + (k − 1)·cos θ) for k models, and
the result is t·mean(θᵢ) + (1 − t)·θ₀. Per tensor (`filter_wise: false`, the default) or
per row along the last axis (`filter_wise: true`). Where 1 + (k − 1)·cos θ is within 1e-6
of zero, t = 0 (the base), as mergekit does. Everything is in the inputs' dtype; the norms
and dot products are sums whose bits depend on torch's thread count, so the engine runs this
method with mergekit's (its process's) count (`thread_count_reductions`).

Plan mapping: mergekit's model_stock needs the base among its inputs (`base_model`,
listed under `models:` or not) plus at least two more; here `requires_base` gives exactly
that: `inputs.base` is θ₀ and `inputs.models` the others, in recipe order. Fewer than two
models besides the base is a recipe error, as in mergekit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods.base import MergeMethod, ParamSpec, TensorInputs


def model_stock(base: torch.Tensor, models: Sequence[torch.Tensor],
                filter_wise: bool = False) -> torch.Tensor:
    out_shape = base.shape
    w0, ws = base, list(models)
    if filter_wise:
        if w0.dim() == 1:
            w0 = w0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(denominator),
                                            denominator))
    average = sum(ws) / k  # Python's sum, 0 + w₁ + …: mergekit's order of additions
    return (t * average + (1 - t) * w0).reshape(out_shape)


class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "Model Stock: move from the base towards the models' mean by their angle"
    thread_count_reductions = True  # the offsets' norms and dot products
    params = (ParamSpec("filter_wise", False, "one ratio per row (last axis) instead of per "
                        "tensor", kind=bool),)

    @classmethod
    def check_params(cls, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                     tensor: str) -> None:
        if len(model_params) < 2:
            raise RecipeError(f"models: model_stock needs at least two models besides the base "
                              f"(got {len(model_params)})")

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return model_stock(inputs.base, inputs.models, bool(inputs.params["filter_wise"]))
