"""Differential-evolution operators: pure functions of tensors and a torch.Generator.

They know nothing of files, populations or fitness: the population store hands them one
tensor of each member involved and writes what they return. They never modify their
inputs; an optional `out` (and a `Scratch` for the crossover's draw) lets the engine reuse
buffers across candidates, which gives the same bits as the allocating call.
Arithmetic runs in float32 (float64 stays float64) and the result is cast back to the
target's dtype, so half-precision members do not lose the small steps F·(θr − θi).
"""

from __future__ import annotations

import math

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


class Scratch:
    """Buffers for the crossover draw, grown on demand and reused from one call to the next
    (fresh model-sized allocations cost more than the math)."""

    def __init__(self) -> None:
        self._words = torch.empty(0, dtype=torch.int64)
        self._floats = torch.empty(0, dtype=torch.float32)

    def words(self, n: int) -> torch.Tensor:
        if self._words.numel() < n:
            self._words = torch.empty(n, dtype=torch.int64)
        return self._words[:n]

    def floats(self, n: int) -> torch.Tensor:
        if self._floats.numel() < n:
            self._floats = torch.empty(n, dtype=torch.float32)
        return self._floats[:n]


# The crossover draws 16 random bits an entry: one 64-bit word from the generator gives four
# entries, four times fewer draws than torch.rand, and CR is resolved to 1/65536.
_LEVELS = 1 << 16


def _draw(numel: int, generator: torch.Generator, scratch: Scratch | None) -> torch.Tensor:
    """`numel` uniform int16 values, four to each full-range 64-bit word of `generator`."""
    n_words = (numel + 3) // 4
    words = scratch.words(n_words) if scratch is not None \
        else torch.empty(n_words, dtype=torch.int64)
    words.random_(-(1 << 63), None, generator=generator)  # the full 64-bit range
    return words.view(torch.int16)[:numel]


def _threshold(CR: float) -> int:
    """An entry takes the mutant where its int16 draw is at least this, which happens with
    probability round(CR·2¹⁶)/2¹⁶."""
    return _LEVELS // 2 - round(CR * _LEVELS)


def crossover_mask(shape: tuple[int, ...] | torch.Size, CR: float,
                   generator: torch.Generator, scratch: Scratch | None = None) -> torch.Tensor:
    """Bernoulli(CR) mask (True: take the mutant), from 16 random bits an entry.

    Drawn on the CPU so that the same generator gives the same mask on any device.
    """
    if CR >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    if CR <= 0.0:
        return torch.zeros(shape, dtype=torch.bool)
    numel = math.prod(shape)
    return (_draw(numel, generator, scratch) >= _threshold(CR)).view(shape)


def crossover_weights(shape: tuple[int, ...] | torch.Size, CR: float, value: float,
                      generator: torch.Generator, scratch: Scratch | None = None
                      ) -> torch.Tensor:
    """float32 tensor: `value` where crossover_mask (same generator state) is set, else 0.

    Computed without a bool tensor (converting one and selecting on it are slow, branchy
    passes): with d the draw and t the threshold, d − t + ½ is at least ½ where d ≥ t and at
    most −½ elsewhere, exactly (half-integers below 2²⁴); times 2·value, clamped to
    [0, value], it is value exactly (½·2v = v) or 0.
    """
    numel = math.prod(shape)
    out = scratch.floats(numel) if scratch is not None \
        else torch.empty(numel, dtype=torch.float32)
    if CR >= 1.0 or CR <= 0.0:
        return out.fill_(value if CR >= 1.0 else 0.0).view(shape)
    out.copy_(_draw(numel, generator, scratch))
    low, high = sorted((0.0, value))
    out.sub_(_threshold(CR) - 0.5).mul_(2.0 * value).clamp_(low, high)
    return out.view(shape)


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
                       scratch: Scratch | None = None) -> torch.Tensor:
    """Binomial crossover: each entry comes from the mutant with probability CR."""
    if CR >= 1.0:
        m = mutant.to(target.dtype)
        return out.copy_(m) if out is not None and out is not mutant else m
    if CR <= 0.0:
        return out.copy_(target) if out is not None else target
    if target.dtype == torch.float32 and mutant.dtype == torch.float32:
        # lerp with weights 1 and 0 picks end and start exactly, without a branchy select
        weight = crossover_weights(target.shape, CR, 1.0, generator, scratch)
        return torch.lerp(target, mutant, weight, out=out) if out is not None \
            else torch.lerp(target, mutant, weight)
    mask = crossover_mask(target.shape, CR, generator, scratch)
    return apply_mask(target, mutant, mask, out=out)


def current_to_rand_binomial(target: torch.Tensor, donor: torch.Tensor, F: float, CR: float,
                             generator: torch.Generator, out: torch.Tensor | None = None,
                             scratch: Scratch | None = None) -> torch.Tensor:
    """binomial_crossover(θᵢ, current_to_rand(θᵢ, θᵣ, F), CR): the same values, fused.

    One lerp whose weight is F where the mask is set and 0 elsewhere (θᵢ + 0·(θᵣ − θᵢ) is θᵢ):
    one pass over the model instead of a mutation, a mask and a select.
    """
    if target.dtype != torch.float32 or donor.dtype != torch.float32 or not 0.0 < CR < 1.0:
        mutant = current_to_rand(target, donor, F, out=out)
        return binomial_crossover(target, mutant, CR, generator, out=out, scratch=scratch)
    weight = crossover_weights(target.shape, CR, F, generator, scratch)
    return torch.lerp(target, donor, weight, out=out) if out is not None \
        else torch.lerp(target, donor, weight)


def interpolate(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·θ_a + (1 − α)·θ_b: how a population larger than the inputs is filled."""
    acc = _acc_dtype(a)
    return (alpha * a.to(acc) + (1.0 - alpha) * b.to(acc)).to(a.dtype)


__all__ = ["Scratch", "apply_mask", "binomial_crossover", "crossover_mask",
           "crossover_weights", "current_to_rand", "current_to_rand_binomial", "interpolate",
           "rand_1"]
