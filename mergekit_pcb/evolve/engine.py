"""The evolution engine: population store, run state, speculative parallel scoring, resume.

One *step* handles one slot of the population: build a trial, score it, accept or reject.
After every step the run state is written atomically, so a run killed at any moment
resumes from the last committed step and, every random choice being a function of the
seed and the committed state, ends with the same result as an uninterrupted run.

Steps are sequential by definition (an accepted trial changes what later steps see). With
K workers the engine scores the next K steps at once against the committed population and
commits their results in order; a result whose inputs were changed by an earlier accepted
step in the same batch is discarded and recomputed. The committed sequence is therefore
exactly the serial one, whatever K is.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_pcb.errors import UserError
from mergekit_pcb.evolve.config import EvolutionRecipe, Settings, fingerprint
from mergekit_pcb.evolve.executor import Executor
from mergekit_pcb.evolve.fitness import better, resolve_file
from mergekit_pcb.evolve.jobs import (
    JobResult,
    ScoreJob,
    TrialJob,
    WorkContext,
    run_score,
    run_trial,
)
from mergekit_pcb.evolve.operators import interpolate
from mergekit_pcb.evolve.store import (
    RunDir,
    TensorSpec,
    file_crc32,
    layout_of,
    open_readable,
    write_safetensors,
)
from mergekit_pcb.io.reader import open_checkpoint

STATE_FORMAT = 2  # 2: member checksums


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
    _state: dict[str, Any] = field(default_factory=dict)
    _rng: random.Random = field(default_factory=random.Random)
    _mark: float = 0.0
    _spares: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ setup

    def __post_init__(self) -> None:
        refs = self.recipe.population_refs()
        ckpts = [open_checkpoint(r) for r in refs]
        base = open_checkpoint(self.recipe.base_model) if self.recipe.base_model else None
        try:
            self.layout: list[TensorSpec] = layout_of(ckpts, base)
        finally:
            for c in ckpts:
                c.close()
            if base is not None:
                base.close()
        spec = self.recipe.fitness
        self.maximize = spec.maximize
        merge = self.recipe.merge
        method = merge.merge_method if merge else "linear"  # the plain-merge row needs one
        params = dict(merge.parameters) if merge else {}
        identity = self.identity()
        self.ctx = WorkContext(
            key=fingerprint([identity, str(self.run_dir.root)]), fitness=spec,
            root=str(self.root), model_ref=spec.model or self.recipe.base_model or refs[0],
            merge_method=method, merge_params=params, base=self.recipe.base_model,
            size=max(self.settings.pop, len(refs)), seed=self.settings.seed,
            layout=tuple(self.layout),
        )

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        spec = self.recipe.fitness
        data = {}
        for split in ("select", "report"):
            ref = getattr(spec, split)
            if ref is not None:
                path = resolve_file(ref, self.root, f"fitness.{split}")
                data[split] = fingerprint([path.stat().st_size, _file_digest(path)])
        return {
            **self.settings.identity(),
            "models": self.recipe.population_refs(),
            "base_model": self.recipe.base_model,
            "merge": self.recipe.merge.model_dump() if self.recipe.merge else None,
            "fitness": spec.model_dump(),
            "data": data,
        }

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
            if existing["phase"] == "done" and existing["generation"] < self.settings.generations:
                self._state["phase"] = "evolve"  # more generations asked for: go on
            set_rng_state(self._rng, existing["rng"]["controller"])
            if existing["phase"] == "init":
                self._initialize()
            return
        if existing is not None or (self.run_dir.root.exists()
                                    and any(self.run_dir.root.iterdir())):
            if not force:
                raise UserError(f"run directory {self.run_dir.root} holds a run; pass --resume "
                                "to continue it or --force to start over")
            shutil.rmtree(self.run_dir.root)
        self._initialize()

    def _check_identity(self, existing: dict[str, Any]) -> None:
        if existing.get("format") != STATE_FORMAT:
            raise UserError(f"--resume: {self.run_dir.state_path} was written by another "
                            "version of the engine")
        mine, theirs = self.identity(), existing.get("identity", {})
        for key, value in mine.items():
            if theirs.get(key) != value:
                raise UserError(f"--resume: '{key}' differs from the run in {self.run_dir.root} "
                                f"(was {theirs.get(key)!r}, now {value!r}); start over with "
                                "--force")

    def _check_members(self, existing: dict[str, Any]) -> None:
        """Every member the state names must read back as it was written."""
        if existing["phase"] == "init":
            return  # the initial population is rewritten whole
        checksums = existing.get("checksums", {})
        for name in dict.fromkeys([*existing["members"], *existing["initial"]["members"]]):
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
            "format": STATE_FORMAT, "identity": self.identity(), "phase": "init",
            "generations": s.generations, "generation": 0, "step": 0, "plan": None,
            "members": [], "fitness": [], "objective": None, "initial": {},
            "current": _fresh_counters(), "history": [], "evaluations": 0, "discarded": 0,
            "fitness_s": 0.0, "checksums": {},
        }
        self.run_dir.create()
        self._commit()
        refs = self.recipe.population_refs()
        names = []
        checksums = {}
        for k, ref in enumerate(refs):
            name = f"init-{k:03d}.safetensors"
            with open_checkpoint(ref) as ckpt:
                checksums[name] = write_safetensors(
                    self.run_dir.member_path(name), self.layout,
                    ((t.name, ckpt.read(t.name)) for t in self.layout))
            names.append(name)
        for k in range(len(refs), s.pop):  # seeded interpolations of two input members
            a, b = self._rng.sample(range(len(refs)), 2)
            alpha = self._rng.random()
            name = f"init-{k:03d}.safetensors"
            pa, pb = (open_readable(self._path(names[i])) for i in (a, b))
            with pa, pb:
                checksums[name] = write_safetensors(
                    self.run_dir.member_path(name), self.layout,
                    ((t.name, interpolate(pa.read(t.name), pb.read(t.name), alpha)
                      if t.dtype.is_floating_point else pa.read(t.name)) for t in self.layout))
            names.append(name)
        paths = tuple(self._path(n) for n in names)
        jobs = [ScoreJob((p,), False, "select") for p in paths]
        merged_mode = s.mode == "merged"
        jobs.append(ScoreJob(paths[: len(refs)], True, "select"))  # the plain merge
        if merged_mode and s.pop > len(refs):
            jobs.append(ScoreJob(paths, True, "select"))
        results = self._score(jobs)
        fitness = [r.score for r in results[: s.pop]]
        plain = results[s.pop].score
        objective = (results[-1].score if merged_mode else self._best(fitness)[1])
        self._state.update({
            "phase": "evolve", "members": names, "fitness": fitness, "objective": objective,
            "checksums": checksums,
            "initial": {"members": names[: len(refs)], "select": fitness[: len(refs)],
                        "merge_select": plain, "objective": objective},
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
        best = 0
        for i, f in enumerate(fitness):
            if better(f, fitness[best], self.maximize):
                best = i
        return best, fitness[best]

    def _draw_plan(self, generation: int) -> dict[str, Any]:
        """Visiting order, donors, F and CR of a generation, from the controller RNG.

        Donors are slot indices, drawn before any step runs, so they do not depend on
        which trials are accepted (what lets steps be scored speculatively).
        """
        pop = self.settings.pop
        order = self._rng.sample(range(pop), pop)
        donors = []
        for i in order:
            others = [j for j in range(pop) if j != i]
            k = 1 if self.settings.mutation == "current-to-rand" else 3
            donors.append(self._rng.sample(others, k))
        return {"order": order, "donors": donors,
                "F": self.settings.F.value(generation), "CR": self.settings.CR.value(generation)}

    def _tidy(self) -> None:
        """Keep one spare member file per worker for accepted trials to overwrite."""
        st = self._state
        self._spares = self.run_dir.collect_garbage(
            [*st["members"], *st["initial"]["members"]], spares=self.executor.workers)

    def _trial_job(self, position: int, spare: str | None) -> TrialJob:
        st = self._state
        plan = st["plan"]
        slot = plan["order"][position]
        merged = self.settings.mode == "merged"
        gen = st["generation"]
        return TrialJob(
            generation=gen, step=position, slot=slot,
            members=tuple(self._path(n) for n in st["members"]),
            donors=tuple(plan["donors"][position]), F=plan["F"], CR=plan["CR"],
            mutation=self.settings.mutation, merged=merged,
            threshold=st["objective"] if merged else st["fitness"][slot],
            out_path=self._path(f"g{gen + 1:04d}-s{position:04d}.safetensors"),
            spare=self._path(spare) if spare else None,
        )

    def _reads(self, job: TrialJob) -> set[int]:
        if job.merged:
            return set(range(self.settings.pop))
        return {job.slot, *job.donors}

    def run(self) -> None:
        st = self._state
        pop = self.settings.pop
        self._tidy()
        while st["phase"] == "evolve" and st["generation"] < st["generations"]:
            if st["plan"] is None:
                st["plan"] = self._draw_plan(st["generation"])
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
                if res.accepted:
                    old, new = st["members"][job.slot], Path(job.out_path).name
                    st["members"][job.slot] = new
                    st["checksums"][new] = res.checksum
                    if old not in st["initial"]["members"]:
                        del st["checksums"][old]
                    assert res.member_score is not None
                    st["fitness"][job.slot] = res.member_score
                    st["objective"] = (res.score if job.merged
                                       else self._best(st["fitness"])[1])
                    st["current"]["accepted"] += 1
                    changed.add(job.slot)
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
                st["step"], st["plan"] = 0, None
                st["current"] = _fresh_counters()
                self._commit(durable=True)
        if st["phase"] == "evolve":
            st["phase"] = "done"
            self._commit()
        self.run_dir.collect_garbage([*st["members"], *st["initial"]["members"]])  # spares

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

    # ------------------------------------------------------------------ results

    def result_members(self) -> tuple[list[str], bool]:
        """The member files the result is made of, and whether they are merged."""
        st = self._state
        if self.settings.mode == "merged":
            return [self._path(n) for n in st["members"]], True
        best, _ = self._best(st["fitness"])
        return [self._path(st["members"][best])], False


def _fresh_counters() -> dict[str, Any]:
    return {"accepted": 0, "evaluated": 0, "fitness_s": 0.0, "wall_s": 0.0}


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["EvolutionRun", "Progress", "rng_state", "set_rng_state"]
