"""`cade`: Cosine Annealing Differential Evolution (Jiang, Du et al., IJCNN 2024).

DE/rand/1/bin over fine-tuned copies of one model (spiking networks included: the fitness's
`reset:` hook clears neuron state between batches): each member in turn gets a trial
θ[d0] + F(θ[d1] − θ[d2]) with three distinct donors other than itself, crossed over with a
per-entry Bernoulli(CR) draw, and kept if its accuracy on the select data beats its
parent's. Selection is immediate: a kept trial is a donor for the rest of the generation.

F and CR follow a cosine from max to min over `period` generations (default the reference
setting: 1e-5 to 1e-6, period 40, 99 generations). With `jitter` (default, as the authors'
code does from the second generation on), each generation adds U(min, max) to both, capped
at `max` (the authors' code lets the sum pass it, up to twice max: here `max` is a bound).
The crossover draws a float32 uniform an entry, fine enough for CR ~ 1e-6.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Union

import torch
from pydantic import Field

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.evolve.operators import Scratch, rand_1
from mergekit_pcb.evolve.schedule import Cosine, Schedule, make_schedule
from mergekit_pcb.evolve.strategies.base import SearchParameters, SearchStrategy, Step
from mergekit_pcb.evolve.strategies.de import (
    draw_order_and_donors,
    fine_binomial_crossover,
    plan_step,
)

Number = Union[float, int]  # noqa: UP007 - pydantic needs the runtime union
ScheduleSetting = Union[Number, dict[str, Any]]  # noqa: UP007


def _reference() -> dict[str, Any]:
    """The paper's setting for F and CR: cosine from 1e-5 down to 1e-6 over 40 generations."""
    return {"schedule": "cosine", "max": 1e-5, "min": 1e-6, "period": 40}


class CADEParameters(SearchParameters):
    generations: int = Field(99, ge=0, description="generations to run (the paper: 99)")
    F: ScheduleSetting = Field(default_factory=_reference, description="mutation scale: "
                               "{schedule: cosine, max, min, period} or a number")
    CR: ScheduleSetting = Field(default_factory=_reference, description="crossover rate: "
                                "{schedule: cosine, max, min, period} or a number")
    jitter: bool = Field(True, description="add U(min, max) of the cosine to F and CR from "
                         "the second generation on (seeded), as the authors' code does, "
                         "capped at max")


class CADE(SearchStrategy):
    name = "cade"
    summary = ("DE/rand/1/bin with cosine-annealed F and CR and immediate selection, for "
               "fine-tunes of one (spiking) model")
    parameters_model = CADEParameters
    params: CADEParameters

    def __init__(self, params: SearchParameters) -> None:
        assert isinstance(params, CADEParameters)
        super().__init__(params)
        self.F: Schedule = make_schedule(params.F, "parameters.F")
        self.CR: Schedule = make_schedule(params.CR, "parameters.CR", high=1.0)
        if params.jitter:
            for key, schedule in (("F", self.F), ("CR", self.CR)):
                if not isinstance(schedule, Cosine):
                    raise RecipeError(f"parameters.jitter: draws from the cosine's [min, max], "
                                      f"but parameters.{key} is not a cosine schedule (set "
                                      "jitter: false)")

    @property
    def merged(self) -> bool:
        return False

    def min_population(self) -> int:
        return 4  # the slot and three distinct donors

    def merge_row_label(self, inner: str) -> str:
        return "uniform average (linear)" if inner == "linear" else f"merge ({inner})"

    def identity(self) -> dict[str, Any]:
        return {"F": repr(self.F), "CR": repr(self.CR), "jitter": self.params.jitter}

    def describe(self) -> dict[str, Any]:
        return {"mutation": "rand-1", "selection": "immediate", "jitter": self.params.jitter}

    def _value(self, schedule: Schedule, rng: random.Random, generation: int,
               generations: int) -> float:
        value = schedule.value(generation, generations)
        if self.params.jitter and generation > 0:
            assert isinstance(schedule, Cosine)
            value = min(value + rng.uniform(schedule.low, schedule.high), schedule.high)
        return value

    def draw_generation(self, rng: random.Random, generation: int, generations: int,
                        pop: int, state: dict[str, Any] | None = None) -> dict[str, Any]:
        plan = draw_order_and_donors(rng, pop)
        F = self._value(self.F, rng, generation, generations)
        CR = min(self._value(self.CR, rng, generation, generations), 1.0)
        plan.update({"F": F, "CR": CR})
        return plan

    def step(self, plan: dict[str, Any], position: int) -> Step:
        return plan_step(plan, position)

    def trial_tensor(self, target: torch.Tensor, donors: Sequence[torch.Tensor], step: Step,
                     generator: torch.Generator, out: torch.Tensor | None,
                     scratch: Scratch) -> torch.Tensor:
        mutant = rand_1(donors[0], donors[1], donors[2], step.F, out=out)
        return fine_binomial_crossover(target, mutant, step.CR, generator, out=out)


__all__ = ["CADE", "CADEParameters"]
