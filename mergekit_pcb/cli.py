"""`pcbmerge`: the command line, a thin layer over the engine.

Exit codes: 0 success, 2 bad input (one line on stderr naming what is at fault), 1 bug.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mergekit_pcb import __version__
from mergekit_pcb.errors import UserError

app = typer.Typer(
    name="pcbmerge",
    help="Merge fine-tuned checkpoints from YAML recipes, streamed tensor by tensor.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stdout = Console()
stderr = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def handle_errors(fn: F) -> F:
    """Bad input -> one line and exit 2; anything else is a bug -> traceback and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            traceback.print_exc()
            print(f"internal error: {type(e).__name__}: {e}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _setup_torch(device: Device, threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if device is Device.cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() "
                        "is False)")


RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe", show_default=False)]


@app.command()
@handle_errors
def run(
    recipe: RecipeArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="output directory")],
    force: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    device: Annotated[Device, typer.Option(help="device for the math")] = Device.cpu,
    shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB")] = "5GB",
    seed: Annotated[int | None, typer.Option(help="seed for random methods")] = None,
    dry_run: Annotated[bool, typer.Option(help="plan and check, write nothing")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="allow pickled .bin checkpoints")] = False,
    workers: Annotated[int | None, typer.Option(
        help="evolution recipes: processes scoring candidates")] = None,
    resume: Annotated[bool, typer.Option(
        help="evolution recipes: continue a stopped or killed run")] = False,
) -> None:
    """Run a merge or evolution recipe and write the resulting model to OUTPUT."""
    from mergekit_pcb.engine import plan_recipe_file, run_plan
    from mergekit_pcb.evolve.cli import EVOLUTION_METHODS, run_evolution_recipe
    from mergekit_pcb.io.writer import check_destination, parse_size
    from mergekit_pcb.recipe.schema import read_merge_method

    if read_merge_method(recipe) in EVOLUTION_METHODS:
        run_evolution_recipe(recipe, output, force=force, seed=seed, quiet=quiet or json_out,
                             workers=workers or 1, resume=resume, threads=threads or 1)
        return
    for flag, given in (("--workers", workers is not None), ("--resume", resume)):
        if given:
            raise UserError(f"{flag}: only for evolution recipes; {recipe} is a "
                              f"{read_merge_method(recipe)} merge")
    size = parse_size(shard_size)
    _setup_torch(device, threads)
    check_destination(output.resolve(), force=force)
    plan = plan_recipe_file(recipe, seed=seed, allow_pickle=allow_pickle)
    try:
        if dry_run:
            _print_plan(plan, json_out, dry_run=True)
            return
        result = run_plan(plan, output, force=force, shard_size=size, device=device.value,
                          quiet=quiet or json_out)
    finally:
        plan.close()
    summary = {
        "output": str(result.output), "method": plan.recipe.merge_method,
        "tensors": result.tensors, "shards": result.shards, "read_bytes": result.read_bytes,
        "written_bytes": result.written_bytes, "seconds": round(result.seconds, 3),
    }
    if json_out:
        print(json.dumps(summary))
    elif not quiet:
        stderr.print(f"wrote {result.output} ({result.tensors} tensors, {result.shards} "
                     f"shard(s), {result.written_bytes / 1e6:.1f} MB) in {result.seconds:.1f}s")


@app.command()
@handle_errors
def validate(
    recipe: RecipeArg,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="allow pickled .bin checkpoints")] = False,
) -> None:
    """Check a recipe without computing: files, tensor names, shapes, dtypes, parameters."""
    from mergekit_pcb.engine import plan_recipe_file

    plan = plan_recipe_file(recipe, allow_pickle=allow_pickle)
    try:
        _print_plan(plan, json_out, dry_run=False)
    finally:
        plan.close()


def _print_plan(plan: Any, json_out: bool, dry_run: bool) -> None:
    info = {
        "valid": True,
        "method": plan.recipe.merge_method,
        "base_model": plan.base_key,
        "models": [m.model for m in plan.recipe.models],
        "tensors": len(plan.tasks),
        "passes": plan.passes,
        "pass_names": [n for r in plan.routes for n in r.stat_passes] + ["merge"],
        "read_bytes": plan.read_bytes,
        "output_bytes": plan.write_bytes,
        "seed": plan.seed,
        "rules": [{"rule": r.label, "tensors": len(r.tensor_names)} for r in plan.routes],
    }
    if json_out:
        print(json.dumps(info))
        return
    stdout.print(f"[green]recipe OK[/green]: {info['method']} over {len(info['models'])} "
                 f"model(s), {info['tensors']} tensors")
    stdout.print(f"reads {plan.read_bytes / 1e6:.1f} MB in {info['passes']} pass(es) "
                 f"({', '.join(info['pass_names'])}), writes {plan.write_bytes / 1e6:.1f} MB")
    table = Table("rule", "tensors")
    for r in info["rules"]:
        table.add_row(r["rule"], str(r["tensors"]))
    stdout.print(table)
    if dry_run:
        stdout.print("dry run: nothing written")


@app.command()
@handle_errors
def methods(json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the merge methods with their parameters and defaults."""
    from mergekit_pcb.methods import REGISTRY

    data = {
        name: {
            "summary": cls.summary,
            "requires_base": cls.requires_base,
            "parameters": [
                {"name": p.name, "default": p.default, "per_model": p.per_model,
                 "type": p.kind.__name__, "choices": list(p.choices or []), "doc": p.doc}
                for p in cls.params
            ],
        }
        for name, cls in REGISTRY.items()
    }
    if json_out:
        print(json.dumps(data, indent=2))
        return
    for name, d in data.items():
        table = Table("parameter", "default", "where", "meaning", title=f"{name}: {d['summary']}",
                      title_justify="left")
        for p in d["parameters"]:
            where = "models[].parameters" if p["per_model"] else "parameters"
            default = str(p["default"]) + (f" ({'|'.join(p['choices'])})" if p["choices"] else "")
            table.add_row(p["name"], default, where, p["doc"])
        stdout.print(table)


@app.command()
@handle_errors
def inspect(
    path: Annotated[str, typer.Argument(help="model directory, .safetensors file or hub id")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="allow pickled .bin checkpoints")] = False,
) -> None:
    """List a checkpoint's tensors with shapes and dtypes, and totals."""
    from mergekit_pcb.io.reader import open_checkpoint

    with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:
        rows = [(i.name, list(i.shape), str(i.dtype).removeprefix("torch."), i.numel, i.file.name)
                for i in ckpt.tensors.values()]
        by_dtype: dict[str, int] = {}
        for r in rows:
            by_dtype[r[2]] = by_dtype.get(r[2], 0) + r[3]
        totals = {"tensors": len(rows), "parameters": sum(r[3] for r in rows),
                  "bytes": ckpt.total_bytes, "files": len({r[4] for r in rows}),
                  "parameters_by_dtype": by_dtype}
    if json_out:
        print(json.dumps({"tensors": [dict(zip(("name", "shape", "dtype", "numel", "file"), r,
                                               strict=True)) for r in rows], "totals": totals}))
        return
    table = Table("tensor", "shape", "dtype", "file")
    for name, shape, dtype, _, file in rows:
        table.add_row(name, str(shape), dtype, file)
    stdout.print(table)
    stdout.print(f"{totals['tensors']} tensors, {totals['parameters']:,} parameters, "
                 f"{totals['bytes'] / 1e6:.1f} MB in {totals['files']} file(s); by dtype: "
                 + ", ".join(f"{k} {v:,}" for k, v in by_dtype.items()))


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


from mergekit_pcb.evolve.cli import register as _register_evolution  # noqa: E402

_register_evolution(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
