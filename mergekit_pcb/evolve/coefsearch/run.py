"""Running a coefficient search end to end: check, cache the parts, ask/tell in batches
scored in parallel, log every batch atomically (resumable), then write the best merge
through the merge engine from `best_recipe.yaml`, and the search's record."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from mergekit_pcb.engine import MergePlan, build_plan, write_plan
from mergekit_pcb.errors import RecipeError, UserError
from mergekit_pcb.evolve.config import FitnessSpec
from mergekit_pcb.evolve.executor import Executor, executor_scope
from mergekit_pcb.evolve.fitness import (
    GUARD,
    better,
    check_resumed_device,
    code_refs,
    device_kind,
)
from mergekit_pcb.evolve.output import ScoreRow, clean, fmt, guard_test_detail, plot_png
from mergekit_pcb.evolve.output import scores_table as evolve_scores_table
from mergekit_pcb.evolve.stats import guard_test
from mergekit_pcb.io.artifacts import library_of, model_card, write_card_and_recipe
from mergekit_pcb.io.files import atomic_write_json
from mergekit_pcb.io.writer import atomic_output_dir, check_destination, prepare_run_dir
from mergekit_pcb.machine import available_memory
from mergekit_pcb.recipe.schema import parse_recipe
from mergekit_pcb.usercode import require_consent

from ..ray_executor import RaySettings, ray_worker_count
from .config import CoefficientSearchRecipe, SearchSpace, recipe_text
from .fastpath import Parts, build_parts, parts_bytes, supported, verify
from .jobs import (
    ModelJob,
    Outcome,
    PointJob,
    SearchContext,
    install_parts,
    release,
    run_model,
    run_point,
)
from .optimizer import Search, loss_of, nevergrad_version

STATE = "state.json"
PARTS = "parts.safetensors"
SEARCH_JSON = "search.json"
CURVE_PNG = "search.png"
BEST_RECIPE = "best_recipe.yaml"
Loaded = tuple[CoefficientSearchRecipe, SearchSpace, str]


@dataclass(frozen=True)
class Row:
    label: str
    select: float | None
    report: float | None
    guard: float | None = None


def default_run_dir(output: Path) -> Path:
    out = output.resolve()
    return out.parent / f"{out.name}.run"


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seed(recipe: CoefficientSearchRecipe, seed: int | None) -> int:
    return seed if seed is not None else (recipe.seed if recipe.seed is not None else 0)


def _open_plan(space: SearchSpace, seed: int, allow_pickle: bool) -> MergePlan:
    """The default merge's plan: opens every input and checks names, shapes, parameters."""
    plan = build_plan(space.merge_recipe(None, seed), "", allow_pickle=allow_pickle)
    try:
        # (per-tensor statistics, a sliced slerp's norms, take each tensor's own values)
        if space.recipe.parameters.layer_groups > 1 and any(
                r.stats is not None and not r.stats.per_tensor for r in plan.routes):
            raise RecipeError(
                f"parameters.layer_groups: {space.method.name} with whole-model statistics "
                "(scope: global) takes one value per model for every tensor; use "
                "layer_groups: 1 or scope: tensor")
    except BaseException:
        plan.close()
        raise
    return plan


def _memory_budget() -> int:
    """Half the memory available now: parts above it go to the run directory instead."""
    return available_memory() // 2


def _parts_where(space: SearchSpace, plan: MergePlan, workers: int) -> str | None:
    """None (every candidate is a full merge), "memory" or "file" (shared by workers)."""
    if not space.fast or not supported(plan):
        return None
    return "memory" if workers == 1 and parts_bytes(plan) <= _memory_budget() else "file"


# ---------------------------------------------------------------------------- plan


def plan_search(loaded: Loaded, source: Path, *, output: Path | None, seed: int | None,
                allow_pickle: bool, workers: int = 1) -> dict[str, Any]:
    """Every check that needs no computation, and what the run will do (`--dry-run`)."""
    recipe, space, _ = loaded
    s = _seed(recipe, seed)
    plan = _open_plan(space, s, allow_pickle)
    try:
        where = _parts_where(space, plan, workers)
        nbytes = parts_bytes(plan) if where else 0
        read_bytes, passes, tensors = plan.read_bytes, plan.passes, len(plan.tasks)
    finally:
        plan.close()
    params, spec = recipe.parameters, recipe.fitness
    grid = len(space.grid_points()) if params.grid else 0
    out = output.resolve() if output is not None else None
    return {
        "valid": True, "kind": "coefficient-search", "method": recipe.merge_method,
        "merge_method": recipe.merge.merge_method, "optimizer": params.optimizer,
        "budget": params.budget, "seed": s, "layer_groups": params.layer_groups,
        "variables": [asdict(v) for v in space.variables],
        "models": [m.model for m in recipe.models], "base_model": recipe.base_model,
        "tensors": tensors,
        "fitness": {"type": spec.type, "metric": spec.metric_name, "maximize": spec.maximize,
                    "select": spec.select, "report": spec.report},
        "code": {key: ref for key, ref in code_refs(spec)},  # runs only with --trust-code
        "evaluations": {"default": 1, "grid": grid, "search": params.budget,
                        "final": 1 + (3 if spec.report else 0) + (2 if grid and spec.report
                                                                  else 0)},
        "per_evaluation": (
            {"what": "one weighted sum per tensor over cached parts", "parts_bytes": nbytes,
             "parts_in": where, "setup_passes": passes, "setup_read_bytes": read_bytes}
            if where else
            {"what": f"a full {recipe.merge.merge_method} merge through the engine",
             "passes": passes, "read_bytes": read_bytes}),
        "output": str(out) if out else None,
        "run_dir": str(default_run_dir(out)) if out else None,
    }


def describe_plan(plan: dict[str, Any]) -> list[str]:
    ev, fit, per = plan["evaluations"], plan["fitness"], plan["per_evaluation"]
    names = ", ".join(f"{v['label']} in [{v['low']:g}, {v['high']:g}]"
                      for v in plan["variables"][:8])
    more = len(plan["variables"]) - 8
    lines = [
        f"recipe OK: coefficient-search of a {plan['merge_method']} merge over "
        f"{len(plan['models'])} model(s), {plan['optimizer']}, budget {plan['budget']}, "
        f"seed {plan['seed']}",
        f"searched ({len(plan['variables'])}): {names}" + (f" (+{more} more)" if more > 0
                                                          else ""),
        f"fitness: {fit['type']}, {fit['metric']} ({'higher' if fit['maximize'] else 'lower'}"
        f" is better) on select {fit['select']}; report {fit['report']}",
        *[f"code: {key} '{ref}' (runs only with --trust-code)"
          for key, ref in plan["code"].items()],
        f"evaluations: 1 default, {ev['grid']} grid, {ev['search']} searched, {ev['final']} "
        "final",
    ]
    if per.get("parts_in"):
        lines.append(f"each evaluation: {per['what']} ({per['parts_bytes'] / 1e6:.1f} MB of "
                     f"parts, in {per['parts_in']}; computed once in {per['setup_passes']} "
                     f"pass(es) reading {per['setup_read_bytes'] / 1e6:.1f} MB)")
    else:
        lines.append(f"each evaluation: {per['what']} ({per['passes']} pass(es), "
                     f"{per['read_bytes'] / 1e6:.1f} MB read)")
    if plan["output"]:
        lines.append(f"writes {plan['output']} (run state in {plan['run_dir']})")
    return lines


# ---------------------------------------------------------------------------- run


def _identity(recipe: CoefficientSearchRecipe, space: SearchSpace, seed: int) -> dict[str, Any]:
    """What a resumed run must agree on."""
    p = recipe.parameters
    return {"merge": _fingerprint(space.merge_data(None)),
            "search": {k: list(v) for k, v in space.ranges.items()},
            "optimizer": p.optimizer, "budget": p.budget, "layer_groups": p.layer_groups,
            "grid": _fingerprint(p.grid), "fitness": _fitness_fingerprint(recipe),
            "seed": seed, "nevergrad": nevergrad_version()}


def _fitness_fingerprint(recipe: CoefficientSearchRecipe) -> str:
    data = recipe.fitness.model_dump()
    if not recipe.fitness.guarded:  # the states of earlier versions, without these, resume
        for key in ("guard", "guard_fraction", "guard_seed"):
            del data[key]
    if data["guard_level"] is None:  # unset: the states before it resume
        del data["guard_level"]
    return _fingerprint(data)


def _point_key(x: list[float] | None, space: SearchSpace) -> tuple[float, ...]:
    """What the point cache is keyed by: the point's values (None is the recipe's own)."""
    return tuple(float(v) for v in (x if x is not None else space.defaults()))


def guard_stop(guards: list[dict[str, Any]], patience: int | None, maximize: bool) -> bool:
    """True when the last `patience` points scored on the guard (each a new best on select)
    did not raise the best guard score."""
    if patience is None or not guards:
        return False
    best, since = guards[0]["guard"], 0
    for k, g in enumerate(guards[1:], 1):
        if better(g["guard"], best, maximize):
            best, since = g["guard"], k
    return len(guards) - 1 - since >= patience


def _guard_best(evals: list[dict[str, Any]], guards: list[dict[str, Any]],
                maximize: bool) -> dict[str, Any]:
    """The evaluation best on the guard; a tie goes to the better on select (each point the
    guard scores is a new best on select: the later), so the result is never below the
    default point on the guard."""
    best = guards[0]
    for g in guards[1:]:
        if better(g["guard"], best["guard"], maximize) or (
                g["guard"] == best["guard"] and better(g["select"], best["select"], maximize)):
            best = g
    return evals[best["n"]]


def _guard_test(st: dict[str, Any], evals: list[dict[str, Any]], best: dict[str, Any],
                ctx: SearchContext, ex: Executor, spec: FitnessSpec, seed: int
                ) -> tuple[dict[str, Any], str | None]:
    """The point best on the guard replaces the recipe's own point only if its gain per
    guard example passes a one-sided paired bootstrap test at `fitness.guard_level` (seeded
    by the run's seed), as a population search's result must; the outcome is kept in the
    state (`guard_test`). Returns the result's evaluation and the closing note."""
    default = next(e for e in evals if e["phase"] == "default")
    if best is default:
        return best, ("The search did not beat its start on the guard: the result is the "
                      "recipe's own point.")
    if not spec.per_example:
        return best, (f"The result is the best on the guard, not tested against the "
                      f"recipe's own point: fitness type {spec.type} with metric "
                      f"'{spec.metric_name}' has no scores per example.")
    test = st.get("guard_test")
    if test is None or test["n"] != best["n"]:
        done = ex.map(run_point, [(ctx, PointJob(x, GUARD, examples=True))
                                  for x in (tuple(best["x"]), None)])
        assert done[0].examples is not None and done[1].examples is not None
        test = {"n": best["n"], "level": spec.guard_confidence,
                **guard_test(done[0].examples, done[1].examples, maximize=spec.maximize,
                             level=spec.guard_confidence, seed=seed)}
        st["guard_test"] = test
    detail = guard_test_detail(test)
    if test["passed"]:
        return best, f"Evaluation {best['n']} beat the recipe's own point {detail}."
    return default, (f"The search did not beat its start on the guard by the paired test: "
                     f"the result is the recipe's own point (evaluation {best['n']}, the "
                     f"best on the guard, gained {detail}).")


def _load_state(rdir: Path, identity: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    path = rdir / STATE
    try:
        st = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--resume: no run to resume in {rdir} (no {STATE})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: cannot read {path} ({e})") from None
    if not isinstance(st, dict) or not isinstance(st.get("evaluations"), list) \
            or not isinstance(st.get("batch"), int) or st["batch"] < 1:
        raise UserError(f"--resume: {path} is not a coefficient-search state")
    old = st.get("identity", {})
    check_resumed_device(old.get("device") if isinstance(old, dict) else None, device, rdir)
    for key, value in identity.items():
        if old.get(key) != value:
            raise UserError(f"--resume: the run in {rdir} was started with another {key} "
                            f"({old.get(key)!r}, now {value!r}); pass --force to start over")
    return st


def _best(evals: list[dict[str, Any]], maximize: bool) -> dict[str, Any] | None:
    best = None
    for e in evals:
        s = e["select"]
        if s is not None and math.isfinite(s) and (best is None or better(s, best["select"],
                                                                          maximize)):
            best = e
    return best


def run_search(loaded: Loaded, source: Path, output: Path, *, force: bool = False,
               seed: int | None = None, quiet: bool = True, workers: int | None = 1,
               resume: bool = False, threads: int | None = 1,
               shard_size: int = 5 * 10**9, allow_pickle: bool = False,
               trust_code: bool = False, run_dir: Path | None = None,
               ray: RaySettings | None = None, device: str = "cpu") -> dict[str, Any]:
    start = time.perf_counter()
    recipe, space, text = loaded
    require_consent(code_refs(recipe.fitness), trust_code)  # before anything imports it
    if workers is None:  # Ray without --workers: as many as the cluster holds
        assert ray is not None
        workers = ray_worker_count(ray)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    s = _seed(recipe, seed)
    params, spec = recipe.parameters, recipe.fitness
    console = Console(stderr=True, quiet=quiet)
    plan = _open_plan(space, s, allow_pickle)
    try:
        inputs = plan.input_paths()
        check_destination(output, force=force, inputs=inputs)
        rdir = prepare_run_dir(run_dir or default_run_dir(output), force=force, inputs=inputs,
                               state_file=STATE, resume=resume)
        identity = _identity(recipe, space, s)
        if device_kind(device) != "cpu":  # a CPU run's state is as before --device
            identity["device"] = device_kind(device)
        if resume:
            st = _load_state(rdir, identity, device)
        else:
            rdir.mkdir(parents=True, exist_ok=True)
            st = {"identity": identity, "batch": workers, "evaluations": []}
            if spec.guarded:
                st["guard"] = []
            atomic_write_json(rdir / STATE, st)
        where = _parts_where(space, plan, workers)
        build_s = 0.0
        parts: Parts | None = None
        mismatch = None
        if where is not None:
            t0 = time.perf_counter()
            parts_file = rdir / PARTS
            if where == "file" and _parts_current(parts_file, plan):
                pass  # a resumed run: made and checked before the kill
            else:
                parts = build_parts(plan)
                mismatch = verify(plan, parts)
                if mismatch is not None:
                    parts, where = None, None
                elif where == "file":
                    parts.save(parts_file)
                    parts = None
            build_s = time.perf_counter() - t0
            if where is not None:
                console.print(f"parts cached in {where} ({parts_bytes(plan) / 1e6:.1f} MB, "
                              f"{build_s:.1f}s): a candidate is one weighted sum per tensor")
            else:
                console.print(f"[yellow]the cached parts differ from the engine's merge on "
                              f"'{mismatch}'; every candidate is a full merge[/yellow]")
    finally:
        plan.close()
    # Ray workers that cannot read the run directory build the same parts themselves.
    remote = ray is not None and not ray.shared_run_dir
    ctx = SearchContext(
        key=f"{_fingerprint(identity)}-{rdir}-{time.time_ns()}", space=space, fitness=spec,
        root=str(source.resolve().parent), model_ref=recipe.base_model or recipe.models[0].model,
        seed=s, parts_file=str(rdir / PARTS) if where == "file" and not remote else None,
        allow_pickle=allow_pickle, build_parts=where == "file" and remote, device=device)
    evals: list[dict[str, Any]] = st["evaluations"]
    guards: list[dict[str, Any]] | None = st.get("guard")
    if spec.guarded and not isinstance(guards, list):
        raise UserError(f"--resume: {rdir / STATE} has no guard log")
    # the point cache: no point is scored twice (the optimizer may ask for the default, a
    # grid point or one of its own points again); a repeat is logged with its first score
    seen: dict[tuple[float, ...], dict[str, Any]] = {}
    for e in evals:
        seen.setdefault(_point_key(e["x"], space), e)
    batch = st["batch"]
    try:
        with executor_scope(workers, threads, ray) as ex:
            if parts is not None:
                install_parts(ctx, parts)
                del parts

            def evaluate(phase: str, xs: list[list[float] | None], index: int) -> list[Outcome]:
                fresh: dict[tuple[float, ...], list[float] | None] = {}
                for x in xs:
                    key = _point_key(x, space)
                    if key not in seen:
                        fresh.setdefault(key, x)
                jobs = [(ctx, PointJob(tuple(x) if x is not None else None))
                        for x in fresh.values()]
                scored = dict(zip(fresh, ex.map(run_point, jobs), strict=True))
                previous = _best(evals, spec.maximize)
                outs = []
                for x in xs:
                    key = _point_key(x, space)
                    if key in seen:  # scored before: its first evaluation's outcome
                        first = seen[key]
                        o = Outcome(first["select"], first["error"], first["fast"])
                        extra = {"cached": first["n"]}
                    else:
                        o, extra = scored[key], {}
                    outs.append(o)
                    evals.append({
                        "n": len(evals), "phase": phase, "batch": index,
                        "x": list(key), "point": space.point(list(key)),
                        "select": o.score, "error": o.error, "fast": o.fast,
                        "seconds": round(o.seconds, 6), "fitness_s": round(o.fitness_s, 6),
                        **extra})
                    seen.setdefault(key, evals[-1])
                if guards is not None:
                    # the guard scores a point when it is the first or a new best on select
                    # (never every trial)
                    best = _best(evals, spec.maximize)
                    if best is not None and (previous is None or best is not previous):
                        x = None if best["phase"] == "default" else tuple(best["x"])
                        (g,) = ex.map(run_point, [(ctx, PointJob(x, GUARD))])
                        guards.append({"n": best["n"], "guard": g.score,
                                       "select": best["select"]})
                atomic_write_json(rdir / STATE, st)  # after every batch: a kill loses one
                best = _best(evals, spec.maximize)
                console.print(f"{phase} {len([e for e in evals if e['phase'] == phase])}: "
                              f"best select {spec.metric_name} "
                              f"{best['select'] if best else float('nan'):.6g}")
                return outs

            if not any(e["phase"] == "default" for e in evals):
                evaluate("default", [None], 0)
            grid = space.grid_points() if params.grid else []
            done = sum(e["phase"] == "grid" for e in evals)
            while done < len(grid):
                chunk = grid[done:done + batch]
                evaluate("grid", list(chunk), done // batch)
                done += len(chunk)
            def stopped() -> bool:
                return guards is not None and guard_stop(guards, params.patience,
                                                         spec.maximize)

            search = Search(params.optimizer, *space.bounds(), params.budget, batch, s)
            logged = [e for e in evals if e["phase"] == "search"]
            batches: dict[int, list[tuple[list[float], float]]] = {}
            for e in logged:
                batches.setdefault(e["batch"], []).append(
                    (e["x"], loss_of(e["select"], spec.maximize)))
            search.replay([batches[k] for k in sorted(batches)])
            done, index = len(logged), len(batches)
            while done < params.budget and not stopped():
                xs = search.ask(min(batch, params.budget - done))
                outs = evaluate("search", list(xs), index)
                search.tell([loss_of(o.score, spec.maximize) for o in outs])
                done += len(xs)
                index += 1
            best = _best(evals, spec.maximize)
            if best is None:
                raise UserError("no candidate could be scored (every evaluation failed: "
                                f"{next((e['error'] for e in evals if e['error']), 'NaN')})")
            notes = []
            if guards:
                best = _guard_best(evals, guards, spec.maximize)
                if stopped():
                    notes.append(f"Stopped early after {done} of {params.budget} searched "
                                 f"points: the last {params.patience} new bests on select "
                                 "did not raise the guard (parameters.patience).")
                best, note = _guard_test(st, evals, best, ctx, ex, spec, s)
                if note is not None:
                    notes.append(note)
                atomic_write_json(rdir / STATE, st)  # the test is made once: a resume reads it
            rows, check = _finish(ctx, ex, space, recipe, text, best, evals, output, rdir,
                                  guards=guards, inputs=inputs, force=force, seed=s,
                                  shard_size=shard_size,
                                  allow_pickle=allow_pickle, workers=workers,
                                  extra={"parts_in": where, "parts_build_s": round(build_s, 3),
                                         "parts_mismatch": mismatch, "batch": batch})
    finally:
        release(ctx)
    if not quiet:
        Console().print(scores_table(rows, spec.metric_name, spec.maximize))
        for note in notes:
            Console().print(note)
    return {
        "kind": "coefficient-search", "output": str(output.resolve()), "run_dir": str(rdir),
        "method": recipe.merge.merge_method, "optimizer": params.optimizer,
        "evaluations": len(evals),
        "scored": sum("cached" not in e for e in evals), "notes": notes,
        "guard": guards, "best": {"n": best["n"], "phase": best["phase"],
                                            "point": best["point"], "select": best["select"]},
        "scores": [asdict(r) for r in rows], "engine_check": check,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _parts_current(path: Path, plan: MergePlan) -> bool:
    """True when the run directory's parts were made for this plan (a resumed run)."""
    from .fastpath import structure_of

    try:
        doc = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    return path.is_file() and doc.get("structure") == {t.name: structure_of(plan, t)
                                                       for t in plan.tasks}


def _finish(ctx: SearchContext, ex: Executor, space: SearchSpace,
            recipe: CoefficientSearchRecipe, text: str, best: dict[str, Any],
            evals: list[dict[str, Any]], output: Path, rdir: Path, *,
            guards: list[dict[str, Any]] | None, inputs: list[Path],
            force: bool, seed: int, shard_size: int, allow_pickle: bool, workers: int,
            extra: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    spec = recipe.fitness
    best_x = None if best["phase"] == "default" else best["x"]
    header = (f"The best point of a coefficient search ({recipe.parameters.optimizer}, "
              f"evaluation {best['n']}, select {spec.metric_name} {best['select']!r}).\n"
              f"`pcbmerge run {BEST_RECIPE} -o OUT` writes the same tensors as the search's "
              "output.")
    best_text = recipe_text({**space.merge_data(best_x, absolute=True), "seed": seed}, header)
    grid = [e for e in evals if e["phase"] == "grid"]
    grid_best = _best(grid, spec.maximize)
    default = next(e for e in evals if e["phase"] == "default")
    with atomic_output_dir(output, force=force, inputs=[*inputs, rdir], kind="search") as tmp:
        # The output is the merge engine's, from the recipe as `pcbmerge run` reads it.
        plan = build_plan(parse_recipe(yaml.safe_load(best_text), BEST_RECIPE), best_text,
                          allow_pickle=allow_pickle)
        try:
            write_plan(plan, tmp, shard_size=shard_size, artifacts=True)
        finally:
            plan.close()
        (tmp / BEST_RECIPE).write_text(best_text)
        jobs: list[tuple[str, Any]] = [("result", ModelJob(str(tmp), "select"))]
        if spec.report is not None:
            jobs.append(("result", ModelJob(str(tmp), "report")))
            jobs.append(("default", PointJob(None, "report", engine=True)))
            if grid_best is not None:
                jobs.append(("grid", PointJob(tuple(grid_best["x"]), "report", engine=True)))
        if not ex.shares_files:
            # workers that cannot read the output score the engine's merge of the same
            # point (`engine_check` then compares the search's merge with the engine's)
            x = tuple(best["x"]) if best_x is not None else None
            jobs = [(w, PointJob(x, j.split, engine=True) if isinstance(j, ModelJob) else j)
                    for w, j in jobs]
        point_jobs = [(ctx, j) for w, j in jobs if w != "result"]
        model_jobs = [(ctx, j) for w, j in jobs if w == "result"]
        model_outs = ex.map(run_model if ex.shares_files else run_point, model_jobs)
        point_outs = ex.map(run_point, point_jobs) if point_jobs else []
        result_select = model_outs[0].score
        result_report = model_outs[1].score if len(model_outs) > 1 else None
        reports = [o.score for o in point_outs] + [None, None]
        method = recipe.merge.merge_method
        guarded = {g["n"]: g["guard"] for g in guards or []}
        rows = [Row(f"default merge ({method}, the recipe's values)", default["select"],
                    reports[0], guarded.get(default["n"]))]
        if grid_best is not None:
            rows.append(Row(f"best grid point ({len(grid)} points)", grid_best["select"],
                            reports[1], guarded.get(grid_best["n"])))
        chosen = "best on the guard" if guards else "best"
        rows.append(Row(f"searched result ({recipe.parameters.optimizer}, {chosen} of "
                        f"{len(evals)})", result_select, result_report,
                        guarded.get(best["n"])))
        check = {"select_in_search": best["select"], "select_of_output": result_select,
                 "equal": best["select"] == result_select}
        doc = {
            "method": "coefficient-search", "name": recipe.name, "merge_method": method,
            "optimizer": recipe.parameters.optimizer, "budget": recipe.parameters.budget,
            "seed": seed, "workers": workers, "metric": spec.metric_name,
            "maximize": spec.maximize, "nevergrad": nevergrad_version(), **extra,
            "variables": [asdict(v) for v in space.variables],
            "best": {k: best[k] for k in ("n", "phase", "point", "x", "select")},
            "evaluations": evals,
            "scores": [asdict(r) for r in rows],
            "engine_check": check,
            **({"guard": guards} if guards is not None else {}),
            "totals": {"evaluations": len(evals),
                       "scored": sum("cached" not in e for e in evals),
                       "search_evaluations": sum(e["phase"] == "search" for e in evals),
                       "fitness_s": round(sum(e["fitness_s"] for e in evals), 3),
                       "evaluation_s": round(sum(e["seconds"] for e in evals), 3)},
        }
        (tmp / SEARCH_JSON).write_text(json.dumps(clean(doc), indent=1) + "\n")
        write_curve(evals, spec.metric_name, spec.maximize, tmp / CURVE_PNG)
        write_card_and_recipe(tmp, _card(recipe, text, space, best, rows, best_text,
                                         library_of(tmp)), text)
    return rows, check


def scores_table(rows: list[Row], metric: str, maximize: bool) -> Table:
    """The evolution's closing table, over these rows."""
    return evolve_scores_table([ScoreRow(r.label, "", r.select, r.report, r.guard)
                                for r in rows], metric, maximize)


def write_curve(evals: list[dict[str, Any]], metric: str, maximize: bool, path: Path) -> bool:
    """Each evaluation's select score and the best so far, against the evaluation count."""
    xs = list(range(1, len(evals) + 1))
    scores = [e["select"] if e["select"] is not None else math.nan for e in evals]
    best: list[float] = []
    for v in scores:
        prev = best[-1] if best else math.nan
        best.append(v if better(v, prev, maximize) else prev)
    return plot_png(path, xs, [(scores, ".", "evaluation"), (best, "-", "best so far")],
                    "evaluations", f"select {metric}")


def _card(recipe: CoefficientSearchRecipe, text: str, space: SearchSpace,
          best: dict[str, Any], rows: list[Row], best_text: str,
          library_name: str = "transformers") -> str:
    inputs = ([f"- base: `{recipe.base_model}`"] if recipe.base_model else [])
    inputs += [f"- `{m.model}`" for m in recipe.models]
    searched = ["| parameter | bounds | recipe value | best |", "|---|---|---|---|"]
    searched += [f"| {v.label} | [{v.low:g}, {v.high:g}] | {v.default:g} | "
                 f"{best['point'][v.label]:.6g} |" for v in space.variables]
    table = ["| model | select | report |", "|---|---|---|"]
    table += [f"| {r.label} | {fmt(r.select)} | {fmt(r.report)} |" for r in rows]
    p = recipe.parameters
    return model_card(
        title=recipe.name or "Merged model (coefficient search)",
        tags=["coefficient-search", recipe.merge.merge_method],
        base_model=recipe.base_model,
        summary=f"Merged with **{recipe.merge.merge_method}**, its coefficients searched by "
                f"{p.optimizer} (budget {p.budget}) on the select data",
        sections=[("Inputs", inputs), ("Searched parameters", searched),
                  (f"Scores ({recipe.fitness.metric_name})", table),
                  (f"Best recipe ({BEST_RECIPE})", ["```yaml", best_text.rstrip(), "```"])],
        recipe_text=text, library_name=library_name)


__all__ = ["BEST_RECIPE", "CURVE_PNG", "SEARCH_JSON", "STATE", "default_run_dir",
           "describe_plan", "plan_search", "run_search"]
