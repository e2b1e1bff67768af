"""`arcee_fusion`: take the other model's entries where they matter most (mergekit 0.1.5).

importance = |θ₁ − θ₀| · KL(softmax(θ₁) ‖ softmax(θ₀)) (softmax and KL along the last
axis, 1e-8 added to both distributions); entries with importance ≥ median + 1.5·IQR take
θ₁'s value, the others keep θ₀'s. The quartiles are the order statistics at ⌊q·(n − 1)⌋,
as mergekit indexes its sorted copy. Tensors over 10⁶ entries estimate them from 10⁶
entries drawn with replacement, as mergekit does; the draws come from the engine's seeded
generator (mergekit uses torch's global one), so only smaller tensors match it bit for bit.
The mask is float32, so float16 and bfloat16 inputs give a float32 result, written as
float32 unless the recipe sets `out_dtype` (as mergekit writes it).

Plan mapping: the base is held apart (`requires_base`, θ₀) and the other model is θ₁.
Extension (not mergekit, which takes exactly one other model): several use their uniform
mean as θ₁.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergekit_pcb.methods.base import MergeMethod, TensorInputs
from mergekit_pcb.methods.ops import uniform_mean

SAMPLE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartiles(values: torch.Tensor, generator: torch.Generator | None) -> list[torch.Tensor]:
    flat = values.reshape(-1)
    if flat.numel() > SAMPLE:
        assert generator is not None
        picks = torch.randint(flat.numel(), (SAMPLE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    # mergekit's indices: a float32 q times (n − 1), truncated
    idx = (torch.tensor(QUANTILES) * (flat.numel() - 1)).long().tolist()
    # kthvalue is the sorted copy's entry at that index, without sorting everything
    return [torch.kthvalue(flat, i + 1).values for i in idx]


def arcee_fusion(base: torch.Tensor, model: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    scores = importance(model, base)
    q1, median, q3 = quartiles(scores, generator)
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "take the other model's entries whose importance is an upper outlier"
    pairwise = True
    uses_rng = True  # only tensors over 10⁶ entries draw (the quartile sample)
    thread_count_reductions = True  # the softmax and KL sums along rows
    # The mask is float32 (mergekit's `.float()`): float16 and bfloat16 inputs give a
    # float32 result, which mergekit writes as float32 unless `out_dtype` is set.
    float32_result = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        g = inputs.generators[0] if inputs.generators else None
        return arcee_fusion(inputs.base, uniform_mean(inputs.models), g)
