"""Differential-evolution operators: pure functions of tensors and a torch.Generator.

They know nothing of files, populations or fitness: the population store hands them one
tensor of each member involved and writes what they return. They never modify their
inputs; an optional `out` (and `scratch` for the crossover's uniform draw) lets the engine
reuse buffers across candidates, which gives the same bits as the allocating call.
Arithmetic runs in float32 (float64 stays float64) and the result is cast back to the
target's dtype, so half-precision members do not lose the small steps F·(θr − θi).
"""

from __future__ import annotations

import torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def current_to_rand(target: torch.Tensor, donor: torch.Tensor, F: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Evolver's mutation: v = θᵢ + F·(θᵣ − θᵢ) (stays on the segment for 0 ≤ F ≤ 1).

    Computed as torch.lerp (one pass, no temporaries).
    """
    acc = _acc_dtype(target)
    if target.dtype == acc and donor.dtype == acc:
        return torch.lerp(target, donor, F, out=out) if out is not None \
            else torch.lerp(target, donor, F)
    v = torch.lerp(target.to(acc), donor.to(acc), F).to(target.dtype)
    return out.copy_(v) if out is not None else v


def rand_1(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, F: float,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Classic DE/rand/1 mutation: v = θ_a + F·(θ_b − θ_c)."""
    acc = _acc_dtype(a)
    if a.dtype == acc and out is not None:
        torch.sub(b.to(acc), c.to(acc), out=out)
        return out.mul_(F).add_(a)
    v = (a.to(acc) + (b.to(acc) - c.to(acc)) * F).to(a.dtype)
    return out.copy_(v) if out is not None else v


def crossover_mask(shape: tuple[int, ...] | torch.Size, CR: float,
                   generator: torch.Generator,
                   scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Bernoulli(CR) mask (True: take the mutant): a uniform draw from `generator` below CR.

    Drawn on the CPU so that the same generator gives the same mask on any device;
    `scratch` (a float32 CPU buffer of at least that many elements) holds the draw.
    """
    if CR >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    if CR <= 0.0:
        return torch.zeros(shape, dtype=torch.bool)
    if scratch is None:
        return torch.rand(shape, generator=generator, dtype=torch.float32) < CR
    n = 1
    for d in shape:
        n *= d
    draw = scratch[:n].view(shape).uniform_(generator=generator)
    return draw < CR


def apply_mask(target: torch.Tensor, mutant: torch.Tensor, mask: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """u = mutant where mask, else target (`out` may be `mutant` itself)."""
    mask = mask.to(target.device)
    mutant = mutant.to(target.dtype)
    if out is not None:
        return torch.where(mask, mutant, target, out=out)
    return torch.where(mask, mutant, target)


def binomial_crossover(target: torch.Tensor, mutant: torch.Tensor, CR: float,
                       generator: torch.Generator, out: torch.Tensor | None = None,
                       scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Binomial crossover: each entry comes from the mutant with probability CR."""
    if CR >= 1.0:
        m = mutant.to(target.dtype)
        return out.copy_(m) if out is not None and out is not mutant else m
    if CR <= 0.0:
        return out.copy_(target) if out is not None else target
    mask = crossover_mask(target.shape, CR, generator, scratch)
    return apply_mask(target, mutant, mask, out=out)


def current_to_rand_binomial(target: torch.Tensor, donor: torch.Tensor, F: float, CR: float,
                             generator: torch.Generator, out: torch.Tensor | None = None,
                             scratch: torch.Tensor | None = None) -> torch.Tensor:
    """binomial_crossover(θᵢ, current_to_rand(θᵢ, θᵣ, F), CR): the same bits, fused.

    One lerp whose weight is F where the mask is set and 0 elsewhere (θᵢ + 0·(θᵣ − θᵢ) is θᵢ
    exactly): two passes over the model instead of four.
    """
    if target.dtype != torch.float32 or donor.dtype != torch.float32 or not 0.0 < CR < 1.0:
        mutant = current_to_rand(target, donor, F, out=out)
        return binomial_crossover(target, mutant, CR, generator, out=out, scratch=scratch)
    mask = crossover_mask(target.shape, CR, generator, scratch)
    n = target.numel()
    weight = scratch[:n].view(target.shape) if scratch is not None \
        else torch.empty(target.shape, dtype=torch.float32)
    torch.mul(mask, F, out=weight)
    return torch.lerp(target, donor, weight, out=out) if out is not None \
        else torch.lerp(target, donor, weight)


def interpolate(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·θ_a + (1 − α)·θ_b: how a population larger than the inputs is filled."""
    acc = _acc_dtype(a)
    return (alpha * a.to(acc) + (1.0 - alpha) * b.to(acc)).to(a.dtype)


__all__ = ["apply_mask", "binomial_crossover", "crossover_mask", "current_to_rand",
           "current_to_rand_binomial", "interpolate", "rand_1"]
