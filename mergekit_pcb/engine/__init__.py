"""The streaming merge engine: plan (all checks, no data) then execute tensor by tensor."""

from __future__ import annotations

from pathlib import Path

from mergekit_pcb.engine.plan import MergePlan, build_plan
from mergekit_pcb.engine.stream import (
    MergeResult,
    compute_part,
    merge_in_memory,
    run_plan,
    write_plan,
)
from mergekit_pcb.recipe.schema import load_recipe


def plan_recipe_file(recipe_path: str | Path, *, seed: int | None = None,
                     allow_pickle: bool = False) -> MergePlan:
    recipe = load_recipe(recipe_path)
    return build_plan(recipe, Path(recipe_path).read_text(), seed=seed,
                      allow_pickle=allow_pickle)


def merge_recipe_file(recipe_path: str | Path, output: str | Path, *, force: bool = False,
                      seed: int | None = None, allow_pickle: bool = False,
                      shard_size: int = 5 * 10**9, device: str = "cpu",
                      quiet: bool = True) -> MergeResult:
    """Run a recipe end to end (the Python equivalent of `pcbmerge run`)."""
    plan = plan_recipe_file(recipe_path, seed=seed, allow_pickle=allow_pickle)
    try:
        return run_plan(plan, Path(output), force=force, shard_size=shard_size, device=device,
                        quiet=quiet)
    finally:
        plan.close()


__all__ = ["MergePlan", "MergeResult", "build_plan", "compute_part", "merge_in_memory",
           "merge_recipe_file", "plan_recipe_file", "run_plan", "write_plan"]
