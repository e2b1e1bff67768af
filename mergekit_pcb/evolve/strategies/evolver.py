"""`evolver`: differential evolution of fine-tuned models (Evolver, Zhang et al. 2024).

Each step mutates one member toward a random donor (current-to-rand, or rand/1 with three
donors), crosses the mutant over with its parent (binomial, CR), and keeps the trial when
it raises the merged population's fitness (`mode: merged`) or beats its parent
(`mode: standalone`). methods.md gives the formulas.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
from pydantic import Field

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.evolve.operators import (
    Scratch,
    binomial_crossover,
    current_to_rand_binomial,
    rand_1,
)
from mergekit_pcb.evolve.schedule import Schedule, make_schedule
from mergekit_pcb.evolve.strategies.base import SearchParameters, SearchStrategy, Step

Number = Union[float, int]  # noqa: UP007 - pydantic needs the runtime union
ScheduleSetting = Union[Number, dict[str, Any]]  # noqa: UP007


class EvolverParameters(SearchParameters):
    F: ScheduleSetting = Field(0.5, description="mutation scale: a number or {schedule: ...}")
    CR: ScheduleSetting = Field(0.5, description="crossover rate in [0, 1]: a number or "
                                "{schedule: ...}")
    mode: Literal["merged", "standalone"] = Field(
        "merged", description="keep a trial if it raises the merged population's fitness "
        "(merged) or beats its parent (standalone)")
    mutation: Literal["current-to-rand", "rand-1"] = Field(
        "current-to-rand", description="x + F(x_r - x), or a + F(b - c) with three donors")


class Evolver(SearchStrategy):
    name = "evolver"
    summary = "differential evolution of the models, scored merged or on their own"
    parameters_model = EvolverParameters
    params: EvolverParameters

    def __init__(self, params: SearchParameters) -> None:
        assert isinstance(params, EvolverParameters)
        super().__init__(params)
        self.F: Schedule = make_schedule(params.F, "parameters.F")
        self.CR: Schedule = make_schedule(params.CR, "parameters.CR", high=1.0)

    @property
    def merged(self) -> bool:
        return self.params.mode == "merged"

    def min_population(self) -> int:
        return 4 if self.params.mutation == "rand-1" else 2

    def check(self, has_merge: bool, where: str) -> None:
        if self.merged and not has_merge:
            raise RecipeError(f"{where}merge: required by parameters.mode 'merged' (the inner "
                              "merge of the population, e.g. merge_method: ties)")

    def identity(self) -> dict[str, Any]:
        return {"mode": self.params.mode, "mutation": self.params.mutation,
                "F": repr(self.F), "CR": repr(self.CR)}

    def describe(self) -> dict[str, Any]:
        return {"mode": self.params.mode, "mutation": self.params.mutation}

    def draw_generation(self, rng: random.Random, generation: int, generations: int,
                        pop: int, state: dict[str, Any] | None = None) -> dict[str, Any]:
        # Donors are slot indices drawn before any step runs, so they do not depend on
        # which trials are accepted.
        order = rng.sample(range(pop), pop)
        k = 1 if self.params.mutation == "current-to-rand" else 3
        donors = [rng.sample([j for j in range(pop) if j != i], k) for i in order]
        return {"order": order, "donors": donors,
                "F": self.F.value(generation, generations),
                "CR": self.CR.value(generation, generations)}

    def step(self, plan: dict[str, Any], position: int) -> Step:
        return Step(plan["order"][position], tuple(plan["donors"][position]), plan["F"],
                    plan["CR"])

    def trial_tensor(self, target: torch.Tensor, donors: Sequence[torch.Tensor], step: Step,
                     generator: torch.Generator, out: torch.Tensor | None,
                     scratch: Scratch) -> torch.Tensor:
        if self.params.mutation == "current-to-rand":
            return current_to_rand_binomial(target, donors[0], step.F, step.CR, generator,
                                            out=out, scratch=scratch)
        mutant = rand_1(donors[0], donors[1], donors[2], step.F, out=out)
        return binomial_crossover(target, mutant, step.CR, generator, out=out, scratch=scratch)
