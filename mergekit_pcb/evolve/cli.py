"""`pcbmerge evolve` and `pcbmerge eval`, added to the main app by `register(app)`.

`pcbmerge run` hands recipes whose `merge_method` is in `EVOLUTION_METHODS` to
`run_evolution_recipe`.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

EVOLUTION_METHODS: frozenset[str] = frozenset({"evolver"})


class Split(str, Enum):
    select = "select"
    report = "report"
    all = "all"


def run_evolution_recipe(recipe_path: Path, output: Path | None, *, force: bool,
                         seed: int | None, quiet: bool, workers: int = 1, resume: bool = False,
                         threads: int = 1) -> None:
    """What `pcbmerge run` does with an evolution recipe (the recipe's pop and generations)."""
    from mergekit_pcb.evolve.run import evolve

    summary = evolve(recipe_path, output, force=force, seed=seed, quiet=quiet,
                     workers=workers, resume=resume, threads=threads)
    if not quiet:
        Console(stderr=True).print(f"wrote {summary.output} in {summary.seconds:.1f}s "
                                   f"(run state in {summary.run_dir})")


def register(app: typer.Typer) -> None:
    """Add the `evolve` and `eval` commands to `app`."""
    from mergekit_pcb.cli import handle_errors

    @app.command("evolve")
    @handle_errors
    def evolve_command(
        recipe: Annotated[Path, typer.Argument(help="evolution recipe (YAML)")] = Path(
            "recipe.yaml"),
        pop: Annotated[int | None, typer.Option(help="population size (overrides the recipe)")]
        = None,
        generations: Annotated[int | None, typer.Option(help="generations (overrides)")] = None,
        workers: Annotated[int, typer.Option(help="processes scoring candidates")] = 1,
        resume: Annotated[bool, typer.Option(help="continue a stopped or killed run")] = False,
        seed: Annotated[int | None, typer.Option(help="seed (overrides the recipe)")] = None,
        output: Annotated[Path | None, typer.Option(
            "--output", "-o", help="output directory [default: merged-RECIPE]")] = None,
        force: Annotated[bool, typer.Option(help="replace an existing output and run")]
        = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live table")] = False,
        threads: Annotated[int, typer.Option(
            help="torch threads per scoring process (equal values give equal scores)")] = 1,
        run_dir: Annotated[Path | None, typer.Option(
            help="run state and population [default: OUTPUT.run]")] = None,
    ) -> None:
        """Evolve a population of checkpoints with an evolution recipe (e.g. evolver)."""
        from mergekit_pcb.errors import RecipeError
        from mergekit_pcb.evolve.run import evolve

        if not recipe.exists():
            raise RecipeError(f"recipe not found: {recipe}"
                              + (" (no recipe.yaml in the working directory)"
                                 if recipe == Path("recipe.yaml") else ""))
        summary = evolve(recipe, output, pop=pop, generations=generations, workers=workers,
                         resume=resume, seed=seed, force=force, quiet=quiet, threads=threads,
                         run_dir=run_dir)
        if not quiet:
            Console(stderr=True).print(f"wrote {summary.output} in {summary.seconds:.1f}s "
                                       f"(run state in {summary.run_dir})")

    @app.command("eval")
    @handle_errors
    def eval_command(
        model: Annotated[str, typer.Argument(help="model directory, .safetensors file or hub id")],
        fitness: Annotated[Path, typer.Option(help="fitness YAML (or an evolution recipe)")],
        split: Annotated[Split, typer.Option(help="which data to score on")] = Split.all,
        json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
        threads: Annotated[int, typer.Option(help="torch threads")] = 1,
    ) -> None:
        """Score a checkpoint with the fitness code evolution uses."""
        from mergekit_pcb.evolve.config import METRICS
        from mergekit_pcb.evolve.fitness import SPLITS
        from mergekit_pcb.evolve.run import evaluate_checkpoint, load_fitness_file

        splits = SPLITS if split is Split.all else (split.value,)
        scores = evaluate_checkpoint(model, fitness, splits, threads=threads)
        spec = load_fitness_file(fitness)
        metric = spec.metric or METRICS[spec.type][0]
        if json_out:
            print(json.dumps({"model": model, "metric": metric, "maximize": spec.maximize,
                              **scores}))
            return
        table = Table("split", metric)
        for name, value in scores.items():
            table.add_row(name, f"{value:.6g}")
        Console().print(table)


__all__ = ["EVOLUTION_METHODS", "register", "run_evolution_recipe"]
