"""Tensor operations shared by several methods: trimming, dropping, sign election."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly `k` largest entries of `scores`.

    Entries tied with the k-th largest are taken in index order, so the result is exact
    and deterministic (selection by k-th value, not a full sort).
    """
    n = scores.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        tied = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[tied] = True
    return mask.reshape(scores.shape)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·numel⌋ entries of largest magnitude (TIES trim), zero the rest.

    As in mergekit: at least one entry survives unless density ≤ 0.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    magnitude = delta.abs()
    if magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()  # exact upcast; float64 stays float64 (no rank changes)
    mask = topk_mask(magnitude, k)
    return delta * mask.to(delta.dtype)


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
    stacked = torch.stack(list(deltas), dim=0)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * w
    if sign_consensus:
        majority = (weighted.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
        agree = (weighted.sign() == majority).to(stacked.dtype)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed
