"""Tensor operations shared by several methods: trimming, dropping, sign election."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_pcb.methods.selection import kth_smallest


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the max(1, ⌊density·numel⌋) entries of largest magnitude (TIES trim).

    Bit-compatible with mergekit: the threshold is an exact order statistic (histogram
    selection, no full sort), and only when equal magnitudes straddle it does the choice
    among them fall back to mergekit's own rule, `argsort(descending=True)[:k]` (torch's
    sort order: deterministic for a given input, not index order). float64 magnitudes are
    ranked in float64.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    n = delta.numel()
    k = min(n, max(1, int(density * n)))
    magnitude = delta.abs().reshape(-1)
    if magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()  # exact upcast, as mergekit ranks them
    if magnitude.dtype == torch.float32:
        threshold: torch.Tensor | float = kth_smallest(magnitude, n - k, nonnegative=True)
    else:
        threshold = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude >= threshold
    if int(keep.sum()) != k:  # ties straddle the threshold
        keep = torch.zeros_like(keep)
        keep[torch.argsort(magnitude, descending=True)[:k]] = True
    return delta * keep.reshape(delta.shape).to(delta.dtype)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator,
                rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale survivors by 1/density.

    The mask is drawn on the CPU from `generator`, so the same seed gives the same mask on
    any machine and device.
    """
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    out = delta * keep.to(device=delta.device, dtype=delta.dtype)
    return out / density if rescale and density > 0 else out


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    sign_consensus: bool = False,
) -> torch.Tensor:
    """θ₀ + λ · mix(wᵢτᵢ), mergekit's generalized task arithmetic.

    With `sign_consensus`, each entry elects γ = sign(Σᵢ wᵢτᵢ) (zero elects +) and only the
    weighted deltas agreeing with γ are summed; `normalize` divides by the sum of the
    weights that contributed (a zero divisor becomes 1).
    """
    weighted = torch.stack(list(deltas), dim=0)
    w = torch.tensor(list(weights), dtype=weighted.dtype, device=weighted.device)
    w = w.reshape((-1,) + (1,) * (weighted.dim() - 1))
    weighted.mul_(w)  # in place: the stack is ours (the same values as mergekit's product)
    if sign_consensus:
        majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype).mul_(2).sub_(1)
        agree = (weighted.sign() == majority).to(weighted.dtype)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = weighted.mul_(agree).sum(dim=0)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)
