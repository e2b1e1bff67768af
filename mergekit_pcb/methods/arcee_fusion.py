"""`arcee_fusion`: take the other model's entries where they matter most (mergekit 0.1.5).

importance = |θ₁ − θ₀| · KL(softmax(θ₁) ‖ softmax(θ₀)) (softmax and KL along the last
axis, 1e-8 added to both distributions); entries with importance ≥ median + 1.5·IQR take
θ₁'s value, the others keep θ₀'s. The quartiles are the order statistics at
⌊float32(q)·(n − 1)⌋ (the product rounded to float32, as mergekit indexes its sorted copy and
as `torch.quantile(..., interpolation="lower")` ranks), found exactly over every entry by
two histogram rounds (`selection.StreamingSelect`) over slices of the scores, so the
memory they add stays small at any size. mergekit 0.1.5 sorts the scores up to 10⁶
entries, where the two agree bit for bit, and above that estimates its quartiles from 10⁶
entries drawn from torch's global generator (seeded only by `--random-seed`, and then
shared with every other draw of the run): an estimated threshold; here it is exact, and the
same whatever the seed.
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
from mergekit_pcb.methods.selection import StreamingSelect

QUANTILES = (0.25, 0.5, 0.75)
# Entries a histogram round reads at once: its int32 keys and bins are temporaries of this
# size, not of the tensor's.
SLICE = 1 << 22


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartile_ranks(n: int) -> list[int]:
    """mergekit's indices into the sorted scores: a float32 q times (n − 1), truncated
    (float32 rounding moves an index by one past about 5.6·10⁶ entries, for both)."""
    return (torch.tensor(QUANTILES) * (n - 1)).long().tolist()


def quartiles(values: torch.Tensor) -> list[torch.Tensor]:
    """The entries of `values` sorted at `quartile_ranks`, exactly, as 0-dim tensors of its
    dtype (mergekit's `sorted_tensor[quantile_indices]`)."""
    flat = values.reshape(-1)
    ranks = quartile_ranks(flat.numel())
    if flat.dtype == torch.float64 or bool(flat.isnan().any()):
        # The histogram rounds read float32 keys, and order NaNs by their sign bit where
        # torch's sort puts every NaN last: these take mergekit's sort.
        ordered = flat.sort().values
        return [ordered[r] for r in ranks]
    select = StreamingSelect(ranks)
    starts = range(0, flat.numel(), SLICE)
    for s in starts:
        select.observe_high(flat[s:s + SLICE])
    select.finish_high()
    for s in starts:
        select.observe_low(flat[s:s + SLICE])
    select.finish_low()
    # each value is a float32 read from `values` (zero as +0.0, which compares the same):
    # exact in its dtype
    return [torch.tensor(v, dtype=values.dtype, device=values.device) for v in select.values]


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    scores = importance(model, base)
    q1, median, q3 = quartiles(scores)
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "take the other model's entries whose importance is an upper outlier"
    pairwise = True
    thread_count_reductions = True  # the softmax and KL sums along rows
    # The mask is float32 (mergekit's `.float()`): float16 and bfloat16 inputs give a
    # float32 result, which mergekit writes as float32 unless `out_dtype` is set.
    float32_result = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return arcee_fusion(inputs.base, uniform_mean(inputs.models))
