"""The search-strategy interface: what one population search adds to the evolution engine.

The engine owns what every population search shares: the members on disk, the run state
and its resume, checksums, the executor, scoring, and the outputs. A strategy supplies the
rest: its `parameters:` schema, how each generation's steps are drawn (visiting order,
donors, schedules), how a trial tensor is made from the members, and whether the objective
is the merge of the population or the members themselves. Optional hooks: a strategy state
carried in the run state and updated after each generation from the steps' outcomes
(adaptive F/CR), and a mini-batch of the select data drawn per generation (then members are
rescored on it when the generation starts, and the result is chosen on the full select
data). A new search is one module with a `SearchStrategy` subclass and one entry in
`mergekit_pcb.evolve.strategies.STRATEGIES`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from mergekit_pcb.evolve.operators import Scratch
from mergekit_pcb.recipe.schema import StrictModel


class SearchParameters(StrictModel):
    """`parameters:` keys every population search has."""

    generations: int = Field(15, ge=0, description="generations to run")
    pop: int | None = Field(None, ge=2, description="population size (default: the number of "
                            "input models; more are filled with seeded interpolations)")
    margin: float = Field(0.0, ge=0.0, description="keep a trial only if it beats what it "
                          "must beat on the fitting data by more than this (metric units; 0: "
                          "any gain, the papers' rule), so that noise is not taken for progress")
    accept: Literal["greedy", "paired"] = Field(
        "greedy", description="greedy: keep a trial whose score beats its parent's (the "
        "papers' rule); paired: keep it only if, besides, its gain over the parent example "
        "by example on the fitting data passes a one-sided paired bootstrap test at "
        "accept_level (torch and hf-classification fitness, accuracy or loss)")
    accept_level: float = Field(0.95, gt=0.5, lt=1.0, description="with accept: paired, the "
                                "one-sided confidence that the mean gain is above 0")
    patience: int | None = Field(None, ge=1, description="with a guard (fitness.guard or "
                                 "guard_fraction): stop after this many generations whose "
                                 "best does not raise the best guard score")


@dataclass(frozen=True)
class Step:
    """One step of a generation: the slot whose trial is built, its donors, F and CR."""

    slot: int
    donors: tuple[int, ...]
    F: float
    CR: float


class SearchStrategy(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    parameters_model: ClassVar[type[SearchParameters]] = SearchParameters

    def __init__(self, params: SearchParameters) -> None:
        self.params = params

    # ------------------------------------------------------------------ the recipe

    @property
    @abstractmethod
    def merged(self) -> bool:
        """True when the objective is the merged population (the recipe's `merge:` block),
        False when each member is scored on its own and a trial must beat its parent."""

    def min_population(self) -> int:
        return 2

    def check(self, has_merge: bool, where: str) -> None:  # noqa: B027 - optional hook
        """Recipe-level checks beyond the parameter schema; `where` prefixes messages."""

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the plan, `evolution.json` and the model card say about the search."""
        return {}

    def check_fitness(self, fitness_type: str, where: str) -> None:  # noqa: B027 - optional
        """Checks of the fitness block this search needs (e.g. mini-batches need `torch`)."""

    def merge_row_label(self, inner: str) -> str:
        """The closing table's label for the merge of the inputs."""
        return f"plain merge ({inner})"

    @property
    def batched(self) -> bool:
        """True when each generation draws a mini-batch of the select data (`batch(plan)`):
        the engine then rescores the members on it when the generation starts, and chooses
        the result on the full select data at the end."""
        return False

    # ------------------------------------------------------------------ the controller

    def initial_state(self) -> dict[str, Any] | None:
        """The strategy's own state (JSON), kept in the run state under `search` and handed
        to `draw_generation` and `end_generation`; None (the default) keeps no state."""
        return None

    def check_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Raise ValueError when a resumed run's strategy state is not what this strategy
        writes (a state edited by hand must fail before the run goes on)."""

    @abstractmethod
    def draw_generation(self, rng: random.Random, generation: int, generations: int,
                        pop: int, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The generation's plan (JSON data, stored in the run state), drawn before any step
        runs so that steps can be scored ahead of their turn. `plan["F"]` and `plan["CR"]`
        are what the history records for the generation."""

    @abstractmethod
    def step(self, plan: dict[str, Any], position: int) -> Step: ...

    def end_generation(self, state: dict[str, Any], plan: dict[str, Any],
                       outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The state after a generation; `outcomes[position]` is {"accepted", "parent",
        "trial"} (the scores of the step's parent and trial). Only called when
        `initial_state()` is not None."""
        return state

    def batch(self, plan: dict[str, Any]) -> dict[str, Any] | None:
        """The generation's mini-batch of the select data ({"seed", "size"}), or None for
        the whole select data."""
        return None

    def reads(self, step: Step) -> set[int]:
        """The slots a step's trial is made from (the engine redoes a step computed ahead
        when an earlier step replaced one of them)."""
        return {step.slot, *step.donors}

    # ------------------------------------------------------------------ the worker

    @abstractmethod
    def trial_tensor(self, target: torch.Tensor, donors: Sequence[torch.Tensor], step: Step,
                     generator: torch.Generator, out: torch.Tensor | None,
                     scratch: Scratch) -> torch.Tensor:
        """One floating tensor of the trial for `step`, from the slot's member (`target`)
        and the donors' tensors; `generator` is keyed by (seed, generation, step, tensor)."""
