"""What the executor runs: score a candidate point (from the cached parts, or a full merge
through the engine), or score a written model.

Jobs are picklable descriptions; each process keeps its own `Runtime` (evaluator, open
checkpoints, the parts), keyed by the run, as `evolve.jobs` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_pcb.engine import MergePlan, build_plan, merge_in_memory
from mergekit_pcb.errors import UserError
from mergekit_pcb.evolve.config import FitnessSpec
from mergekit_pcb.evolve.fitness import Evaluator, build_evaluator, example_scores
from mergekit_pcb.evolve.process_local import ProcessLocal
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.reader import Checkpoint

from .config import SearchSpace
from .fastpath import Parts, build_parts, fast_merge, matches


@dataclass(frozen=True)
class SearchContext:
    key: str  # identifies the run in a worker's cache
    space: SearchSpace
    fitness: FitnessSpec
    root: str  # the recipe's folder: relative data and module paths
    model_ref: str | None
    seed: int
    parts_file: str | None  # where the parts are, or None: installed in this process
    allow_pickle: bool = False
    build_parts: bool = False  # each process builds the parts itself (no shared files)
    # `--device`: where the engine merges a point and the fitness scores it (the fast
    # path's combine of cached parts stays on the CPU)
    device: str = "cpu"


@dataclass(frozen=True)
class PointJob:
    x: tuple[float, ...] | None  # None: the recipe's own values
    split: str = "select"
    engine: bool = False  # True: always the full merge through the engine
    examples: bool = False  # also return each example's score (the guard's paired test)


@dataclass(frozen=True)
class ModelJob:
    path: str  # a written model (the result)
    split: str


@dataclass
class Outcome:
    score: float | None
    error: str | None = None
    fast: bool = False
    seconds: float = 0.0
    fitness_s: float = 0.0
    examples: list[float] | None = None  # each example's score, when the job asked for them


class Runtime:
    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self._evaluator: Evaluator | None = None
        self.parts: Parts | None = None
        self.checkpoints: dict[str, Checkpoint] = {}

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            c = self.ctx
            self._evaluator = build_evaluator(c.fitness, Path(c.root), c.model_ref, c.device)
        return self._evaluator

    def plan(self, x: tuple[float, ...] | None) -> MergePlan:
        """The engine's plan of point x, over checkpoints opened once per process."""
        recipe = self.ctx.space.merge_recipe(list(x) if x is not None else None,
                                             self.ctx.seed)
        for ref in recipe.model_refs():
            if ref not in self.checkpoints:
                self.checkpoints[ref] = open_checkpoint(ref,
                                                        allow_pickle=self.ctx.allow_pickle)
        return build_plan(recipe, "", sources=self.checkpoints)

    def state(self, job: PointJob) -> tuple[dict[str, torch.Tensor], bool]:
        plan = self.plan(job.x)
        if not job.engine:
            if self.parts is None and self.ctx.parts_file is not None:
                self.parts = Parts.load(Path(self.ctx.parts_file))
            elif self.parts is None and self.ctx.build_parts:
                self.parts = build_parts(self.plan(None))
            if self.parts is not None and matches(plan, self.parts):
                return fast_merge(plan, self.parts), True
        return merge_in_memory(plan, self.ctx.device), False

    def score(self, state: dict[str, torch.Tensor], split: str) -> tuple[float, float]:
        start = time.perf_counter()
        value = self.evaluator.score(state, split)
        return value, time.perf_counter() - start

    def close(self) -> None:
        for c in self.checkpoints.values():
            c.close()
        self.checkpoints.clear()
        self.parts = None


_RUNTIME: ProcessLocal[Runtime] = ProcessLocal()


def runtime(ctx: SearchContext) -> Runtime:
    return _RUNTIME.get(ctx.key, lambda: Runtime(ctx))


def install_parts(ctx: SearchContext, parts: Parts) -> None:
    """Hand parts computed in this process to its runtime (serial runs keep them here)."""
    runtime(ctx).parts = parts


def release(ctx: SearchContext) -> None:
    _RUNTIME.release(ctx.key)


def run_point(item: tuple[SearchContext, PointJob]) -> Outcome:
    ctx, job = item
    start = time.perf_counter()
    rt = runtime(ctx)
    try:
        state, fast = rt.state(job)
    except UserError as e:  # a point the merge refuses (e.g. linear weights summing to 0)
        return Outcome(None, str(e), seconds=time.perf_counter() - start)
    score, fitness_s = rt.score(state, job.split)
    rows = example_scores(rt.evaluator, state, job.split) if job.examples else None
    return Outcome(score, None, fast, time.perf_counter() - start, fitness_s,
                   None if rows is None else rows.tolist())


def run_model(item: tuple[SearchContext, ModelJob]) -> Outcome:
    ctx, job = item
    start = time.perf_counter()
    rt = runtime(ctx)
    with open_checkpoint(job.path) as ckpt:
        state = {name: ckpt.read(name) for name in ckpt.names()}
    score, fitness_s = rt.score(state, job.split)
    return Outcome(score, None, False, time.perf_counter() - start, fitness_s)


__all__ = ["ModelJob", "Outcome", "PointJob", "SearchContext", "install_parts", "release",
           "run_model", "run_point"]
