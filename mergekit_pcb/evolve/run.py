"""Running an evolution recipe end to end, and scoring one checkpoint (`pcbmerge eval`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.live import Live

from mergekit_pcb.engine import build_plan, write_plan
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
from mergekit_pcb.evolve.executor import executor_scope, make_executor
from mergekit_pcb.evolve.fitness import GUARD, SPLITS, better, build_evaluator, code_refs
from mergekit_pcb.evolve.jobs import ScoreJob, member_key, population_recipe, run_score
from mergekit_pcb.evolve.output import (
    CURVE_PNG,
    EVOLUTION_JSON,
    ScoreRow,
    evolution_document,
    fmt,
    guard_test_detail,
    history_table,
    scores_table,
    search_card,
    write_curve,
    write_json,
)
from mergekit_pcb.evolve.ray_executor import RaySettings
from mergekit_pcb.evolve.stats import paired_bootstrap
from mergekit_pcb.evolve.store import CheckpointCache, RunDir
from mergekit_pcb.io.artifacts import (
    copy_model_files,
    library_of,
    model_dir,
    write_card_and_recipe,
)
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.io.resolve import resolve_model_path
from mergekit_pcb.io.writer import (
    OutputTensor,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_destination,
    plan_shards,
)
from mergekit_pcb.threads import torch_threads
from mergekit_pcb.usercode import require_consent

DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class EvolveSummary:
    output: Path
    run_dir: Path
    scores: list[ScoreRow]
    history: list[dict[str, Any]]
    seconds: float
    fitness_seconds: float
    notes: tuple[str, ...] = ()  # how the run ended and how the result was chosen


def input_paths(recipe: EvolutionRecipe, allow_pickle: bool = False) -> list[Path]:
    """The models a search reads: no output or run directory may be, hold or lie in one."""
    refs = [*recipe.population_refs(), *([recipe.base_model] if recipe.base_model else [])]
    if recipe.tokenizer_source not in (None, "base"):
        refs.append(recipe.tokenizer_source)
    return [resolve_model_path(r, allow_pickle=allow_pickle) for r in refs]


def default_output(recipe_path: Path) -> Path:
    return Path(f"merged-{recipe_path.stem}")


def default_run_dir(output: Path) -> Path:
    out = output.resolve()
    return out.parent / f"{out.name}.run"


class LiveView:
    """The live table of generations (stderr), refreshed after every committed step."""

    def __init__(self, console: Console, metric: str, title: str) -> None:
        self.metric = metric
        self.title = title
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
        self.live.update(history_table(st["history"], self.metric, self.title, current,
                                       batched=p.settings.strategy.batched))


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def evolve(recipe_path: Path, output: Path | None = None, *, pop: int | None = None,
           generations: int | None = None, workers: int | None = 1, resume: bool = False,
           seed: int | None = None, force: bool = False, quiet: bool = True,
           threads: int | None = 1, run_dir: Path | None = None,
           console: Console | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
           allow_pickle: bool = False, trust_code: bool = False,
           loaded: tuple[EvolutionRecipe, str] | None = None,
           ray: RaySettings | None = None, device: str = "cpu") -> EvolveSummary:
    """Run (or resume) an evolution recipe and write the result to `output`.

    `loaded` is the recipe already read and validated (the command line reads it once);
    `trust_code` is the user's consent to import and run the code the fitness names;
    `ray` scores candidates on a Ray cluster (`workers` None: as many as it holds);
    `device` is where the population is merged and scored (the output is written on the
    CPU, as `pcbmerge run` writes it, and scored again).
    """
    start = time.perf_counter()
    recipe, text = loaded if loaded is not None else load_evolution_recipe(recipe_path)
    require_consent(code_refs(recipe.fitness), trust_code)
    if recipe.fitness.guarded and ray is not None and not ray.shared_run_dir:
        # the result may be an earlier generation's population, which only the driver keeps
        raise UserError("fitness.guard: a guarded search on Ray needs --shared-run-dir (the "
                        "chosen result may be members the workers no longer hold)")
    settings = make_settings(recipe, pop=pop, generations=generations, seed=seed)
    output = output if output is not None else default_output(recipe_path)
    inputs = input_paths(recipe, allow_pickle)
    check_destination(output, force=force, inputs=inputs)
    rdir = RunDir((run_dir or default_run_dir(output)).resolve())
    console = console or Console(stderr=True)
    root = recipe_path.resolve().parent
    with executor_scope(workers, threads, ray) as executor:
        view = None if quiet else LiveView(console, recipe.fitness.metric_name,
                                           settings.strategy.name)
        run = EvolutionRun(recipe, text, root, settings, rdir, executor, on_progress=view,
                           allow_pickle=allow_pickle, inputs=[*inputs, output], device=device)
        if view is not None:
            with view.live:
                run.start(resume=resume, force=force)
                run.run()
            if not console.is_terminal:
                console.line()  # a redirected live table's last render ends mid-line
        else:
            run.start(resume=resume, force=force)
            run.run()
        rows = _finish(run, recipe, text, output, force=force, workers=executor.workers,
                       shard_size=shard_size, inputs=inputs)
    notes = closing_notes(run, result_select=rows[-1].select)
    if not quiet:
        Console().print(scores_table(rows, recipe.fitness.metric_name, run.maximize))
        for note in notes:
            Console().print(note)
    st = run.state
    return EvolveSummary(output.resolve(), rdir.root, rows, st["history"],
                         time.perf_counter() - start, st["fitness_s"], notes)


def best_start(run: EvolutionRun) -> int:
    """The starting point the result is measured against (0..n-1 the inputs, n their
    merge): the best on the guard with a guard, else on select; never chosen on report."""
    st = run.state
    n = len(st["initial"]["members"])
    if "guard" in st and "test" in st["guard"]:  # the start the result was tested against
        start: int = st["guard"]["test"]["start"]
        return start
    if "guard" in st:
        scores = [c["guard"] for c in st["guard"]["candidates"][: n + 1]]
    else:
        scores = [*st["initial"]["select"], st["initial"]["merge_select"]]
    return run.best_index(scores)


def _interval(start: list[float] | None, result: list[float] | None,
              seed: int) -> dict[str, Any]:
    """report(result) − report(best start) with its paired bootstrap interval, where the
    fitness gives scores per example."""
    if start is None or result is None:
        return {"delta": None, "reason": "no scores per example for this fitness"}
    ci = paired_bootstrap(torch.tensor(result), torch.tensor(start), seed=seed)
    return {"delta": ci.delta, "low": ci.low, "high": ci.high, "examples": ci.examples,
            "level": ci.level, "resamples": ci.resamples}


def closing_notes(run: EvolutionRun, result_select: float | None = None) -> tuple[str, ...]:
    """The lines under the closing table: report(result) − report(best start) with its
    paired interval, an early stop and its cause, and a result that is one of the starting
    points because the search never beat it on the guard or, without a guard, a result no
    better on select than the plain merge of the inputs (`result_select`: the result's
    select score, measured on the written model)."""
    notes = []
    interval = run.state.get("report_interval")
    if interval is not None and interval["delta"] is not None:
        refs = run.recipe.population_refs()
        k = interval["start"]
        label = (run.settings.strategy.merge_row_label(run.ctx.merge.merge_method)
                 if k == len(refs) else f"input {Path(refs[k]).name or refs[k]}")
        notes.append(f"report(result) − report(best start: {label}) = "
                     f"{interval['delta']:+.4f}, {interval['level']:.0%} paired bootstrap "
                     f"interval [{interval['low']:+.4f}, {interval['high']:+.4f}] over "
                     f"{interval['examples']} examples.")
    if "guard" not in run.state:
        merge_select = run.state["initial"]["merge_select"]
        if result_select is not None and not better(
                result_select, math.nan if merge_select is None else merge_select,
                run.maximize):
            # the guard's note says the same of its starting points; here select chose
            label = run.settings.strategy.merge_row_label(run.ctx.merge.merge_method)
            notes.append(f"The search did not beat the plain merge of its inputs on select: "
                         f"the result scores {fmt(result_select)}, '{label}' "
                         f"{fmt(merge_select)}.")
        return tuple(notes)
    reason = run.stop_reason()
    if reason is not None:
        notes.append(reason[0].upper() + reason[1:] + ".")
    best = run.guard_best()
    test = run.state["guard"].get("test")
    if test is not None and test["tested"]:
        start = run.state["guard"]["candidates"][test["start"]]["label"]
        detail = guard_test_detail(test)
        notes.append(f"'{test['label']}' beat the best start '{start}' {detail}."
                     if test["passed"] else
                     f"The search did not beat its best start on the guard by the paired test: "
                     f"the result is the starting point '{start}' ('{test['label']}' gained "
                     f"{detail}).")
    elif best in run.state["guard"]["candidates"][: len(run.recipe.population_refs()) + 1]:
        notes.append(f"The search did not beat its best start on the guard: the result is "
                     f"the starting point '{best['label']}'.")
    elif test is not None:
        notes.append(f"The result is the best on the guard, not tested against the best "
                     f"start: fitness type {run.recipe.fitness.type} with metric "
                     f"'{run.recipe.fitness.metric_name}' has no scores per example.")
    return tuple(notes)


def _finish(run: EvolutionRun, recipe: EvolutionRecipe, text: str, output: Path, *,
            force: bool, workers: int, shard_size: int, inputs: list[Path]) -> list[ScoreRow]:
    st = run.state
    settings = run.settings
    members, merged = run.result_members()
    spec = recipe.fitness
    refs = recipe.population_refs()
    has_report = spec.report is not None
    initial = [run.run_dir.member_path(n) for n in st["initial"]["members"]]
    with atomic_output_dir(output, force=force, inputs=[*inputs, run.run_dir.root],
                           kind="search") as tmp:
        _write_result(run, members, merged, tmp, shard_size)
        # The result is scored as a model directory, however many shards it has; workers
        # that cannot read the driver's files score the same tensors from their members.
        result = ((str(tmp),), False) if run.executor.shares_files else (tuple(members), merged)
        jobs = [ScoreJob(*result, "select")]
        start = best_start(run)  # compared with the result example by example on report
        if has_report:
            jobs += [ScoreJob((str(p),), False, "report", examples=k == start)
                     for k, p in enumerate(initial)]
            jobs.append(ScoreJob(tuple(str(p) for p in initial), True, "report",
                                 examples=start == len(initial)))
            jobs.append(ScoreJob(*result, "report", examples=True))
        done = run.executor.map(run_score, [(run.ctx, j) for j in jobs])
        results = [r.score for r in done]
        if has_report:
            st["report_interval"] = _interval(done[1 + start].examples, done[-1].examples,
                                              settings.seed)
            st["report_interval"]["start"] = start
        result_select = results[0]
        reports: list[float | None] = results[1:] if has_report else [None] * (len(refs) + 2)
        inner = recipe.merge.merge_method if recipe.merge else "linear"
        # with a guard: the starting points' guard scores (the candidates' first rows)
        guards: list[float | None] = ([c["guard"] for c in st["guard"]["candidates"]]
                                      if "guard" in st else [None] * (len(refs) + 1))
        rows = [ScoreRow(f"input {Path(ref).name or ref}", ref, sel, rep, guard)
                for ref, sel, rep, guard in
                zip(refs, st["initial"]["select"], reports, guards, strict=False)]
        rows.append(ScoreRow(settings.strategy.merge_row_label(inner), "merge of the inputs",
                             st["initial"]["merge_select"], reports[len(refs)],
                             guards[len(refs)]))
        mode = "merged" if settings.merged else "standalone"
        name = settings.strategy.name
        # only the evolver has modes: "standalone" would mislabel de-ancestor and cade
        label = f"result ({name}, {mode})" if "mode" in settings.strategy.describe() \
            else f"result ({name})"
        chosen = run.guard_best() if "guard" in st else None
        if chosen is not None:
            label = f"{label}: {chosen['label']}"
        rows.append(ScoreRow(label, "output", result_select, reports[len(refs) + 1],
                             None if chosen is None else chosen["guard"]))
        donor = recipe.base_model or refs[0]
        config_root = model_dir(donor)
        tokenizer_root = (model_dir(recipe.tokenizer_source)
                          if recipe.tokenizer_source not in (None, "base") else config_root)
        # The donor's other files (sentence-transformers modules, ...) from a directory only.
        copy_model_files(tmp, config_root, tokenizer_root, recipe.dtype if merged else None,
                         carry=resolve_model_path(donor).is_dir())
        doc = evolution_document(
            st, recipe_name=recipe.name, method=name, search=settings.strategy.describe(),
            pop=settings.pop, seed=settings.seed, workers=workers, metric=spec.metric_name,
            maximize=spec.maximize, merge_method=recipe.merge.merge_method
            if recipe.merge else None, scores=rows)
        write_json(tmp / EVOLUTION_JSON, doc)
        write_curve(doc["history"], spec.metric_name, tmp / CURVE_PNG,
                    plain_merge=(st["initial"]["merge_select"], rows[len(refs)].label))
        write_card_and_recipe(tmp, search_card(
            recipe_text=text, recipe_name=recipe.name, base_model=recipe.base_model,
            models=refs, method=name, mode=mode, merge_method=recipe.merge.merge_method
            if recipe.merge else None, seed=settings.seed, pop=settings.pop,
            generations=st["generation"], metric=spec.metric_name, scores=rows,
            history=doc["history"], library_name=library_of(tmp)), text)
    return rows


def _write_result(run: EvolutionRun, members: list[str], merged: bool, directory: Path,
                  shard_size: int) -> None:
    """The merge of the final population (through the merge engine, as `pcbmerge run` over
    the member files would write it), or the best member, as safetensors shards."""
    cache = CheckpointCache()
    try:
        ckpts: list[Checkpoint] = [cache.get(m) for m in members]
        if merged:
            ctx = run.ctx
            recipe = population_recipe(ctx.merge, ctx.base, ctx.dtype, len(ckpts), ctx.seed)
            sources = {member_key(i): c for i, c in enumerate(ckpts)}
            plan = build_plan(recipe, "", allow_pickle=ctx.allow_pickle, sources=sources)
            plan.check_finite = False  # checked when they were written
            try:
                write_plan(plan, directory, shard_size=shard_size, artifacts=False)
            finally:
                plan.close()
            return
        specs = [OutputTensor(t.name, t.dtype, t.shape) for t in run.layout]
        writer = ShardedSafetensorsWriter(directory, plan_shards(specs, shard_size),
                                          metadata={"merged_by": "mergekit-pcb"})
        try:
            for t in run.layout:
                writer.write(t.name, ckpts[0].read(t.name))
            writer.close()
        except BaseException:
            writer.abort()
            raise
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
                        threads: int | None = 1, spec: FitnessSpec | None = None,
                        trust_code: bool = False) -> dict[str, float]:
    """Score one checkpoint with the same code an evolution run uses."""
    spec = spec if spec is not None else load_fitness_file(fitness_path)
    require_consent(code_refs(spec), trust_code)
    root = fitness_path.resolve().parent
    wanted = [s for s in splits if s == "select" or getattr(spec, s) is not None
              or (s == GUARD and spec.guarded)]
    if not wanted:
        raise UserError(f"{fitness_path}: no report data named (fitness.report)")
    with open_checkpoint(model) as ckpt:
        state = {name: ckpt.read(name) for name in ckpt.names()}
    with torch_threads(threads):
        evaluator = build_evaluator(spec, root, spec.model or model)
        return {s: evaluator.score(state, s) for s in wanted}


__all__ = ["EvolveSummary", "default_output", "default_run_dir", "evaluate_checkpoint",
           "evolve", "load_fitness_file"]


# ---------------------------------------------------------------------------- plan


def plan_evolution(recipe: EvolutionRecipe, text: str, recipe_path: Path, *,
                   output: Path | None = None, pop: int | None = None,
                   generations: int | None = None, seed: int | None = None,
                   run_dir: Path | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Every check a run makes before its first evaluation, and what the run will do;
    nothing is written (`--dry-run`, `pcbmerge validate`)."""
    settings = make_settings(recipe, pop=pop, generations=generations, seed=seed)
    output = output if output is not None else default_output(recipe_path)
    rdir = RunDir((run_dir or default_run_dir(output)).resolve())
    run = EvolutionRun(recipe, text, recipe_path.resolve().parent, settings, rdir,
                       make_executor(1, None), allow_pickle=allow_pickle)
    refs = recipe.population_refs()
    member_bytes = sum(t.nbytes for t in run.layout)
    n, size = len(refs), settings.pop
    spec = recipe.fitness
    merge = run.ctx.merge
    evaluation: dict[str, Any]
    if settings.merged:
        info = run.population_plan_info(size)
        evaluation = {"what": f"{merge.merge_method} merge of the {size} members",
                      "passes": info["passes"], "read_bytes": info["read_bytes"]}
    else:
        evaluation = {"what": "one member", "passes": 1, "read_bytes": member_bytes}
    initial = size + 1 + (1 if settings.merged and size > n else 0)
    batched = settings.strategy.batched  # members rescored per generation and at the end
    final = 1 + ((n + 2) if spec.report is not None else 0) + (size if batched else 0)
    per_generation = size * (2 if settings.merged else 1) + (size if batched else 0)
    if spec.guarded:  # the starting points, each generation's best, the end's candidates
        initial += n + 1
        per_generation += 1
        final += (1 if batched else 0) + (0 if settings.merged else 2 * size + 2)
        # the result's paired test against the best start: both on the guard, per example
        final += 2 if spec.per_example else 0
    return {
        "valid": True, "kind": "search", "method": settings.strategy.name,
        "search": settings.strategy.describe(),
        "population": {"size": size, "inputs": refs, "filled": size - n,
                       "base_model": recipe.base_model, "member_bytes": member_bytes,
                       "tensors": len(run.layout)},
        "generations": settings.generations, "seed": settings.seed,
        "inner_merge": {"method": merge.merge_method, "parameters": dict(merge.parameters),
                        "used_for": "objective" if settings.merged else "plain-merge row"},
        "fitness": {"type": spec.type, "metric": spec.metric_name, "maximize": spec.maximize,
                    "select": spec.select, "report": spec.report,
                    **({"guard": spec.guard, "guard_fraction": spec.guard_fraction}
                       if spec.guarded else {})},
        "code": {key: ref for key, ref in code_refs(spec)},  # runs only with --trust-code
        "evaluations": {"initial": initial, "per_generation_at_most": per_generation,
                        "final": final,
                        "total_at_most": initial + per_generation * settings.generations
                        + final},
        "per_evaluation": evaluation,
        "output": str(output.resolve()), "run_dir": str(rdir.root),
    }


def describe_plan(plan: dict[str, Any]) -> list[str]:
    pop, ev, fit = plan["population"], plan["evaluations"], plan["fitness"]
    inner, per = plan["inner_merge"], plan["per_evaluation"]
    search = ", ".join(f"{k} {v}" for k, v in plan["search"].items())
    return [
        f"recipe OK: {plan['method']} ({search}) over {len(pop['inputs'])} model(s), "
        f"population {pop['size']} ({pop['filled']} filled by interpolation), "
        f"{plan['generations']} generations, seed {plan['seed']}",
        f"inner merge: {inner['method']} {inner['parameters'] or ''} ({inner['used_for']})",
        f"fitness: {fit['type']}, {fit['metric']} ({'higher' if fit['maximize'] else 'lower'}"
        f" is better) on select {fit['select']}; report {fit['report']}",
        *[f"code: {key} '{ref}' (runs only with --trust-code)"
          for key, ref in plan["code"].items()],
        f"evaluations: {ev['initial']} initial, at most {ev['per_generation_at_most']} per "
        f"generation, {ev['final']} final; at most {ev['total_at_most']} in all",
        f"each evaluation scores the {per['what']}: reads {per['read_bytes'] / 1e6:.1f} MB in "
        f"{per['passes']} pass(es)",
        f"writes {plan['output']} (run state in {plan['run_dir']})",
    ]
