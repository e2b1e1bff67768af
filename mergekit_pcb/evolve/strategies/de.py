"""DE/rand/1/bin pieces shared by the searches that evolve one model's checkpoints
(`de-ancestor`, `cade`): donors, the fine-grained crossover, and the common step layout.

Both visit the slots in order 0..pop-1 (as the authors' `de.py` does) and select
immediately: a step's donors are slot indices drawn before the generation starts, read when
the step runs, so a trial kept at step k is a donor for the steps after k (the engine redoes
a step scored ahead on a member an earlier step replaced).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from mergekit_pcb.evolve.strategies.base import Step


def rand_1_donors(rng: random.Random, pop: int, slot: int) -> list[int]:
    """Three distinct members other than `slot`: v = θ[d0] + F(θ[d1] − θ[d2])."""
    return rng.sample([j for j in range(pop) if j != slot], 3)


def draw_order_and_donors(rng: random.Random, pop: int) -> dict[str, Any]:
    order = list(range(pop))
    return {"order": order, "donors": [rand_1_donors(rng, pop, i) for i in order]}


def plan_step(plan: dict[str, Any], position: int) -> Step:
    """Per-step F/CR (`Fs`, `CRs`) where the plan draws them per step, else the
    generation's."""
    F = plan["Fs"][position] if "Fs" in plan else plan["F"]
    CR = plan["CRs"][position] if "CRs" in plan else plan["CR"]
    return Step(plan["order"][position], tuple(plan["donors"][position]), F, CR)


def fine_binomial_crossover(target: torch.Tensor, mutant: torch.Tensor, CR: float,
                            generator: torch.Generator,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Binomial crossover with a float32 uniform draw an entry (resolution 2⁻²⁴): CADE's CR
    of 1e-6…2e-5 would round to 0 or 1/65536 in the 16-bit crossover of `operators`.

    The mask is drawn on the CPU, so the same generator gives the same trial anywhere; `out`
    may be `mutant` itself.
    """
    if CR <= 0.0:
        return out.copy_(target) if out is not None else target
    draw = torch.rand(target.shape, generator=generator, dtype=torch.float32)
    mask = draw < CR
    mutant = mutant.to(target.dtype)
    if out is not None:
        return torch.where(mask, mutant, target, out=out)
    return torch.where(mask, mutant, target)


def lehmer_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Σ w·v² / Σ w·v (SHADE's weighted Lehmer mean)."""
    num = sum(w * v * v for v, w in zip(values, weights, strict=True))
    den = sum(w * v for v, w in zip(values, weights, strict=True))
    return num / den


__all__ = ["draw_order_and_donors", "fine_binomial_crossover", "lehmer_mean", "plan_step",
           "rand_1_donors"]
