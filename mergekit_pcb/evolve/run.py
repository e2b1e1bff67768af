"""Running an evolution recipe end to end, and scoring one checkpoint (`pcbmerge eval`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from mergekit_pcb.errors import UserError
from mergekit_pcb.evolve.config import (
    EvolutionRecipe,
    FitnessSpec,
    load_evolution_recipe,
    make_settings,
    parse_fitness,
    read_yaml,
)
from mergekit_pcb.evolve.engine import EvolutionRun, Progress
from mergekit_pcb.evolve.executor import Executor, make_executor
from mergekit_pcb.evolve.fitness import SPLITS, build_evaluator, torch_threads
from mergekit_pcb.evolve.jobs import ScoreJob, run_score
from mergekit_pcb.evolve.merge import PopulationMerger
from mergekit_pcb.evolve.output import (
    CURVE_PNG,
    EVOLUTION_JSON,
    RECIPE_FILE,
    ScoreRow,
    copy_artifacts,
    evolution_document,
    history_table,
    model_card,
    scores_table,
    write_curve,
    write_json,
)
from mergekit_pcb.evolve.store import CheckpointCache, RunDir, write_safetensors
from mergekit_pcb.io.reader import open_checkpoint
from mergekit_pcb.io.writer import atomic_output_dir, check_destination

RESULT_FILE = "model.safetensors"


@dataclass(frozen=True)
class EvolveSummary:
    output: Path
    run_dir: Path
    scores: list[ScoreRow]
    history: list[dict[str, Any]]
    seconds: float
    fitness_seconds: float


def default_output(recipe_path: Path) -> Path:
    return Path(f"merged-{recipe_path.stem}")


def default_run_dir(output: Path) -> Path:
    out = output.resolve()
    return out.parent / f"{out.name}.run"


class LiveView:
    """The live table of generations (stderr), refreshed after every committed step."""

    def __init__(self, console: Console, metric: str) -> None:
        self.metric = metric
        self.live = Live(console=console, refresh_per_second=4, transient=False)

    def __call__(self, p: Progress) -> None:
        st = p.state
        current = None
        if st["phase"] == "evolve" and st["generation"] < st["generations"]:
            cur = st["current"]
            current = {"gen": f"{st['generation'] + 1}…", "objective": _f(st["objective"]),
                       "best": "", "mean": "", "accepted":
                       f"{cur['accepted']}/{cur['evaluated']} ({st['step']}/{p.settings.pop})",
                       "F": "", "CR": "", "wall": f"{cur['wall_s']:.1f}"}
        self.live.update(history_table(st["history"], self.metric, "evolver", current))


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


@contextmanager
def _executor(workers: int, threads: int | None) -> Iterator[Executor]:
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    ex = make_executor(workers, threads)
    try:
        yield ex
    except BaseException:
        terminate = getattr(ex, "terminate", None)
        if terminate is not None:
            terminate()
        raise
    ex.close()


def evolve(recipe_path: Path, output: Path | None = None, *, pop: int | None = None,
           generations: int | None = None, workers: int = 1, resume: bool = False,
           seed: int | None = None, force: bool = False, quiet: bool = True,
           threads: int | None = 1, run_dir: Path | None = None,
           console: Console | None = None) -> EvolveSummary:
    """Run (or resume) an evolution recipe and write the result to `output`."""
    start = time.perf_counter()
    recipe, text = load_evolution_recipe(recipe_path)
    settings = make_settings(recipe, pop=pop, generations=generations, seed=seed)
    output = output if output is not None else default_output(recipe_path)
    check_destination(output.resolve(), force=force)
    rdir = RunDir((run_dir or default_run_dir(output)).resolve())
    console = console or Console(stderr=True)
    root = recipe_path.resolve().parent
    with _executor(workers, threads) as executor:
        view = None if quiet else LiveView(console, recipe.fitness.metric_name)
        run = EvolutionRun(recipe, text, root, settings, rdir, executor, on_progress=view)
        if view is not None:
            with view.live:
                run.start(resume=resume, force=force)
                run.run()
            if not console.is_terminal:
                console.line()  # a redirected live table's last render ends mid-line
        else:
            run.start(resume=resume, force=force)
            run.run()
        rows = _finish(run, recipe, text, output, force=force, workers=workers)
    if not quiet:
        Console().print(scores_table(rows, recipe.fitness.metric_name, run.maximize))
    st = run.state
    return EvolveSummary(output.resolve(), rdir.root, rows, st["history"],
                         time.perf_counter() - start, st["fitness_s"])


def _finish(run: EvolutionRun, recipe: EvolutionRecipe, text: str, output: Path, *,
            force: bool, workers: int) -> list[ScoreRow]:
    st = run.state
    settings = run.settings
    members, merged = run.result_members()
    spec = recipe.fitness
    refs = recipe.population_refs()
    has_report = spec.report is not None
    initial = [run.run_dir.member_path(n) for n in st["initial"]["members"]]
    with atomic_output_dir(output, force=force) as tmp:
        result = tmp / RESULT_FILE
        _write_result(run, members, merged, result)
        jobs = [ScoreJob((str(result),), False, "select")]
        if has_report:
            jobs += [ScoreJob((str(p),), False, "report") for p in initial]
            jobs.append(ScoreJob(tuple(str(p) for p in initial), True, "report"))
            jobs.append(ScoreJob((str(result),), False, "report"))
        results = [r.score for r in run.executor.map(run_score, [(run.ctx, j) for j in jobs])]
        result_select = results[0]
        reports: list[float | None] = results[1:] if has_report else [None] * (len(refs) + 2)
        inner = recipe.merge.merge_method if recipe.merge else "linear"
        rows = [ScoreRow(f"input {Path(ref).name or ref}", ref, sel, rep) for ref, sel, rep in
                zip(refs, st["initial"]["select"], reports, strict=False)]
        rows.append(ScoreRow(f"plain merge ({inner})", "merge of the inputs",
                             st["initial"]["merge_select"], reports[len(refs)]))
        rows.append(ScoreRow(f"result (evolver, {settings.mode})", "output", result_select,
                             reports[len(refs) + 1]))
        copy_artifacts(recipe.base_model or refs[0], recipe.tokenizer_source, tmp)
        (tmp / RECIPE_FILE).write_text(text)
        doc = evolution_document(
            st, recipe_name=recipe.name, mode=settings.mode, mutation=settings.mutation,
            pop=settings.pop, seed=settings.seed, workers=workers, metric=spec.metric_name,
            maximize=spec.maximize, merge_method=recipe.merge.merge_method
            if recipe.merge else None, scores=rows)
        write_json(tmp / EVOLUTION_JSON, doc)
        write_curve(doc["history"], spec.metric_name, tmp / CURVE_PNG)
        (tmp / "README.md").write_text(model_card(
            recipe_text=text, recipe_name=recipe.name, base_model=recipe.base_model,
            models=refs, mode=settings.mode, merge_method=recipe.merge.merge_method
            if recipe.merge else None, seed=settings.seed, pop=settings.pop,
            generations=st["generation"], metric=spec.metric_name, scores=rows,
            history=doc["history"]))
    return rows


def _write_result(run: EvolutionRun, members: list[str], merged: bool, path: Path) -> None:
    """The merge of the final population, or the best member, streamed tensor by tensor."""
    cache = CheckpointCache()
    try:
        ckpts = [cache.get(m) for m in members]
        if not merged:
            write_safetensors(path, run.layout, ((t.name, ckpts[0].read(t.name))
                                                 for t in run.layout), durable=True)
            return
        ctx = run.ctx
        assert ctx.merge_method is not None
        merger = PopulationMerger(ctx.merge_method, ctx.merge_params,
                                  [t.name for t in run.layout], ctx.size, ctx.seed)
        base = open_checkpoint(ctx.base) if merger.requires_base and ctx.base else None
        try:
            tensors = (
                (t.name, merger.merge_tensor(
                    t.name, [c.read(t.name) for c in ckpts],
                    base.read(t.name) if base is not None and t.dtype.is_floating_point
                    else None))
                for t in run.layout)
            write_safetensors(path, run.layout, tensors, durable=True)
        finally:
            if base is not None:
                base.close()
    finally:
        cache.close()


# ---------------------------------------------------------------------------- eval


def load_fitness_file(path: Path) -> FitnessSpec:
    """A fitness block on its own, or a whole evolution recipe (its `fitness:` is used)."""
    data = read_yaml(path, "fitness file")
    if isinstance(data, dict) and "fitness" in data:
        return parse_fitness(data["fitness"], f"{path}: fitness")
    return parse_fitness(data, str(path))


def evaluate_checkpoint(model: str, fitness_path: Path, splits: tuple[str, ...] = SPLITS,
                        threads: int | None = 1) -> dict[str, float]:
    """Score one checkpoint with the same code an evolution run uses."""
    spec = load_fitness_file(fitness_path)
    root = fitness_path.resolve().parent
    wanted = [s for s in splits if s == "select" or getattr(spec, s) is not None]
    if not wanted:
        raise UserError(f"{fitness_path}: no report data named (fitness.report)")
    with open_checkpoint(model) as ckpt:
        state = {name: ckpt.read(name) for name in ckpt.names()}
    with torch_threads(threads):
        evaluator = build_evaluator(spec, root, spec.model or model)
        return {s: evaluator.score(state, s) for s in wanted}


__all__ = ["EvolveSummary", "default_output", "default_run_dir", "evaluate_checkpoint",
           "evolve", "load_fitness_file"]
