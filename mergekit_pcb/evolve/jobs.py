"""The work an executor runs: build a trial tensor by tensor, merge, score; or score a model.

Jobs are plain picklable descriptions (paths, numbers, the fitness spec); whatever process
runs one builds and caches its own evaluator, merger and open checkpoints, so the same job
gives the same bits in the main process or in any worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.evolve.config import FitnessSpec
from mergekit_pcb.evolve.fitness import Evaluator, better, build_evaluator
from mergekit_pcb.evolve.merge import PopulationMerger
from mergekit_pcb.evolve.operators import (
    Scratch,
    binomial_crossover,
    current_to_rand_binomial,
    rand_1,
)
from mergekit_pcb.evolve.store import (
    CheckpointCache,
    Readable,
    TensorSpec,
    open_readable,
    write_safetensors,
)


@dataclass(frozen=True)
class WorkContext:
    """What every job of one run shares; `key` identifies it in a worker's cache."""

    key: str
    fitness: FitnessSpec
    root: str  # the recipe's directory: relative data and module paths
    model_ref: str | None  # config/tokenizer source for Hugging Face fitness
    merge_method: str | None
    merge_params: dict[str, Any]
    base: str | None  # base model, when the inner merge needs it
    size: int  # largest number of members merged at once
    seed: int
    layout: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class TrialJob:
    generation: int
    step: int
    slot: int
    members: tuple[str, ...]  # every slot's member file
    donors: tuple[int, ...]  # r (current-to-rand) or a, b, c (rand-1)
    F: float
    CR: float
    mutation: str
    merged: bool
    threshold: float  # what the trial must beat: merged fitness or the parent's fitness
    out_path: str  # where the trial is written when it beats the threshold
    spare: str | None = None  # a dead member file to overwrite in place instead


@dataclass(frozen=True)
class ScoreJob:
    members: tuple[str, ...]  # one model, or the members to merge
    merged: bool
    split: str


@dataclass
class JobResult:
    score: float
    member_score: float | None = None  # the trial's own fitness, when it was accepted
    accepted: bool = False
    checksum: int | None = None  # CRC-32 of the trial's file, when it was written
    fitness_s: float = 0.0
    total_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


class Runtime:
    """Per-process cache: evaluator, merger, open checkpoints."""

    def __init__(self, ctx: WorkContext) -> None:
        self.ctx = ctx
        self.evaluator: Evaluator = build_evaluator(ctx.fitness, Path(ctx.root), ctx.model_ref)
        self.merger = (PopulationMerger(ctx.merge_method, ctx.merge_params,
                                        [s.name for s in ctx.layout], ctx.size, ctx.seed)
                       if ctx.merge_method else None)
        needs_base = self.merger is not None and self.merger.requires_base
        self.base: Readable | None = open_readable(ctx.base) if needs_base and ctx.base \
            else None
        self.cache = CheckpointCache()
        self.fitness_s = 0.0
        # Trial tensors and the crossover's draw live in buffers reused from one candidate
        # to the next: fresh model-sized allocations cost more than the math.
        self._buffers: dict[str, torch.Tensor] = {}
        self.scratch = Scratch()

    def buffer(self, spec: TensorSpec) -> torch.Tensor | None:
        if spec.dtype not in (torch.float32, torch.float64):
            return None  # half precision goes through float32 temporaries
        buf = self._buffers.get(spec.name)
        if buf is None:
            buf = torch.empty(spec.shape, dtype=spec.dtype)
            self._buffers[spec.name] = buf
        return buf

    def close(self) -> None:
        self.cache.close()
        if self.base is not None:
            self.base.close()

    def score(self, state: dict[str, torch.Tensor], split: str) -> float:
        start = time.perf_counter()
        try:
            return self.evaluator.score(state, split)
        finally:
            self.fitness_s += time.perf_counter() - start

    def merge(self, tensors_of: Any) -> dict[str, torch.Tensor]:
        """Merged state; `tensors_of(name)` gives that tensor of every member in slot order."""
        assert self.merger is not None, "a merge needs the recipe's merge: block"
        out = {}
        for spec in self.ctx.layout:
            base = self.base.read(spec.name) if self.base is not None \
                and spec.dtype.is_floating_point else None
            out[spec.name] = self.merger.merge_tensor(spec.name, tensors_of(spec.name), base)
        return out

    def load(self, path: str) -> dict[str, torch.Tensor]:
        ckpt = self.cache.get(path)
        return {s.name: ckpt.read(s.name) for s in self.ctx.layout}


_RUNTIMES: dict[str, Runtime] = {}


def runtime(ctx: WorkContext) -> Runtime:
    rt = _RUNTIMES.get(ctx.key)
    if rt is None:
        for old in _RUNTIMES.values():  # one run per process at a time
            old.close()
        _RUNTIMES.clear()
        rt = Runtime(ctx)
        _RUNTIMES[ctx.key] = rt
    return rt


def mask_generator(seed: int, generation: int, step: int, name: str) -> torch.Generator:
    """Crossover masks keyed by (seed, generation, step, tensor): no state to carry over."""
    return tensor_generator(seed, name, f"trial/{generation}/{step}")


def build_trial(rt: Runtime, job: TrialJob) -> dict[str, torch.Tensor]:
    """The trial u, tensor by tensor: mutation of the slot's member, then crossover."""
    ckpts = [rt.cache.get(p) for p in job.members]
    rt.cache.keep_only(job.members)
    parent = ckpts[job.slot]
    trial: dict[str, torch.Tensor] = {}
    for spec in rt.ctx.layout:
        target = parent.read(spec.name)
        if not spec.dtype.is_floating_point:
            trial[spec.name] = target  # integer buffers (step counters) follow the parent
            continue
        out = rt.buffer(spec)
        g = mask_generator(rt.ctx.seed, job.generation, job.step, spec.name)
        scratch = rt.scratch
        if job.mutation == "current-to-rand":
            donor = ckpts[job.donors[0]].read(spec.name)
            trial[spec.name] = current_to_rand_binomial(target, donor, job.F, job.CR, g,
                                                        out=out, scratch=scratch)
            continue
        a, b, c = (ckpts[i].read(spec.name) for i in job.donors)
        mutant = rand_1(a, b, c, job.F, out=out)
        trial[spec.name] = binomial_crossover(target, mutant, job.CR, g, out=out,
                                              scratch=scratch)
    return trial


def run_trial(item: tuple[WorkContext, TrialJob]) -> JobResult:
    ctx, job = item
    start = time.perf_counter()
    rt = runtime(ctx)
    rt.fitness_s = 0.0
    trial = build_trial(rt, job)
    t_built = time.perf_counter()
    maximize = rt.evaluator.maximize
    member_score = None
    if job.merged:
        ckpts = [rt.cache.get(p) for p in job.members]
        merged = rt.merge(lambda name: [trial[name] if i == job.slot else c.read(name)
                                        for i, c in enumerate(ckpts)])
        score = rt.score(merged, "select")
        del merged
        accepted = better(score, job.threshold, maximize)
        if accepted:
            member_score = rt.score(trial, "select")
    else:
        score = rt.score(trial, "select")
        accepted = better(score, job.threshold, maximize)
        member_score = score
    t_scored = time.perf_counter()
    checksum = None
    if accepted:
        checksum = write_safetensors(Path(job.out_path), list(ctx.layout), trial.items(),
                                     reuse=Path(job.spare) if job.spare else None)
    end = time.perf_counter()
    return JobResult(score, member_score if accepted else None, accepted, checksum,
                     rt.fitness_s, end - start,
                     {"build": t_built - start, "write": end - t_scored})


def run_score(item: tuple[WorkContext, ScoreJob]) -> JobResult:
    ctx, job = item
    start = time.perf_counter()
    rt = runtime(ctx)
    rt.fitness_s = 0.0
    if job.merged:
        ckpts = [rt.cache.get(p) for p in job.members]
        state = rt.merge(lambda name: [c.read(name) for c in ckpts])
    else:
        state = rt.load(job.members[0])
    score = rt.score(state, job.split)
    return JobResult(score, fitness_s=rt.fitness_s, total_s=time.perf_counter() - start)


__all__ = ["JobResult", "ScoreJob", "TrialJob", "WorkContext", "run_score", "run_trial"]
