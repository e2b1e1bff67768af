"""`de-ancestor`: Darwinian DE from training ancestors (Du, Jiang et al., IEEE SMC 2024).

The population is the last checkpoints of one back-propagation run (`ancestors:`). Each
generation draws a fresh mini-batch of the select data (seeded); the members are rescored on
it, then every member in turn gets a DE/rand/1/bin trial θ[d0] + F(θ[d1] − θ[d2]) (three
distinct donors other than itself, binomial crossover CR), kept if its loss on the batch is
lower than its parent's (greedy, immediate). Every floating tensor evolves, batch-norm
running statistics included; integer buffers follow the parent. The result is the member
best on the whole select data.

F and CR are constant (or any schedule), or adapted (`adaptation: sade`): per trial
F ~ N(F, F_sd) clipped to [1e-4, 1], CR ~ N(M[r], CR_sd) clipped to [0, CR_max] with r a
random slot of a memory M of `memory` means, and after each generation the next slot of M
takes the |Δloss|-weighted Lehmer mean of the CRs of the kept trials (the authors' code;
SaDE proper takes the median of the successful CRs over a learning period).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
from pydantic import Field

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.evolve.operators import Scratch, binomial_crossover, rand_1
from mergekit_pcb.evolve.schedule import Constant, Schedule, make_schedule
from mergekit_pcb.evolve.strategies.base import SearchParameters, SearchStrategy, Step
from mergekit_pcb.evolve.strategies.de import draw_order_and_donors, lehmer_mean, plan_step

Number = Union[float, int]  # noqa: UP007 - pydantic needs the runtime union
ScheduleSetting = Union[Number, dict[str, Any]]  # noqa: UP007

F_CLIP = (1e-4, 1.0)  # the authors' clip of a drawn F


class DEAncestorParameters(SearchParameters):
    F: ScheduleSetting = Field(0.1, description="mutation scale (small keeps members in "
                               "their basin): a number or {schedule: ...}; with "
                               "adaptation sade, the mean of the per-trial draw")
    CR: ScheduleSetting = Field(0.1, description="crossover rate in [0, 1]: a number or "
                                "{schedule: ...}; with adaptation sade, the memory's "
                                "starting mean")
    adaptation: Literal["none", "sade"] = Field(
        "none", description="none: F and CR as given; sade: per-trial F and CR drawn around "
        "means, CR's mean learned from the kept trials (state kept in the run state)")
    F_sd: float = Field(0.04, ge=0.0, le=1.0, description="sade: spread of the F draw")
    CR_sd: float = Field(0.05, ge=0.0, le=1.0, description="sade: spread of the CR draw")
    CR_max: float = Field(0.2, gt=0.0, le=1.0, description="sade: largest CR drawn")
    memory: int = Field(5, ge=1, le=1000, description="sade: number of CR means remembered")
    batch_size: int | None = Field(
        256, ge=1, description="rows of the select data drawn afresh (seeded) each "
        "generation; null scores on all of it (fitness type torch for mini-batches)")


class DEAncestor(SearchStrategy):
    name = "de-ancestor"
    summary = ("DE/rand/1/bin over one training run's last checkpoints, greedy on a fresh "
               "mini-batch per generation; the best member on the select data")
    parameters_model = DEAncestorParameters
    params: DEAncestorParameters

    def __init__(self, params: SearchParameters) -> None:
        assert isinstance(params, DEAncestorParameters)
        super().__init__(params)
        self.F: Schedule = make_schedule(params.F, "parameters.F")
        self.CR: Schedule = make_schedule(params.CR, "parameters.CR", high=1.0)
        if self.adaptive:
            for key, schedule in (("F", self.F), ("CR", self.CR)):
                if not isinstance(schedule, Constant):
                    raise RecipeError(f"parameters.{key}: adaptation sade takes a number (the "
                                      "starting mean), not a schedule")

    @property
    def adaptive(self) -> bool:
        return self.params.adaptation == "sade"

    @property
    def merged(self) -> bool:
        return False

    @property
    def batched(self) -> bool:
        return self.params.batch_size is not None

    def min_population(self) -> int:
        return 4  # the slot and three distinct donors

    def check_fitness(self, fitness_type: str, where: str) -> None:
        if self.batched and fitness_type != "torch":
            given = "batch_size" in self.params.model_fields_set
            what = (f"batch_size: {self.params.batch_size}" if given
                    else f"the default batch_size: {self.params.batch_size}")
            raise RecipeError(f"{where}parameters.batch_size: mini-batches ({what}) need "
                              f"fitness type torch, not {fitness_type}; set batch_size: null "
                              "to score on all of the select data")

    def merge_row_label(self, inner: str) -> str:
        return "uniform average (linear)" if inner == "linear" else f"merge ({inner})"

    def identity(self) -> dict[str, Any]:
        p = self.params
        return {"F": repr(self.F), "CR": repr(self.CR), "adaptation": p.adaptation,
                "F_sd": p.F_sd, "CR_sd": p.CR_sd, "CR_max": p.CR_max, "memory": p.memory,
                "batch_size": p.batch_size}

    def describe(self) -> dict[str, Any]:
        return {"mutation": "rand-1", "selection": "immediate",
                "adaptation": self.params.adaptation, "batch_size": self.params.batch_size}

    # ------------------------------------------------------------------ controller

    def initial_state(self) -> dict[str, Any] | None:
        if not self.adaptive:
            return None
        assert isinstance(self.CR, Constant)
        return {"memory": [self.CR.constant] * self.params.memory, "next": 0}

    def check_state(self, state: dict[str, Any]) -> None:
        memory, slot = state.get("memory"), state.get("next")
        if not isinstance(memory, list) or len(memory) != self.params.memory or not all(
                isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in memory):
            raise ValueError(f"strategy state: 'memory' must hold {self.params.memory} CRs "
                             "in [0, 1]")
        if not isinstance(slot, int) or not 0 <= slot < len(memory):
            raise ValueError("strategy state: 'next' is not a slot of the memory")

    def draw_generation(self, rng: random.Random, generation: int, generations: int,
                        pop: int, state: dict[str, Any] | None = None) -> dict[str, Any]:
        plan = draw_order_and_donors(rng, pop)
        p = self.params
        if self.adaptive:
            assert state is not None
            mean_F = self.F.value(generation, generations)
            memory = state["memory"]
            Fs = [min(max(rng.gauss(mean_F, p.F_sd), F_CLIP[0]), F_CLIP[1])
                  for _ in range(pop)]
            CRs = [min(max(rng.gauss(memory[rng.randrange(len(memory))], p.CR_sd), 0.0),
                       p.CR_max) for _ in range(pop)]
            plan.update({"Fs": Fs, "CRs": CRs, "F": sum(Fs) / pop, "CR": sum(CRs) / pop})
        else:
            plan.update({"F": self.F.value(generation, generations),
                         "CR": self.CR.value(generation, generations)})
        if p.batch_size is not None:
            plan["batch"] = {"seed": rng.randrange(2**31), "size": p.batch_size}
        return plan

    def step(self, plan: dict[str, Any], position: int) -> Step:
        return plan_step(plan, position)

    def batch(self, plan: dict[str, Any]) -> dict[str, Any] | None:
        return plan.get("batch")

    def end_generation(self, state: dict[str, Any], plan: dict[str, Any],
                       outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The next memory slot takes the Lehmer mean of the kept trials' CRs, weighted by
        how much each lowered its parent's loss; nothing changes when no trial was kept."""
        if not self.adaptive:
            return state
        kept = [(plan["CRs"][i], abs(o["parent"] - o["trial"]))
                for i, o in enumerate(outcomes) if o["accepted"]]
        crs = [cr for cr, _ in kept]
        if not kept or max(crs) <= 0.0:
            return state
        gains = [g if math.isfinite(g) else 0.0 for _, g in kept]
        total = sum(gains)
        weights = [g / total for g in gains] if total > 0 else [1.0 / len(kept)] * len(kept)
        memory = list(state["memory"])
        slot = state["next"]
        memory[slot] = lehmer_mean(crs, weights)
        return {"memory": memory, "next": (slot + 1) % len(memory)}

    # ------------------------------------------------------------------ worker

    def trial_tensor(self, target: torch.Tensor, donors: Sequence[torch.Tensor], step: Step,
                     generator: torch.Generator, out: torch.Tensor | None,
                     scratch: Scratch) -> torch.Tensor:
        mutant = rand_1(donors[0], donors[1], donors[2], step.F, out=out)
        return binomial_crossover(target, mutant, step.CR, generator, out=out, scratch=scratch)


__all__ = ["DEAncestor", "DEAncestorParameters"]
