"""`karcher`: the Karcher (Riemannian) mean of the models on the unit sphere (mergekit 0.1.5).

The models' directions are averaged by fixed-point iteration on the sphere (at most
`max_iter` steps, stopping when the tangent step's norm is below `tol`; models with norm
≤ `tol` are left out of the direction), then scaled by the mean of the models' norms.
Equal weights, as mergekit. Norms are taken in float32 (float64 for float64 inputs).

Plan mapping: `requires_base` is false, every recipe model is a point, in recipe order.
mergekit's karcher ignores the base's role but its recipe normalisation adds a
`base_model` that is not under `models:` as one more point; here such a base is not
read. List it under `models:` to include it (then both tools agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_pcb.methods.base import MergeMethod, ParamSpec, Range, TensorInputs


def karcher_mean(tensors: Sequence[torch.Tensor], alphas: Sequence[float],
                 max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = []
    units = []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0
                     else (tensor / norm).to(tensor.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)  # type: ignore[return-value]
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean
                + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean  # type: ignore[return-value]


class Karcher(MergeMethod):
    name = "karcher"
    summary = "Karcher mean of the models on the sphere, scaled by their mean norm"
    requires_base = False
    thread_count_reductions = True  # the norms and torch.dot over the whole tensor
    params = (ParamSpec("max_iter", 10, "most fixed-point iterations", kind=int,
                        bounds=Range(0, 10_000)),
              ParamSpec("tol", 1e-5, "stop when the step's norm is below this; models with a "
                        "norm at most this are left out of the direction",
                        bounds=Range(0.0, 1.0)))

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        n = len(inputs.models)
        return karcher_mean(inputs.models, [1.0 / n] * n, int(inputs.params["max_iter"]),
                            float(inputs.params["tol"]))
