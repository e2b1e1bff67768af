"""The work an executor runs: build a trial tensor by tensor, merge, score; or score a model.

Jobs are plain picklable descriptions (paths, numbers, the fitness spec); whatever process
runs one builds and caches its own evaluator, merge plans and open checkpoints, so the same
job gives the same bits in the main process or in any worker.

The population's merge is the merge engine's own (`engine.build_plan` + `merge_in_memory`):
the same statistics passes, routing, buffer rules and seeded masks as `pcbmerge run` over
the member files. Members are memory-mapped (resident when the page cache holds them, read
from disk when it does not) and the trial joins as an in-memory checkpoint.

In merged mode a worker with a core to spare builds and merges the generation's next
candidate on it while the current one is scored (`Runtime.prepare_next`): on the population
this trial leaves if kept, or if not, whichever recent trials make likelier, and on the other
when the guess was wrong and the trial is kept (its own score leaves time). The same
functions on the same inputs give the same bits; the job waits for that work before it
returns.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mergekit_pcb.engine import MergePlan, build_plan, merge_in_memory
from mergekit_pcb.engine.memo import PreparedMemo
from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.engine.stream import all_finite
from mergekit_pcb.errors import UserError
from mergekit_pcb.evolve.config import FitnessSpec, InnerMerge
from mergekit_pcb.evolve.fitness import Evaluator, better, build_evaluator, example_scores
from mergekit_pcb.evolve.operators import Scratch
from mergekit_pcb.evolve.process_local import ProcessLocal
from mergekit_pcb.evolve.stats import paired_gain_holds
from mergekit_pcb.evolve.store import CheckpointCache, TensorSpec
from mergekit_pcb.evolve.strategies import SearchStrategy, Step
from mergekit_pcb.io.mapped import file_identity
from mergekit_pcb.io.memory import MemoryCheckpoint
from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.io.writer import write_safetensors
from mergekit_pcb.machine import physical_memory
from mergekit_pcb.methods.compiled import request_all
from mergekit_pcb.recipe.schema import MergeRecipe, ModelEntry


@dataclass(frozen=True)
class WorkContext:
    """What every job of one run shares; `key` identifies it in a worker's cache."""

    key: str
    fitness: FitnessSpec
    root: str  # the recipe's directory: relative data and module paths
    model_ref: str | None  # config/tokenizer source for Hugging Face fitness
    merge: InnerMerge  # the population's merge (linear for the plain-merge row if none)
    base: str | None  # base model, when the inner merge needs it
    dtype: str | None  # the recipe's compute dtype for the merge
    seed: int
    layout: tuple[TensorSpec, ...]
    strategy: SearchStrategy
    allow_pickle: bool = False
    # `--device`: where the population is merged and scored (in a Ray worker, "cuda" is
    # the GPU Ray gave it)
    device: str = "cpu"


def member_key(i: int) -> str:
    """The model key of slot i in the population's merge recipe (DARE masks are keyed by
    position, so a recipe over the member files draws the same masks)."""
    return f"member-{i}"


def population_recipe(merge: InnerMerge, base: str | None, dtype: str | None, size: int,
                      seed: int) -> MergeRecipe:
    """The merge recipe of `size` members, as `pcbmerge run` would read it."""
    return MergeRecipe(
        merge_method=merge.merge_method, base_model=base,
        models=[ModelEntry(model=member_key(i)) for i in range(size)],
        parameters=merge.parameters, tensors=merge.tensors, postprocess=merge.postprocess,
        dtype=dtype, seed=seed)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrialJob:
    generation: int
    step: int
    plan: Step  # slot, donors, F, CR
    members: tuple[str, ...]  # every slot's member file
    merged: bool
    threshold: float  # what the trial must beat: merged fitness or the parent's fitness
    out_path: str  # where the trial is written when it beats the threshold
    margin: float = 0.0  # a trial must beat the threshold by more (parameters.margin)
    # parameters.accept: paired: the one-sided level its gain over the parent, example by
    # example on the fitting data, must pass (None: the papers' rule)
    paired: float | None = None
    spare: str | None = None  # a dead member file to overwrite in place instead
    batch: dict[str, int] | None = None  # the generation's mini-batch of the select data
    # The next step (merged mode, one worker with a spare core): built and merged on that
    # core while this trial is scored (`Runtime.prepare_next`).
    next_step: NextStep | None = None


@dataclass(frozen=True)
class NextStep:
    """The step after a job's: the generation's next, or the next generation's first
    (its plan drawn ahead, where the strategy's plan does not depend on the outcomes)."""

    generation: int
    step: int
    plan: Step


@dataclass(frozen=True)
class ScoreJob:
    members: tuple[str, ...]  # one model, or the members to merge
    merged: bool
    split: str
    batch: dict[str, int] | None = None  # a mini-batch of the split (None: all of it)
    # The first step of the search, prepared while this merge (the initial population's)
    # is scored, as a trial job prepares the step after it.
    then: TrialJob | None = None
    examples: bool = False  # also return each example's score (for a paired interval)


@dataclass
class JobResult:
    score: float
    member_score: float | None = None  # the trial's own fitness, when it was accepted
    accepted: bool = False
    checksum: int | None = None  # CRC-32 of the trial's file, when it was written
    examples: list[float] | None = None  # each example's score, when the job asked for them
    fitness_s: float = 0.0
    total_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Prepared:
    """A candidate built and merged ahead of its job: its trial (in buffer `bank`), the merge
    and the name the merge prepared the trial under."""

    trial: dict[str, torch.Tensor]
    merged: dict[str, torch.Tensor]
    identity: Hashable
    bank: int


def _held_trial(trial: dict[str, torch.Tensor], identity: Hashable) -> MemoryCheckpoint:
    """The trial as a member held in memory, named so that what a merge prepares for it is
    kept under `identity` in the memo."""
    held = MemoryCheckpoint("trial", trial)
    held.identity = identity
    return held


def _job_key(job: TrialJob) -> tuple[object, ...]:
    return (job.generation, job.step, job.plan, job.members)


class Runtime:
    """Per-process cache: evaluator, merge plans, open checkpoints."""

    def __init__(self, ctx: WorkContext) -> None:
        self.ctx = ctx
        self._evaluator: Evaluator | None = None  # built on first use: merges need none
        self.plans: dict[int, MergePlan] = {}  # by number of members merged
        self.cache = CheckpointCache()
        self.fitness_s = 0.0
        # Trial tensors and the crossover's draw live in buffers reused from one candidate
        # to the next: fresh model-sized allocations cost more than the math.
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self.scratch = Scratch()
        # Each member's trimmed (or dropped) task vectors, kept for the next candidate's
        # merge, which differs by one member.
        self.prepared = PreparedMemo(prepared_budget())
        self._writer: ThreadPoolExecutor | None = None  # started by the first kept trial
        # The next candidate, prepared on a spare core while this one is scored. The memo,
        # the plans and the open checkpoints are that thread's until it is joined, which the
        # job does before it returns: the executor's torch thread count holds only inside a
        # job, and the merge's bits depend on it.
        self._ahead: ThreadPoolExecutor | None = None
        self._pending: Future[Prepared] | None = None
        self._pending_key: tuple[object, ...] | None = None
        self._kept: collections.deque[bool] = collections.deque(maxlen=8)
        # parents' scores per example (accept: paired), by member file(s) and mini-batch: a
        # parent faces several trials, and its files are never rewritten under one name
        self._parent_examples: dict[Hashable, torch.Tensor] = {}
        if ctx.merge is not None:
            request_all()  # every candidate merges: the fused kernels pay for loading at once

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            ctx = self.ctx
            self._evaluator = build_evaluator(ctx.fitness, Path(ctx.root), ctx.model_ref,
                                              ctx.device)
        return self._evaluator

    def buffer(self, spec: TensorSpec, bank: int = 0) -> torch.Tensor | None:
        """The trial tensor's reused buffer in `bank`: a trial prepared ahead is built in the
        other bank than the trial being scored."""
        if spec.dtype not in (torch.float32, torch.float64):
            return None  # half precision goes through float32 temporaries
        buf = self._buffers.get((bank, spec.name))
        if buf is None:
            buf = torch.empty(spec.shape, dtype=spec.dtype)
            self._buffers[bank, spec.name] = buf
        return buf

    def write_behind(self, job: TrialJob, trial: dict[str, torch.Tensor]) -> Future[int]:
        """Start writing a kept trial to its member file on this runtime's writer thread;
        the future gives the file's CRC-32. The caller waits for it before it reports the
        trial kept, so no state names a file still being written."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="member-writer")
        return self._writer.submit(write_trial_file, self.ctx, job, trial)

    def likely_kept(self) -> bool:
        """Whether the trial being scored will more likely be kept, by the recent trials of
        this process: which next population to prepare while it is scored."""
        return 2 * sum(self._kept) > len(self._kept)

    def record(self, kept: bool) -> None:
        self._kept.append(kept)

    def prepare_next(self, job: TrialJob, trial: dict[str, torch.Tensor], identity: Hashable,
                     bank: int, *, kept: bool) -> None:
        """Start building and merging the generation's next candidate on another thread, on
        the population `job` leaves if its trial is `kept` (the trial, still in memory and
        prepared under `identity`, in its slot) or not. Replaces whatever was prepared."""
        following = job.next_step
        if following is None:
            return
        members = list(job.members)
        overrides: dict[int, Checkpoint] = {}
        if kept:  # its file is being written: the next candidate reads it from memory
            members[job.plan.slot] = job.out_path
            overrides[job.plan.slot] = _held_trial(trial, identity)
        upcoming = replace(job, generation=following.generation, step=following.step,
                           plan=following.plan, members=tuple(members), next_step=None)
        self.prepare(upcoming, overrides, 1 - bank)

    def prepare(self, upcoming: TrialJob, overrides: dict[int, Checkpoint] | None = None,
                bank: int = 0) -> None:
        """Start building `upcoming`'s trial (in buffer `bank`) and merging its candidate on
        another thread. Replaces whatever was prepared."""
        self.discard_prepared()
        if self._ahead is None:
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="next-candidate")
        self._pending_key = _job_key(upcoming)
        self._pending = self._ahead.submit(self._prepare, upcoming, overrides or {}, bank)

    def _prepare(self, job: TrialJob, overrides: dict[int, Checkpoint], bank: int
                 ) -> Prepared:
        trial = build_trial(self, job, bank=bank, overrides=overrides)
        identity = ("trial", "ahead", next(_TRIAL_NAMES))
        return Prepared(trial, self.merge_candidate(job, trial, identity, overrides),
                        identity, bank)

    def take_prepared(self, job: TrialJob) -> Prepared | None:
        """What was prepared, when it is `job`'s candidate (an error its build raised is
        raised here, as building here would); dropped either way."""
        pending, key = self._pending, self._pending_key
        self.discard_prepared()
        if pending is None or key != _job_key(job):
            return None
        return pending.result()

    def settle_prepared(self) -> None:
        """Wait until the next candidate's preparation is done (its result is kept)."""
        if self._pending is not None:
            wait([self._pending])

    def discard_prepared(self) -> None:
        """Join and drop what was being prepared."""
        pending, self._pending, self._pending_key = self._pending, None, None
        if pending is not None:
            wait([pending])

    def close(self) -> None:
        self.discard_prepared()
        if self._ahead is not None:
            self._ahead.shutdown()
            self._ahead = None
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        self.prepared.clear()
        self.cache.close()
        for plan in self.plans.values():
            plan.close()
        self.plans.clear()

    def score(self, state: dict[str, torch.Tensor], split: str,
              batch: dict[str, int] | None = None) -> float:
        start = time.perf_counter()
        try:
            return self.evaluator.score(state, split, batch)
        finally:
            self.fitness_s += time.perf_counter() - start

    def merge(self, members: list[Checkpoint]) -> dict[str, torch.Tensor]:
        """The merge engine's result over `members` (in slot order), as a state dict."""
        n = len(members)
        plan = self.plans.get(n)
        sources = {member_key(i): m for i, m in enumerate(members)}
        if plan is None:
            ctx = self.ctx
            recipe = population_recipe(ctx.merge, ctx.base, ctx.dtype, n, ctx.seed)
            plan = build_plan(recipe, "", allow_pickle=ctx.allow_pickle, sources=sources)
            # members were checked finite when they were written (inputs and trials alike)
            plan.check_finite = False
            if plan.base_key is not None:
                # every candidate reads the whole base: mapped, it is read in place, not
                # copied each time (the plan keeps owning it)
                plan.map_model(plan.base_key)
            self.plans[n] = plan
        merged = merge_in_memory(plan.rebind(sources), self.ctx.device, memo=self.prepared)
        # Keep what the population's members (the open files) prepared: a rejected trial's
        # parent merges again in a later candidate.
        self.prepared.keep_only([m.identity for m in members]
                                + [c.identity for c in self.cache.checkpoints()])
        return merged

    def members(self, job: TrialJob, overrides: dict[int, Checkpoint] | None = None
                ) -> list[Checkpoint]:
        """`job`'s members in slot order: open files, except the slots `overrides` holds in
        memory."""
        held = overrides or {}
        return [held[i] if i in held else self.cache.get(p) for i, p in enumerate(job.members)]

    def merge_candidate(self, job: TrialJob, trial: dict[str, torch.Tensor],
                        identity: Hashable, overrides: dict[int, Checkpoint] | None = None
                        ) -> dict[str, torch.Tensor]:
        """The merge of `job`'s members with `trial` in its slot. What the merge prepares for
        the trial is kept under `identity`: if the trial is accepted it becomes a member's,
        and the next candidate need not prepare it again."""
        ckpts = self.members(job, overrides)
        ckpts[job.plan.slot] = _held_trial(trial, identity)
        return self.merge(ckpts)

    def load(self, path: str) -> dict[str, torch.Tensor]:
        ckpt = self.cache.get(path)
        return {s.name: ckpt.read(s.name) for s in self.ctx.layout}

    def examples(self, state: dict[str, torch.Tensor], batch: dict[str, int] | None
                 ) -> torch.Tensor:
        """`state`'s scores per example on the fitting data (or its mini-batch)."""
        start = time.perf_counter()
        try:
            scores = example_scores(self.evaluator, state, "select", batch)
        finally:
            self.fitness_s += time.perf_counter() - start
        if scores is None:  # the recipe check refuses this first
            raise UserError("parameters.accept: paired needs a fitness with scores per example")
        return scores

    def paired_gain(self, job: TrialJob, candidate: dict[str, torch.Tensor]) -> bool:
        """Whether `candidate` (the trial, or the population merged with it) gains over its
        parent (the member in its slot, or the population's merge) example by example, by
        a one-sided paired bootstrap test at `job.paired`."""
        assert job.paired is not None
        parent_files = job.members if job.merged else (job.members[job.plan.slot],)
        key = (parent_files, tuple(sorted(job.batch.items())) if job.batch else None)
        parent = self._parent_examples.get(key)
        if parent is None:
            state = self.merge(self.members(job)) if job.merged else self.load(parent_files[0])
            parent = self.examples(state, job.batch)
            if len(self._parent_examples) >= 256:  # bounded: old populations are not asked
                self._parent_examples.clear()
            self._parent_examples[key] = parent
        return paired_gain_holds(self.examples(candidate, job.batch), parent,
                                 maximize=self.evaluator.maximize, level=job.paired,
                                 seed=self.ctx.seed)


def prepared_budget() -> int:
    """Bytes of prepared tensors one process keeps: an eighth of the machine's memory (a
    population that needs more is partly prepared again, least recently used first)."""
    return physical_memory() // 8


_RUNTIME: ProcessLocal[Runtime] = ProcessLocal()
_TRIAL_NAMES = itertools.count()


def runtime(ctx: WorkContext) -> Runtime:
    return _RUNTIME.get(ctx.key, lambda: Runtime(ctx))


def opened_paths() -> set[str]:
    """The member files this process's current runtime has opened."""
    rt = _RUNTIME.current()
    return set(rt.cache.opened) if rt is not None else set()


def mask_generator(seed: int, generation: int, step: int, name: str) -> torch.Generator:
    """Crossover masks keyed by (seed, generation, step, tensor): no state to carry over."""
    return tensor_generator(seed, name, f"trial/{generation}/{step}")


def build_trial(rt: Runtime, job: TrialJob, bank: int = 0,
                overrides: dict[int, Checkpoint] | None = None) -> dict[str, torch.Tensor]:
    """The trial, tensor by tensor, as the strategy makes it from the slot's member and its
    donors (`overrides`: slots held in memory); checked finite, since it will be merged and
    stored unchecked. Built in the reused buffers of `bank`."""
    ckpts = rt.members(job, overrides)
    rt.cache.keep_only(job.members)
    step = job.plan
    parent = ckpts[step.slot]
    strategy = rt.ctx.strategy
    trial: dict[str, torch.Tensor] = {}
    for spec in rt.ctx.layout:
        target = parent.read(spec.name)
        if not spec.dtype.is_floating_point:
            trial[spec.name] = target  # integer buffers (step counters) follow the parent
            continue
        g = mask_generator(rt.ctx.seed, job.generation, job.step, spec.name)
        donors = [ckpts[i].read(spec.name) for i in step.donors]
        t = strategy.trial_tensor(target, donors, step, g, rt.buffer(spec, bank), rt.scratch)
        if not all_finite(t):
            raise UserError(f"generation {job.generation + 1}, step {job.step}: the trial's "
                            f"tensor '{spec.name}' overflows to NaN or Inf (F={step.F})")
        trial[spec.name] = t
    return trial


def run_trial(item: tuple[WorkContext, TrialJob]) -> JobResult:
    ctx, job = item
    rt = runtime(ctx)
    try:
        return _run_trial(rt, ctx, job)
    except BaseException:
        rt.discard_prepared()  # nothing runs on past a failed job
        raise


def _run_trial(rt: Runtime, ctx: WorkContext, job: TrialJob) -> JobResult:
    start = time.perf_counter()
    rt.fitness_s = 0.0
    ready = rt.take_prepared(job)  # built and merged while the step before was scored
    bank = 0 if ready is None else ready.bank
    trial = build_trial(rt, job) if ready is None else ready.trial
    t_built = time.perf_counter()
    maximize = rt.evaluator.maximize
    member_score = None
    # a fresh name for every build: a speculative step that was discarded is built again
    # from other members, under the same out_path, and must not find the old one's entries
    trial_identity = ("trial", job.out_path, next(_TRIAL_NAMES)) if ready is None \
        else ready.identity
    writing: Future[int] | None = None
    if job.merged:
        merged = rt.merge_candidate(job, trial, trial_identity) if ready is None \
            else ready.merged
        # The next candidate's population depends on this trial's fate: prepare the likelier
        # one while this one is scored, and the other if the guess was wrong and there is
        # time (the kept trial's own score).
        guess = rt.likely_kept()
        rt.prepare_next(job, trial, trial_identity, bank, kept=guess)
        score = rt.score(merged, "select")
        accepted = better(score, bar(job, maximize), maximize)
        if accepted and job.paired is not None:
            accepted = rt.paired_gain(job, merged)
        del merged
        rt.record(accepted)
        if accepted:
            if not guess:
                rt.prepare_next(job, trial, trial_identity, bank, kept=True)
            # The kept trial's own score is a second fitness call: its file is written
            # meanwhile, on another thread (both only read the trial's tensors).
            writing = rt.write_behind(job, trial)
            try:
                member_score = rt.score(trial, "select")
            except BaseException:
                wait([writing])  # nothing is left writing behind a failed fitness
                raise
    else:
        score = rt.score(trial, "select", job.batch)
        accepted = better(score, bar(job, maximize), maximize)
        if accepted and job.paired is not None:
            accepted = rt.paired_gain(job, trial)
        member_score = score
    t_scored = time.perf_counter()
    rt.settle_prepared()  # before the memo's rename below, and within this job's threads
    checksum = None
    if writing is not None:
        checksum = writing.result()
        rt.prepared.rename(trial_identity, file_identity(Path(job.out_path)))
    elif accepted:
        checksum = write_trial_file(ctx, job, trial)
    end = time.perf_counter()
    return JobResult(score, member_score if accepted else None, accepted, checksum,
                     rt.fitness_s, end - start,
                     {"build": t_built - start, "write": end - t_scored})


def bar(job: TrialJob, maximize: bool) -> float:
    """What a trial's score must beat: its threshold moved by the margin, the way that asks
    for more."""
    return job.threshold + job.margin if maximize else job.threshold - job.margin


def write_trial_file(ctx: WorkContext, job: TrialJob, trial: dict[str, torch.Tensor]) -> int:
    """Write a kept trial to `job.out_path` (over the job's spare file, if any); its CRC-32."""
    return write_safetensors(Path(job.out_path), list(ctx.layout), trial.items(),
                             reuse=Path(job.spare) if job.spare else None)


def run_score(item: tuple[WorkContext, ScoreJob]) -> JobResult:
    ctx, job = item
    start = time.perf_counter()
    rt = runtime(ctx)
    rt.fitness_s = 0.0
    rt.discard_prepared()  # the plans and the memo are this thread's again
    if job.merged:
        state = rt.merge([rt.cache.get(p) for p in job.members])
        if job.then is not None:
            rt.prepare(job.then)
    else:
        state = rt.load(job.members[0])
    try:
        score = rt.score(state, job.split, job.batch)
    except BaseException:
        rt.discard_prepared()  # nothing runs on past a failed job
        raise
    rt.settle_prepared()  # within this job's threads
    per_example = example_scores(rt.evaluator, state, job.split) if job.examples else None
    return JobResult(score, fitness_s=rt.fitness_s, total_s=time.perf_counter() - start,
                     examples=None if per_example is None else per_example.tolist())


__all__ = ["JobResult", "NextStep", "Prepared", "ScoreJob", "TrialJob", "WorkContext",
           "build_trial", "member_key", "opened_paths", "population_recipe", "run_score",
           "run_trial", "runtime", "write_trial_file"]
