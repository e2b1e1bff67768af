"""The evolution engine: population store, run state, speculative parallel scoring, resume.

One *step* handles one slot of the population: build a trial, score it, accept or reject.
After every step the run state is written atomically, so a run killed at any moment
resumes from the last committed step and, every random choice being a function of the
seed and the committed state, ends with the same result as an uninterrupted run.

Steps are sequential by definition (an accepted trial changes what later steps see). With
K workers the engine scores the next K steps at once against the committed population and
commits their results in order; a result whose inputs were changed by an earlier accepted
step in the same batch is discarded and recomputed. The committed sequence is therefore
exactly the serial one, whatever K is (which is also what gives immediate selection: a kept
trial is a donor for the steps after it).

A strategy may keep a state in the run state (`search`, updated after each generation from
the steps' `outcomes`), and may draw a mini-batch of the select data per generation: the
members are then rescored on it before the first step (committed with the plan), and the
result is the member best on the whole select data (`final_select`).

With a guard (`fitness.guard` or `guard_fraction`), trials are still kept on the select
data (the fitting part), and the guard scores the starting points once, each generation's
best (never a trial) and, at the end, the final member best on select and two soups of the
final population; the result is the candidate best on the guard (`state["guard"]`), whose
files are kept until a better one replaces it, and `patience` stops the run when no
generation has raised the guard's best for that many generations. That candidate replaces
the best starting point only if its gain per guard example passes a one-sided paired test
(`fitness.guard_level`; fitness kinds without scores per example skip the test), the
outcome committed as `state["guard"]["test"]`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.engine import build_plan
from mergekit_pcb.engine.stream import all_finite
from mergekit_pcb.errors import CheckpointError, UserError
from mergekit_pcb.evolve.config import EvolutionRecipe, InnerMerge, Settings, fingerprint
from mergekit_pcb.evolve.executor import Executor
from mergekit_pcb.evolve.fitness import (
    GUARD,
    better,
    check_resumed_device,
    code_refs,
    device_kind,
)
from mergekit_pcb.evolve.jobs import (
    JobResult,
    NextStep,
    ScoreJob,
    TrialJob,
    WorkContext,
    build_trial,
    member_key,
    population_recipe,
    prepared_budget,
    run_score,
    run_trial,
    runtime,
    write_trial_file,
)
from mergekit_pcb.evolve.operators import interpolate
from mergekit_pcb.evolve.replica import PopulationLog
from mergekit_pcb.evolve.stats import guard_test
from mergekit_pcb.evolve.store import RunDir, TensorSpec, layout_of
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.files import resolve_data_file
from mergekit_pcb.io.mapped import open_readable
from mergekit_pcb.io.reader import Checkpoint, TensorInfo
from mergekit_pcb.io.writer import file_crc32, prepare_run_dir, write_safetensors
from mergekit_pcb.recipe.schema import ModelEntry
from mergekit_pcb.usercode import code_digest

STATE_FORMAT = 2  # 2: member checksums
# Identity keys added to format 2 later: a state without them still resumes.
RECORDED_SINCE_FORMAT_2 = frozenset({"code", "base_weights"})
# Identity keys recorded only when set away from their default (`Settings.identity`): a
# state that has one differs from settings that have it not.
RECORDED_WHEN_SET = frozenset({"margin", "accept", "accept_level"})


def rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, data: list[Any]) -> None:
    rng.setstate((data[0], tuple(data[1]), data[2]))


@dataclass
class Progress:
    """What a live display is told after every committed step."""

    state: dict[str, Any]
    settings: Settings
    maximize: bool


@dataclass
class EvolutionRun:
    recipe: EvolutionRecipe
    recipe_text: str
    root: Path  # the recipe's directory
    settings: Settings
    run_dir: RunDir
    executor: Executor
    on_progress: Callable[[Progress], None] | None = None
    allow_pickle: bool = False
    inputs: list[Path] = field(default_factory=list)  # never to be touched (models, output)
    device: str = "cpu"  # `--device`: where the population is merged and scored
    _state: dict[str, Any] = field(default_factory=dict)
    _rng: random.Random = field(default_factory=random.Random)
    _mark: float = 0.0
    _spares: list[str] = field(default_factory=list)
    # what workers without a shared filesystem need to hold the members the driver holds
    population: PopulationLog = field(default_factory=PopulationLog)

    # ------------------------------------------------------------------ setup

    def __post_init__(self) -> None:
        refs = self.recipe.population_refs()
        allow_pickle = self.allow_pickle
        ckpts = [open_checkpoint(r, allow_pickle=allow_pickle) for r in refs]
        base = (open_checkpoint(self.recipe.base_model, allow_pickle=allow_pickle)
                if self.recipe.base_model else None)
        try:
            self.layout: list[TensorSpec] = layout_of(ckpts, base)
        finally:
            for c in ckpts:
                c.close()
            if base is not None:
                base.close()
        spec = self.recipe.fitness
        self.maximize = spec.maximize
        # the plain-merge row needs a merge even in standalone mode without a merge: block
        merge = self.recipe.merge or InnerMerge(merge_method="linear")
        self._check_inner_merge(merge, refs)
        identity = self.identity()
        self.ctx = WorkContext(
            key=fingerprint([identity, str(self.run_dir.root)]), fitness=spec,
            root=str(self.root), model_ref=spec.model or self.recipe.base_model or refs[0],
            merge=merge, base=self.recipe.base_model, dtype=self.recipe.dtype,
            seed=self.settings.seed, layout=tuple(self.layout),
            strategy=self.settings.strategy, allow_pickle=allow_pickle, device=self.device,
        )
        # Preparing the next candidate ahead holds a second trial and merge in memory.
        model_bytes = sum(math.prod(t.shape) * t.dtype.itemsize for t in self.layout)
        # Not with accept: paired, whose parent merge (once per population) would share the
        # prepared memo with the thread preparing ahead.
        self._prepare_ahead = self.settings.merged and 2 * model_bytes <= prepared_budget() \
            and self.settings.strategy.params.accept != "paired"

    def _check_inner_merge(self, merge: InnerMerge, refs: list[str]) -> None:
        """Plan the population's merge over the input models themselves: every check the
        merge engine makes (parameters, routing, shapes) fails now, naming real models."""
        recipe = population_recipe(merge, self.recipe.base_model, self.recipe.dtype,
                                   len(refs), self.settings.seed)
        recipe = recipe.model_copy(update={"models": [ModelEntry(model=r) for r in refs]})
        build_plan(recipe, "", allow_pickle=self.allow_pickle).close()

    def population_plan_info(self, size: int) -> dict[str, Any]:
        """Passes and bytes read by one merge of `size` members (headers only, no data)."""
        recipe = population_recipe(self.ctx.merge, self.recipe.base_model, self.recipe.dtype,
                                   size, self.settings.seed)
        infos = {t.name: TensorInfo(t.name, t.dtype, t.shape, Path("<member>"), 0, t.nbytes)
                 for t in self.layout}
        sources = {member_key(i): Checkpoint(member_key(i), Path("<member>"), infos)
                   for i in range(size)}
        plan = build_plan(recipe, "", allow_pickle=self.allow_pickle, sources=sources)
        try:
            return {"passes": plan.passes, "read_bytes": plan.read_bytes}
        finally:
            plan.close()

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        spec = self.recipe.fitness
        data = {}
        for split in ("select", "report", "guard"):
            ref = getattr(spec, split)
            if ref is not None:
                path = resolve_data_file(ref, self.root, f"fitness.{split}")
                data[split] = fingerprint([path.stat().st_size, _file_digest(path)])
        fitness = spec.model_dump()
        if not spec.guarded:  # the run states of earlier versions, without these keys, resume
            for key in ("guard", "guard_fraction", "guard_seed"):
                del fitness[key]
        if fitness["guard_level"] is None:  # unset: the states before it resume
            del fitness["guard_level"]
        return {
            **self.settings.identity(),
            "models": self.recipe.population_refs(),
            "base_model": self.recipe.base_model,
            "merge": _merge_identity(self.recipe.merge),
            "fitness": fitness,
            "data": data,
            # the fitness code's source: a changed module would score another way
            "code": {key: code_digest(ref, self.root) for key, ref in code_refs(spec)},
            # a GPU run records its device (a CPU run's state is as before --device)
            **({} if device_kind(self.device) == "cpu"
               else {"device": device_kind(self.device)}),
        }

    def _full_identity(self) -> dict[str, Any]:
        """`identity()` plus the base's weights digest (read in full, so only at the start
        of a run and of a resume)."""
        base = self.recipe.base_model
        digest = None
        if base is not None:
            with open_checkpoint(base, allow_pickle=self.allow_pickle) as ckpt:
                files = sorted({i.file for i in ckpt.tensors.values()})
            digest = fingerprint([_file_digest(f) for f in files])
        return {**self.identity(), "base_weights": digest}

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> dict[str, Any]:
        return self._state

    def _tick(self) -> None:
        """Add the wall time since the last tick to the current generation's."""
        now = time.perf_counter()
        self._state["current"]["wall_s"] += now - self._mark
        self._mark = now

    def _commit(self, *, durable: bool = False) -> None:
        """Account wall time, store the RNG state and write the state atomically.

        Every step is safe against a kill (atomic rename); `durable` commits (end of the
        initialization and of each generation) are also flushed to the disk.
        """
        self._tick()
        self._state["rng"] = {"controller": rng_state(self._rng)}
        self.run_dir.save_state(self._state, durable=durable)
        if self.on_progress is not None:
            self.on_progress(Progress(self._state, self.settings, self.maximize))

    def start(self, *, resume: bool, force: bool) -> None:
        prepare_run_dir(self.run_dir.root, force=force, inputs=self.inputs, resume=resume)
        self.executor.track(self.population, self.run_dir.members)
        existing = self.run_dir.load_state()
        self._mark = time.perf_counter()
        if resume:
            if existing is None:
                raise UserError(f"--resume: no run state in {self.run_dir.root} (nothing to "
                                "resume; start the run without --resume)")
            self._check_identity(existing)
            self._check_members(existing)
            self._state = existing
            self._state["generations"] = self.settings.generations
            if existing["phase"] == "done" and existing["generation"] < self.settings.generations \
                    and self.stop_reason() is None:
                self._state["phase"] = "evolve"  # more generations asked for: go on
                self._state.pop("final_select", None)  # the result is chosen again at the end
                if "guard" in self._state:
                    self._state["guard"]["final"] = None
                    self._state["guard"].pop("test", None)  # made again after the final
            self._check_resumable(existing)
            if existing["phase"] == "init":
                self._initialize()
            else:
                self.population.reset(self._state["checksums"])
            return
        self._initialize()

    def _check_resumable(self, existing: dict[str, Any]) -> None:
        """Restore the RNG and check the generation plan against the population: a state
        edited by hand must fail here, not loop or index out of range later."""
        pop = self.settings.pop
        where = f"corrupt run state {self.run_dir.state_path}"
        try:
            set_rng_state(self._rng, existing["rng"]["controller"])
            if existing["phase"] != "init" and len(existing["members"]) != pop:
                raise ValueError(f"{len(existing['members'])} members for a population of {pop}")
            strategy = self.settings.strategy
            if strategy.initial_state() is not None:
                if not isinstance(existing.get("search"), dict) \
                        or not isinstance(existing.get("outcomes"), list):
                    raise ValueError("no strategy state ('search', 'outcomes')")
                strategy.check_state(existing["search"])
            if existing["plan"] is not None:
                batch = strategy.batch(existing["plan"])
                if batch is not None and not all(
                        isinstance(batch.get(k), int) and batch[k] >= lo
                        for k, lo in (("seed", 0), ("size", 1))):
                    raise ValueError("the plan's mini-batch is not {seed, size}")
                for position in range(pop):
                    step = self.settings.strategy.step(existing["plan"], position)
                    if not all(0 <= i < pop for i in (step.slot, *step.donors)):
                        raise ValueError(f"step {position} names a slot outside the population")
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where} ({e})") from None

    def _check_identity(self, existing: dict[str, Any]) -> None:
        if existing.get("format") != STATE_FORMAT:
            raise UserError(f"--resume: {self.run_dir.state_path} was written by another "
                            "version of the engine")
        mine, theirs = self._full_identity(), existing.get("identity", {})
        if not isinstance(theirs, dict):
            raise UserError(f"--resume: {self.run_dir.state_path} has no valid identity")
        check_resumed_device(theirs.get("device"), self.device, self.run_dir.root)
        for key, value in mine.items():
            if key in RECORDED_SINCE_FORMAT_2 and key not in theirs:
                continue  # a run started before these were recorded
            if theirs.get(key) != value:
                raise UserError(f"--resume: '{key}' differs from the run in {self.run_dir.root} "
                                f"(was {theirs.get(key)!r}, now {value!r}); start over with "
                                "--force")
        for key in sorted(RECORDED_WHEN_SET & (theirs.keys() - mine.keys())):
            raise UserError(f"--resume: '{key}' differs from the run in {self.run_dir.root} "
                            f"(was {theirs[key]!r}, now the default); start over with --force")

    def _check_members(self, existing: dict[str, Any]) -> None:
        """Every member the state names must read back as it was written."""
        if existing["phase"] == "init":
            return  # the initial population is rewritten whole
        checksums = existing.get("checksums", {})
        for name in dict.fromkeys([*existing["members"], *existing["initial"]["members"],
                                   *_guard_files(existing, self.maximize)]):
            if not isinstance(name, str) or Path(name).name != name:
                raise CheckpointError(f"corrupt run state {self.run_dir.state_path} (member "
                                      f"name {str(name)[:40]!r})")
            path = self.run_dir.member_path(name)
            if not path.is_file():
                raise UserError(f"--resume: member file {path} is missing; start over with "
                                "--force")
            if file_crc32(path) != checksums.get(name):
                raise UserError(
                    f"--resume: member file {path} does not hold what was written (checksum "
                    "mismatch: the machine may have gone down before it reached the disk); "
                    "start over with --force")

    def _initialize(self) -> None:
        """Write the initial population and score it (redone whole if interrupted)."""
        s = self.settings
        self._rng = random.Random(s.seed)
        self._state = {
            "format": STATE_FORMAT, "identity": self._full_identity(), "phase": "init",
            "generations": s.generations, "generation": 0, "step": 0, "plan": None,
            "members": [], "fitness": [], "objective": None, "initial": {},
            "current": _fresh_counters(), "history": [], "evaluations": 0, "discarded": 0,
            "fitness_s": 0.0, "checksums": {},
        }
        search = s.strategy.initial_state()
        if search is not None:  # only strategies with a state add these keys
            self._state.update({"search": search, "outcomes": []})
        self.run_dir.create()
        self._commit()
        refs = self.recipe.population_refs()
        names = []
        checksums = {}
        for k, ref in enumerate(refs):
            name = f"init-{k:03d}.safetensors"
            with open_checkpoint(ref, allow_pickle=self.allow_pickle) as ckpt:
                checksums[name] = write_safetensors(
                    self.run_dir.member_path(name), self.layout,
                    ((t.name, _finite(ckpt.read(t.name), t.name, ref).to(t.dtype))
                     for t in self.layout))
            names.append(name)
        if self.recipe.base_model:  # members are merged unchecked: check the base once too
            with open_checkpoint(self.recipe.base_model, allow_pickle=self.allow_pickle) as b:
                for t in self.layout:
                    if t.name in b and t.dtype.is_floating_point:
                        _finite(b.read(t.name), t.name, self.recipe.base_model)
        # how each member of generation 0 was made: evolution.json lists them all
        made: list[dict[str, Any]] = [{"input": ref} for ref in refs]
        for k in range(len(refs), s.pop):  # seeded interpolations of two input members
            a, b = self._rng.sample(range(len(refs)), 2)
            alpha = self._rng.random()
            name = f"init-{k:03d}.safetensors"
            made.append({"interpolate": [names[a], names[b]], "alpha": alpha})
            pa, pb = (open_readable(self._path(names[i])) for i in (a, b))
            with pa, pb:
                checksums[name] = write_safetensors(
                    self.run_dir.member_path(name), self.layout,
                    ((t.name, interpolate(pa.read(t.name), pb.read(t.name), alpha)
                      if t.dtype.is_floating_point else pa.read(t.name)) for t in self.layout))
            names.append(name)
        self.population.reset(checksums)
        paths = tuple(self._path(n) for n in names)
        jobs = [ScoreJob((p,), False, "select") for p in paths]
        merged_mode = s.merged
        jobs.append(ScoreJob(paths[: len(refs)], True, "select"))  # the plain merge
        if merged_mode and s.pop > len(refs):
            jobs.append(ScoreJob(paths, True, "select"))
        if merged_mode:  # while the population's merge is scored, prepare the first step
            jobs[-1] = replace(jobs[-1], then=self._first_trial(paths))
        starts = self._starting_points(names[: len(refs)])
        if self.recipe.fitness.guarded:  # the starting points on the guard, once
            jobs += [ScoreJob(tuple(self._path(n) for n in c["files"]), c["merged"], GUARD)
                     for c in starts]
        results = self._score(jobs)
        fitness = [r.score for r in results[: s.pop]]
        plain = results[s.pop].score
        scored = len(jobs) - (len(starts) if self.recipe.fitness.guarded else 0)
        objective = (results[scored - 1].score if merged_mode else self._best(fitness)[1])
        if self.recipe.fitness.guarded:
            for c, r, sel in zip(starts, results[scored:], [*fitness[: len(refs)], plain],
                                 strict=True):
                c.update({"select": sel, "guard": r.score})
            self._state["guard"] = {"candidates": starts, "final": None}
        self._state.update({
            "phase": "evolve", "members": names, "fitness": fitness, "objective": objective,
            "checksums": checksums,
            "initial": {"members": names[: len(refs)], "select": fitness[: len(refs)],
                        "merge_select": plain, "objective": objective,
                        "population": [{"member": n, "select": f, **m} for n, f, m
                                       in zip(names, fitness, made, strict=True)]},
            "evaluations": len(jobs),
        })
        self._tick()
        self._state["history"].append(self._record(0, accepted=0, evaluated=len(jobs),
                                                   F=None, CR=None))
        self._state["current"] = _fresh_counters()
        self._commit(durable=True)

    # ------------------------------------------------------------------ the loop

    def _path(self, name: str) -> str:
        return str(self.run_dir.member_path(name))

    def _score(self, jobs: Sequence[ScoreJob]) -> list[JobResult]:
        results = self.executor.map(run_score, [(self.ctx, j) for j in jobs])
        spent = sum(r.fitness_s for r in results)
        self._state["fitness_s"] += spent
        self._state["current"]["fitness_s"] += spent
        return results

    def _best(self, fitness: Sequence[float]) -> tuple[int, float]:
        best = self.best_index(fitness)
        return best, fitness[best]

    def best_index(self, scores: Sequence[float]) -> int:
        """The first of the best scores."""
        best = 0
        for i, f in enumerate(scores):
            if better(f, scores[best], self.maximize):
                best = i
        return best

    def _draw_plan(self, generation: int) -> dict[str, Any]:
        """The strategy's plan of a generation, from the controller RNG, drawn before any
        step runs (what lets steps be scored speculatively)."""
        s = self.settings
        return s.strategy.draw_generation(self._rng, generation, s.generations, s.pop,
                                          self._state.get("search"))

    def _rescore_on_batch(self) -> None:
        """A generation with its own mini-batch of the select data starts by scoring every
        member on it, so that a trial and its parent are compared on the same rows (the
        scores are committed with the plan: a resume never redoes them)."""
        st = self._state
        batch = self.settings.strategy.batch(st["plan"])
        if batch is None:
            return
        jobs = [ScoreJob((self._path(n),), False, "select", batch) for n in st["members"]]
        st["fitness"] = [r.score for r in self._score(jobs)]
        st["objective"] = self._best(st["fitness"])[1]
        st["evaluations"] += len(jobs)

    def _referenced(self) -> list[str]:
        """The member files the state names: the population, the starting members, and the
        files of the best candidate on the guard (the result, if nothing beats it)."""
        st = self._state
        return list(dict.fromkeys([*st["members"], *st["initial"]["members"],
                                   *_guard_files(st, self.maximize)]))

    def _tidy(self) -> None:
        """Keep one spare member file per worker for accepted trials to overwrite."""
        self._spares = self.run_dir.collect_garbage(self._referenced(),
                                                    spares=self.executor.workers)

    def _trial_job(self, position: int, spare: str | None) -> TrialJob:
        st = self._state
        step = self.settings.strategy.step(st["plan"], position)
        merged = self.settings.merged
        gen = st["generation"]
        return TrialJob(
            generation=gen, step=position, plan=step,
            members=tuple(self._path(n) for n in st["members"]),
            merged=merged,
            threshold=st["objective"] if merged else st["fitness"][step.slot],
            margin=self.settings.strategy.params.margin,
            paired=self.settings.strategy.params.accept_level
            if self.settings.strategy.params.accept == "paired" else None,
            out_path=self._path(f"g{gen + 1:04d}-s{position:04d}.safetensors"),
            spare=self._path(spare) if spare else None,
            batch=self.settings.strategy.batch(st["plan"]),
            next_step=self._next_step(position)
            if self._prepare_ahead and self.executor.spare_core else None,
        )

    def _first_trial(self, paths: tuple[str, ...]) -> TrialJob | None:
        """The search's first step, as `run` will make it (for the initial scoring to
        prepare ahead; its threshold, not yet known, takes no part in that)."""
        if not (self._prepare_ahead and self.executor.spare_core):
            return None
        plan = self._plan_ahead(0)
        if plan is None:
            return None
        strategy = self.settings.strategy
        return TrialJob(generation=0, step=0, plan=strategy.step(plan, 0), members=paths,
                        merged=True, threshold=0.0,
                        out_path=self._path("g0001-s0000.safetensors"))

    def _plan_ahead(self, generation: int) -> dict[str, Any] | None:
        """`generation`'s plan, drawn now from a copy of the controller RNG as `run` will
        draw it: not when the strategy adapts to the outcomes, or the generation starts by
        scoring the members on a mini-batch (None then)."""
        st, strategy = self._state, self.settings.strategy
        if generation >= st["generations"] or "search" in st:
            return None
        rng = random.Random()
        rng.setstate(self._rng.getstate())
        plan = strategy.draw_generation(rng, generation, self.settings.generations,
                                        self.settings.pop, None)
        return None if strategy.batch(plan) is not None else plan

    def _next_step(self, position: int) -> NextStep | None:
        """The step after `position`: in this generation, or the next generation's first
        when its plan can be drawn now (`_plan_ahead`)."""
        st, strategy = self._state, self.settings.strategy
        if position + 1 < self.settings.pop:
            return NextStep(st["generation"], position + 1,
                            strategy.step(st["plan"], position + 1))
        plan = self._plan_ahead(st["generation"] + 1)
        return None if plan is None else NextStep(st["generation"] + 1, 0,
                                                  strategy.step(plan, 0))

    def _write_trial(self, job: TrialJob, checksum: int | None) -> None:
        """An accepted trial scored on a worker's own copy: the driver builds it from the
        same members and seeds and stores it; its bytes must be the worker's."""
        trial = build_trial(runtime(self.ctx), job)
        crc = write_trial_file(self.ctx, job, trial)
        if crc != checksum:
            raise CheckpointError(
                f"generation {job.generation + 1}, step {job.step}: the trial built on the "
                f"driver differs from the worker's (CRC-32 {crc:#010x} against "
                f"{checksum!r}); the trial's build is not deterministic across machines")

    def _reads(self, job: TrialJob) -> set[int]:
        if job.merged:
            return set(range(self.settings.pop))
        return self.settings.strategy.reads(job.plan)

    def run(self) -> None:
        st = self._state
        pop = self.settings.pop
        self._tidy()
        while st["phase"] == "evolve" and st["generation"] < st["generations"] \
                and self.stop_reason() is None:
            if st["plan"] is None:
                st["plan"] = self._draw_plan(st["generation"])
                self._rescore_on_batch()
                self._commit()
            end = min(st["step"] + self.executor.workers, pop)
            spares = self._spares + [None] * (end - st["step"])
            jobs = [self._trial_job(p, spares[k]) for k, p in enumerate(range(st["step"], end))]
            results = self.executor.map(run_trial, [(self.ctx, j) for j in jobs])
            changed: set[int] = set()
            used = 0
            for job, res in zip(jobs, results, strict=True):
                if self._reads(job) & changed:
                    break  # computed on members an earlier step replaced: redo it
                used += 1
                st["fitness_s"] += res.fitness_s
                st["current"]["fitness_s"] += res.fitness_s
                st["current"]["evaluated"] += 1
                st["evaluations"] += 1
                slot = job.plan.slot
                if "outcomes" in st:  # what the strategy adapts to at the generation's end
                    st["outcomes"].append({"accepted": res.accepted, "parent": job.threshold,
                                           "trial": res.score})
                if res.accepted:
                    old, new = st["members"][slot], Path(job.out_path).name
                    if not self.executor.shares_files:
                        self._write_trial(job, res.checksum)
                    st["members"][slot] = new
                    st["checksums"][new] = res.checksum
                    if old not in self._referenced():
                        del st["checksums"][old]
                    assert res.member_score is not None
                    st["fitness"][slot] = res.member_score
                    st["objective"] = (res.score if job.merged
                                       else self._best(st["fitness"])[1])
                    st["current"]["accepted"] += 1
                    changed.add(slot)
                    self.population.accept(job, st["checksums"])
                st["step"] += 1
                self._commit()
            st["discarded"] += len(jobs) - used
            self._tidy()  # replaced members and discarded trials become spares
            if st["step"] == pop:
                cur, plan = st["current"], st["plan"]
                self._tick()
                st["generation"] += 1
                st["history"].append(self._record(st["generation"], accepted=cur["accepted"],
                                                  evaluated=cur["evaluated"], F=plan["F"],
                                                  CR=plan["CR"]))
                if "search" in st:
                    st["search"] = self.settings.strategy.end_generation(
                        st["search"], plan, st["outcomes"])
                    st["outcomes"] = []
                if "guard" in st:
                    self._guard_generation()
                st["step"], st["plan"] = 0, None
                st["current"] = _fresh_counters()
                self._commit(durable=True)
        if st["phase"] == "evolve":
            st["phase"] = "done"
            self._commit()
        if self.settings.strategy.batched and "final_select" not in st:
            # members were compared on mini-batches: the result is the best on all of select
            jobs = [ScoreJob((self._path(n),), False, "select") for n in st["members"]]
            st["final_select"] = [r.score for r in self._score(jobs)]
            st["evaluations"] += len(jobs)
            self._commit()
        if "guard" in st and st["guard"]["final"] is None:
            self._guard_final()
            self._commit()
        if "guard" in st and "test" not in st["guard"]:
            self._guard_test()
            self._commit()
        self.run_dir.collect_garbage(self._referenced())  # spares

    def _record(self, generation: int, *, accepted: int, evaluated: int, F: float | None,
                CR: float | None) -> dict[str, Any]:
        st = self._state
        fitness = st["fitness"]
        cur = st["current"]
        return {
            "generation": generation,
            "objective": st["objective"],
            "best": self._best(fitness)[1],
            "mean": sum(fitness) / len(fitness),
            "accepted": accepted, "evaluated": evaluated,
            "acceptance_rate": accepted / evaluated if evaluated and generation else None,
            "F": F, "CR": CR,
            "wall_s": cur["wall_s"],
            "fitness_s": cur["fitness_s"],
        }

    # ------------------------------------------------------------------ the guard

    def _starting_points(self, inputs: list[str]) -> list[dict[str, Any]]:
        """The candidates a guarded result is chosen from before any search: each input
        member and their plain merge (the closing table's first rows)."""
        refs = self.recipe.population_refs()
        starts: list[dict[str, Any]] = [
            {"label": f"input {Path(ref).name or ref}", "files": [name], "merged": False,
             "generation": 0} for ref, name in zip(refs, inputs, strict=True)]
        label = self.settings.strategy.merge_row_label(self.ctx.merge.merge_method)
        starts.append({"label": label, "files": list(inputs), "merged": True,
                       "generation": 0})
        return starts

    def _guard_scores(self, groups: Sequence[Sequence[str]], split: str = GUARD
                      ) -> list[float]:
        """Each group of member names scored on `split` (a group of one as itself, more as
        their merge), counted as evaluations."""
        jobs = [ScoreJob(tuple(self._path(n) for n in g), len(g) > 1, split) for g in groups]
        self._state["evaluations"] += len(jobs)
        return [r.score for r in self._score(jobs)]

    def _guard_generation(self) -> None:
        """Score the generation's best on the guard (the one guard evaluation a generation
        makes): the merged population, or the member best on the fitting data."""
        st = self._state
        g = st["generation"]
        if self.settings.merged:
            c = {"label": f"generation {g}: merged population", "files": list(st["members"]),
                 "merged": True, "select": st["objective"]}
        else:
            i, f = self._best(st["fitness"])
            c = {"label": f"generation {g}: best member", "files": [st["members"][i]],
                 "merged": False, "select": f}
            if self.settings.strategy.batched:  # its select score is on the generation's
                c["select_on"] = "batch"  # mini-batch: no tie-break against the others
        c["guard"] = self._guard_scores([c["files"]])[0]
        c["generation"] = g
        st["guard"]["candidates"].append(c)
        keep = set(self._referenced())  # the files of a former best are no longer kept
        st["checksums"] = {k: v for k, v in st["checksums"].items() if k in keep}

    def _guard_final(self) -> None:
        """The end-of-run candidates: the final member best on all of the select data
        (mini-batch searches), and for searches over single members, two soups of the final
        population: its uniform merge and a greedy soup on the guard (members added best
        on the guard first, each kept only if the guard does not fall)."""
        st = self._state
        final: list[dict[str, Any]] = []
        if "final_select" in st:
            i, f = self._best(st["final_select"])
            final.append({"label": "final population: best member on select",
                          "files": [st["members"][i]], "merged": False, "select": f})
            final[-1]["guard"] = self._guard_scores([final[-1]["files"]])[0]
        if not self.settings.merged:
            members = list(dict.fromkeys(st["members"]))
            own = self._guard_scores([[m] for m in members])
            order = sorted(range(len(members)), key=lambda k: own[k],
                           reverse=self.maximize)
            soup, soup_guard = [members[order[0]]], own[order[0]]
            for k in order[1:]:
                trial = self._guard_scores([[*soup, members[k]]])[0]
                if not better(soup_guard, trial, self.maximize):  # the guard did not fall
                    soup, soup_guard = [*soup, members[k]], trial
            label = self.settings.strategy.merge_row_label(self.ctx.merge.merge_method)
            uniform = self._guard_scores([members])[0]
            final += [
                {"label": f"final population: {label}", "files": members,
                 "merged": True, "guard": uniform},
                {"label": f"final population: greedy soup on the guard ({len(soup)} of "
                          f"{len(members)})", "files": soup, "merged": len(soup) > 1,
                 "guard": soup_guard}]
            selects = self._guard_scores([c["files"] for c in final[-2:]], "select")
            for c, sel in zip(final[-2:], selects, strict=True):
                c["select"] = sel
        for c in final:
            c["generation"] = st["generation"]
        st["guard"]["final"] = final

    def _guard_test(self) -> None:
        """Test the candidate best on the guard against the best starting point: it becomes
        the result only if its gain per guard example passes a one-sided paired bootstrap
        test at `fitness.guard_level` (seeded by the run's seed); picking the best of many
        candidates on a few hundred guard rows is itself selection on noise. The outcome is
        committed (`state["guard"]["test"]`): a resume never tests again. A fitness without
        scores per example keeps the best on the guard (`tested: False`)."""
        st = self._state
        guard = st["guard"]
        starts = len(self.recipe.population_refs()) + 1
        start, chosen = _guard_choice(guard["candidates"][:starts], self.maximize), \
            _guard_choice(_guard_candidates(st), self.maximize)
        spec = self.recipe.fitness
        test: dict[str, Any] = {"start": guard["candidates"].index(start),
                                "level": spec.guard_confidence, "tested": False}
        if chosen is not start and spec.per_example:
            jobs = [ScoreJob(tuple(self._path(n) for n in c["files"]), c["merged"], GUARD,
                             examples=True) for c in (chosen, start)]
            self._state["evaluations"] += len(jobs)
            done = self._score(jobs)
            assert done[0].examples is not None and done[1].examples is not None
            test.update({"tested": True, "label": chosen["label"],
                         **guard_test(done[0].examples, done[1].examples,
                                      maximize=self.maximize, level=spec.guard_confidence,
                                      seed=self.settings.seed)})
        guard["test"] = test

    def guard_best(self) -> dict[str, Any]:
        """The candidate best on the guard; a tie goes to the better on select (the guard
        cannot tell them apart, the fitting data can), then to the earliest: the result is
        never below the best starting point on the guard."""
        return _guard_best(self._state, self.maximize)

    def stop_reason(self) -> str | None:
        """Why the run stopped before its last generation (patience spent on the guard), or
        None."""
        st = self._state
        patience = self.settings.strategy.params.patience
        if "guard" not in st or patience is None:
            return None
        best, since = None, 0
        for c in st["guard"]["candidates"]:
            if best is None or better(c["guard"], best, self.maximize):
                best, since = c["guard"], c["generation"]
        g = st["generation"]
        if g - since >= patience and g < st["generations"]:
            return (f"stopped early after generation {g} of {st['generations']}: no "
                    f"generation's best raised the guard's best ({best:.4f}, generation "
                    f"{since}) in {patience} generations (parameters.patience)")
        return None

    # ------------------------------------------------------------------ results

    def result_members(self) -> tuple[list[str], bool]:
        """The member files the result is made of, and whether they are merged."""
        st = self._state
        if "guard" in st:
            best = self.guard_best()
            return [self._path(n) for n in best["files"]], best["merged"]
        if self.settings.merged:
            return [self._path(n) for n in st["members"]], True
        best, _ = self._best(st.get("final_select", st["fitness"]))
        return [self._path(st["members"][best])], False


def _guard_candidates(state: dict[str, Any]) -> list[dict[str, Any]]:
    guard = state["guard"]
    return [*guard["candidates"], *(guard.get("final") or [])]


def _guard_best(state: dict[str, Any], maximize: bool) -> dict[str, Any]:
    """The result of a guarded run: the best start when the best on the guard failed the
    paired test against it (`state["guard"]["test"]`), else the best on the guard."""
    test = state["guard"].get("test")
    if test is not None and test["tested"] and not test["passed"]:
        start: dict[str, Any] = state["guard"]["candidates"][test["start"]]
        return start
    return _guard_choice(_guard_candidates(state), maximize)


def _guard_choice(candidates: list[dict[str, Any]], maximize: bool) -> dict[str, Any]:
    """The candidate best on the guard; a tie goes to the better on select, then to the
    earliest."""
    best = candidates[0]
    for c in candidates[1:]:
        if better(c["guard"], best["guard"], maximize) or (
                c["guard"] == best["guard"] and "select_on" not in c
                and ("select_on" in best or better(c["select"], best["select"], maximize))):
            best = c
    return best


def _guard_files(state: dict[str, Any], maximize: bool) -> list[str]:
    """The member files of the best candidate on the guard (none without a guard)."""
    if "guard" not in state:
        return []
    return list(_guard_best(state, maximize)["files"])


def _merge_identity(merge: InnerMerge | None) -> dict[str, Any] | None:
    """The inner merge as resume compares it (the `tensors` and `postprocess` keys only when
    given, so that the run states of earlier versions still resume)."""
    if merge is None:
        return None
    data = merge.model_dump()
    for key in ("tensors", "postprocess"):
        if not data[key]:
            del data[key]
    return data


def _fresh_counters() -> dict[str, Any]:
    return {"accepted": 0, "evaluated": 0, "fitness_s": 0.0, "wall_s": 0.0}


def _finite(tensor: torch.Tensor, name: str, model: str) -> torch.Tensor:
    if tensor.dtype.is_floating_point and not all_finite(tensor):
        raise CheckpointError(f"tensor '{name}' of model {model} contains NaN or Inf")
    return tensor


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["EvolutionRun", "Progress", "rng_state", "set_rng_state"]
