"""`slerp`: spherical linear interpolation from the base (t = 0) to the other model (t = 1).

As mergekit 0.1.5: each tensor is flattened; the angle comes from the dot product of the
two unit vectors (norms ≤ 1e-8 count as 1); where |cos θ| > `DOT_THRESHOLD` the two are
nearly collinear and plain linear interpolation is used. Work is in float32 (float64 for
float64 inputs), in chunks of 2²⁰ entries, with the same reductions as mergekit (norms of
per-chunk norms, sums of per-chunk dot products), so results are bit-identical, given
mergekit's thread count: past 32,768 entries torch sums in one partial sum per thread, and
mergekit sums with all of its process's threads, so the engine does too
(`thread_count_reductions`). The result is stored in the inputs' dtype, as mergekit's is.

Plan mapping: mergekit's slerp takes exactly two inputs, one of them `base_model`. Here
`requires_base` holds the base apart (`inputs.base` = v0) and `inputs.models` holds the
other (v1), whether or not the recipe also lists the base under `models:`.
Where mergekit refuses, two extensions (documented, not mergekit): more than one model
besides the base interpolates towards their uniform mean, and `t` defaults to 0.5 (mergekit
requires it) so that every method runs with its defaults.
"""

from __future__ import annotations

import torch

from mergekit_pcb.methods.base import WEIGHT_RANGE, MergeMethod, ParamSpec, TensorInputs
from mergekit_pcb.methods.ops import uniform_mean

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
CHUNK = 1 << 20  # mergekit's _CHUNK_ELEMENTS: chunking changes the reductions' rounding

T = ParamSpec("t", 0.5, "interpolation factor: 0 is the base, 1 the other model (a list is a "
              "gradient over the layers)", bounds=WEIGHT_RANGE)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor,
          dot_threshold: float = DOT_THRESHOLD, eps: float = NORM_EPS) -> torch.Tensor:
    """SLERP of two same-shape tensors, as a single flattened vector (mergekit's kernel,
    with a batch of one)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    # mergekit packs t as a float32 (float64) tensor: its rounding is part of the result.
    tt = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    if a.shape[1] == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    spans = [(s, s + CHUNK) for s in range(0, a.shape[1], CHUNK)]
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in spans]),
        dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in spans]),
        dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    # Unit vectors before the product: the raw dot could overflow.
    dot = torch.stack([((a[:, s:e].to(dtype) / norm_a) * (b[:, s:e].to(dtype) / norm_b))
                       .sum(dim=1, keepdim=True) for s, e in spans]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s, e in spans:
        out[:, s:e] = coef_a * a[:, s:e].to(dtype) + coef_b * b[:, s:e].to(dtype)
    return out.reshape(v0.shape)


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation between the base and one other model"
    params = (T,)
    pairwise = True
    thread_count_reductions = True  # the norms and the dot product

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return slerp(float(inputs.params["t"]), inputs.base, uniform_mean(inputs.models))
