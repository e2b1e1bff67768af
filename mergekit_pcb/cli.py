"""`pcbmerge`: the command line, a thin layer over the engine.

Exit codes: 0 success, 2 bad input (one line on stderr naming what is at fault), 1 bug.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mergekit_pcb import __version__
from mergekit_pcb.errors import UserError

if TYPE_CHECKING:
    from mergekit_pcb.evolve.ray_executor import RaySettings
    from mergekit_pcb.kinds import RecipeKind

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


class ExecutorName(str, Enum):
    local = "local"
    ray = "ray"


def report_error(label: str, message: str, code: int, json_out: bool) -> None:
    """An error as the one line the user reads, `LABEL: MESSAGE` on stderr; with `--json`
    a JSON object {"error", "label", "exit_code"} on stdout instead (where `--json` prints
    everything, so a script parses one stream). The exit code says what it was: 2 bad
    input, 1 internal error, 130 interrupted."""
    # a message quoting a value with a line break (a file name, a method) stays one line
    text = message.replace("\r", "\\r").replace("\n", "\\n")
    if json_out:
        print(json.dumps({"error": text, "label": label, "exit_code": code}))
    else:
        print(f"{label}: {text}" if text else label, file=sys.stderr)


KERNEL_BUILD_NOTE = ("note: finishing the one-time build of the compiled kernels (cached "
                     "for later runs)")
# A kernel loaded from numba's cache takes about 1.6 s (measured); a first build, a minute.
# Whatever still loads after this long is a build.
KERNEL_NOTE_AFTER_S = 3.0


def note_kernel_build() -> None:
    """One line on stderr when a compiled kernel is still being built as the command ends:
    the process's exit waits for it, which would otherwise look like a hang."""
    # Not imported here when the command never loaded it (it would import torch for nothing).
    compiled = sys.modules.get("mergekit_pcb.methods.compiled")
    if compiled is not None and compiled.still_loading(KERNEL_NOTE_AFTER_S):
        print(KERNEL_BUILD_NOTE, file=sys.stderr)


def handle_errors(fn: F) -> F:
    """Bad input -> one line and exit 2; anything else is a bug -> traceback and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        json_out = bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            report_error("error", str(e), 2, json_out)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            if not json_out and sys.stderr.isatty():
                print(file=sys.stderr)  # off the line the terminal's ^C and any table left
            report_error("interrupted", str(e), 130, json_out)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            traceback.print_exc()
            report_error("internal error", f"{type(e).__name__}: {e}", 1, json_out)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _resume_hint(resumable: bool) -> Iterator[None]:
    """A search stopped by Ctrl-C keeps its run state: say how to go on from it."""
    try:
        yield
    except KeyboardInterrupt:
        if not resumable:
            raise
        raise KeyboardInterrupt("the run state is kept; the same command with --resume "
                                "continues it") from None


def _setup_torch(device: str, threads: int | None, ray: RaySettings | None = None) -> None:
    """Check the device and thread flags; the engines set torch's thread count themselves
    (a merge by its thread policy, a search per scoring process). A search on Ray scores
    on its workers: `cuda` there is the GPU Ray gives each one (--gpus-per-worker), which
    the worker checks itself; the driver needs none."""
    import torch

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if ray is not None and device.startswith("cuda"):
        if device != "cuda":
            raise UserError(f"--device {device}: with --executor ray each worker uses the GPU "
                            "Ray gives it; use --device cuda")
        if ray.gpus_per_worker <= 0:
            raise UserError("--device cuda: with --executor ray, give --gpus-per-worker (Ray "
                            "gives a worker no GPU without it)")
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available "
                            "(torch.cuda.is_available() is False)")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are {torch.cuda.device_count()} CUDA "
                            "device(s)")


RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe", show_default=False)]
ExecutorOpt = Annotated[ExecutorName | None, typer.Option(
    help="searches: where candidates are scored: local processes or a Ray cluster "
         "[default: local]")]
RayAddressOpt = Annotated[str | None, typer.Option(
    help="--executor ray: the cluster to join ('auto': the running one) [default: start a "
         "local Ray]")]
CpusOpt = Annotated[float | None, typer.Option(
    help="--executor ray: CPUs each worker asks for [default: 1]")]
GpusOpt = Annotated[float | None, typer.Option(
    help="--executor ray: GPUs each worker asks for [default: 0]")]
SharedOpt = Annotated[bool, typer.Option(
    help="--executor ray: every node mounts the run directory at the same path (workers "
         "read members there instead of keeping their own copy)")]


def _ray_settings(executor: ExecutorName | None, address: str | None, cpus: float | None,
                  gpus: float | None, shared: bool) -> RaySettings | None:
    """The Ray settings of `--executor ray`; its options without it are refused."""
    from mergekit_pcb.evolve.ray_executor import RaySettings, import_ray

    if executor is not ExecutorName.ray:
        for flag, value in (("--ray-address", address), ("--cpus-per-worker", cpus),
                            ("--gpus-per-worker", gpus), ("--shared-run-dir", shared or None)):
            if value is not None:
                raise UserError(f"{flag}: only used with --executor ray")
        return None
    for flag, value in (("--cpus-per-worker", cpus), ("--gpus-per-worker", gpus)):
        if value is not None and value < 0:
            raise UserError(f"{flag} must be at least 0, got {value}")
    import_ray()  # refused now, with what to install, if Ray is missing
    return RaySettings(address=address, cpus_per_worker=1.0 if cpus is None else cpus,
                       gpus_per_worker=gpus or 0.0, shared_run_dir=shared)
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
PickleOpt = Annotated[bool, typer.Option(help="allow pickled .bin checkpoints")]
TrustOpt = Annotated[bool, typer.Option(
    help="allow the recipe's code (fitness function, arch, reset) to be imported and run")]


def _read(recipe: Path) -> tuple[RecipeKind, str, Any]:
    """The recipe read once: its kind, method and validated contents. The YAML is read
    before the kinds are imported (torch with them: seconds), so a file that is missing or
    not YAML is refused at once."""
    from mergekit_pcb.recipe.schema import read_yaml_text

    data, text = read_yaml_text(recipe)
    from mergekit_pcb.kinds import kind_of

    kind, method = kind_of(data, recipe)
    return kind, method, kind.load(data, text, recipe)


MK = "mergekit-yaml flags"  # the help panel of the flags mergekit-yaml users bring


def _mk_bool(help_text: str, *decls: str) -> Any:
    return typer.Option(*decls, help=help_text, rich_help_panel=MK)


@app.command(epilog="Takes mergekit-yaml's command line unchanged: `pcbmerge run CONFIG "
             "OUT_PATH` followed by any mergekit-yaml flag (see their panel).")
@handle_errors
def run(
    recipe: RecipeArg,
    out_path: Annotated[Path | None, typer.Argument(
        help="output directory (as mergekit-yaml's OUT_PATH; or --output)",
        show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output directory")]
    = None,
    force: Annotated[bool, typer.Option(help="replace an output a previous run wrote")] = False,
    device: Annotated[str | None, typer.Option(
        help="device for the math (a search's merges and fitness): cpu, cuda, cuda:N or "
             "auto [default: cpu]")] = None,
    shard_size: Annotated[str | None, typer.Option(
        "--shard-size", "--out-shard-size",
        help="largest output shard in bytes, e.g. 5GB; K, M, B as mergekit reads them (5B = "
             "5e9) [default: 5B]")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", "--random-seed", help="seed for every random choice")] = None,
    dry_run: Annotated[bool, typer.Option(help="plan and check, write nothing")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
    quiet: Annotated[bool, typer.Option("--quiet/--no-quiet", "-q",
                                        help="no progress display")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", "--num-threads", "-j", help="torch CPU threads")] = None,
    allow_pickle: PickleOpt = False,
    workers: Annotated[int | None, typer.Option(
        help="searches: processes scoring candidates")] = None,
    resume: Annotated[bool, typer.Option(
        help="searches: continue a stopped or killed run")] = False,
    trust_code: TrustOpt = False,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    cpus_per_worker: CpusOpt = None,
    gpus_per_worker: GpusOpt = None,
    shared_run_dir: SharedOpt = False,
    allow_crimes: Annotated[bool, _mk_bool("merge models of different architectures")]
    = False,
    unsafe_truncate_embeddings: Annotated[bool, _mk_bool("refused (use a tokenizer: section)")]
    = False,
    trust_remote_code: Annotated[bool, _mk_bool("accepted; a merge runs no model code")]
    = False,
    transformers_cache: Annotated[str | None, typer.Option(
        help="folder of downloaded hub models (sets HF_HUB_CACHE)", rich_help_panel=MK)]
    = None,
    lora_merge_cache: Annotated[str | None, typer.Option(
        help="accepted; LoRA inputs are read tensor by tensor, never merged to disk",
        rich_help_panel=MK)] = None,
    lora_merge_dtype: Annotated[str | None, typer.Option(
        help="accepted; a LoRA input's update is formed in float32", rich_help_panel=MK)]
    = None,
    verbosity: Annotated[int, typer.Option(
        "-v", count=True, help="logging at INFO (-v) or DEBUG (-vv)", rich_help_panel=MK)] = 0,
    cuda: Annotated[bool, _mk_bool("= --device cuda")] = False,
    low_cpu_memory: Annotated[bool, _mk_bool("accepted; results are streamed already")]
    = False,
    lazy_unpickle: Annotated[bool, _mk_bool("accepted; pickles are memory-mapped already")]
    = False,
    read_to_gpu: Annotated[bool, _mk_bool("accepted; tensors move to --device one by one")]
    = False,
    multi_gpu: Annotated[bool, _mk_bool("= --device cuda (one GPU)")] = False,
    gpu_rich: Annotated[bool, _mk_bool("= --device cuda", "--gpu-rich")] = False,
    async_write: Annotated[bool, _mk_bool("accepted; shards are written behind the merge")]
    = False,
    write_threads: Annotated[int | None, typer.Option(
        help="accepted; one thread writes behind the merge", rich_help_panel=MK)] = None,
    copy_tokenizer: Annotated[bool, _mk_bool("copy the inputs' tokenizer files")] = True,
    clone_tensors: Annotated[bool, _mk_bool("accepted; every tensor is its own copy")]
    = False,
    write_model_card: Annotated[bool, _mk_bool("write README.md and mergekit_config.yml")]
    = True,
    safe_serialization: Annotated[bool, _mk_bool("safetensors (--no-...: refused)")] = True,
    as_lora: Annotated[int | None, typer.Option(
        "--as-lora", metavar="RANK", min=1,
        help="merges: write the merge's update over the base as a PEFT LoRA adapter of this "
             "rank (truncated SVD per matrix) instead of a full model")] = None,
) -> None:
    """Run a recipe of any kind (a merge or a search) and write the resulting model."""
    from mergekit_pcb.mergekit_compat import MERGEKIT_ONLY, translate

    given_here = locals()
    mk = translate({name: given_here[name] for name in MERGEKIT_ONLY}, device=device)
    output = _output_dir(out_path, output)
    kind, method, loaded = _read(recipe)
    from mergekit_pcb.io.writer import parse_size
    from mergekit_pcb.kinds import RunOptions

    given = {flag for flag, value in (
        ("--device", mk.device), ("--shard-size", shard_size), ("--threads", threads),
        ("--allow-pickle", allow_pickle or None), ("--workers", workers),
        ("--resume", resume or None), ("--trust-code", trust_code or None),
        ("--executor", executor), ("--ray-address", ray_address),
        ("--cpus-per-worker", cpus_per_worker), ("--gpus-per-worker", gpus_per_worker),
        ("--shared-run-dir", shared_run_dir or None), ("--as-lora", as_lora))
        if value is not None}
    kind.refuse_flags(given, recipe, method)
    if mk.given and kind.name != "merge":
        raise UserError(f"{mk.given[0]}: a mergekit-yaml flag, used by merge recipes only "
                        f"({recipe} is a {method} {kind.name})")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    ray = _ray_settings(executor, ray_address, cpus_per_worker, gpus_per_worker,
                        shared_run_dir)
    options = RunOptions(
        output=output, force=force, seed=seed, dry_run=dry_run, quiet=quiet or json_out,
        device=mk.device or "cpu",
        shard_size=parse_size(shard_size or "5B", "--shard-size/--out-shard-size"),
        threads=threads, allow_pickle=allow_pickle,
        workers=workers if workers is not None or ray is not None else 1, resume=resume,
        trust_code=trust_code, ray=ray, allow_crimes=allow_crimes,
        copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, as_lora=as_lora)
    _setup_torch(options.device, threads, ray)
    if transformers_cache is not None:  # read by io.resolve when a hub model is fetched
        os.environ["HF_HUB_CACHE"] = str(Path(transformers_cache).expanduser())
    if not (quiet or json_out):
        for note in mk.notes:
            print(note, file=sys.stderr)
    if dry_run:
        _print_plan(kind, kind.plan(loaded, recipe, options), json_out, dry_run=True)
        return
    with _resume_hint(kind.name != "merge" and kind.name != "reprogram"):
        summary = kind.run(loaded, recipe, options)
    if json_out:
        print(json.dumps(summary))
    elif not quiet:
        # one line whatever the path (rich would wrap it at the width, and read [..] as markup)
        stderr.print(_summary_line(summary), soft_wrap=True, markup=False, highlight=False)


def _output_dir(positional: Path | None, option: Path | None) -> Path:
    """The output directory, given as mergekit-yaml's OUT_PATH or as --output (or both,
    naming the same directory)."""
    if positional is None and option is None:
        raise UserError("no output directory: give it after the recipe (as mergekit-yaml's "
                        "OUT_PATH) or with --output/-o")
    if positional is not None and option is not None \
            and positional.expanduser().resolve() != option.expanduser().resolve():
        raise UserError(f"two output directories: OUT_PATH {str(positional)!r} and --output "
                        f"{str(option)!r}; give one")
    out = positional if positional is not None else option
    assert out is not None
    return out


def _summary_line(summary: dict[str, Any]) -> str:
    if "lora" in summary:  # run --as-lora
        lora = summary["lora"]
        return (f"wrote adapter {summary['output']} ({lora['matrices']} matrices as LoRA, "
                f"largest relative error {lora['max_relative_error']:.3g}; "
                f"{lora['whole_tensors']} tensors whole) in {summary['seconds']:.1f}s")
    if summary["kind"] == "merge":
        return (f"wrote {summary['output']} ({summary['tensors']} tensors, {summary['shards']} "
                f"shard(s), {summary['written_bytes'] / 1e6:.1f} MB) in "
                f"{summary['seconds']:.1f}s")
    if "run_dir" not in summary:  # a kind without run state (reprogram)
        return f"wrote {summary['output']} in {summary['seconds']:.1f}s"
    return (f"wrote {summary['output']} in {summary['seconds']:.1f}s (run state in "
            f"{summary['run_dir']})")


@app.command()
@handle_errors
def validate(recipe: RecipeArg, json_out: JsonOpt = False, allow_pickle: PickleOpt = False,
             ) -> None:
    """Check a recipe of any kind without computing: files, tensors, parameters, data."""
    kind, _, loaded = _read(recipe)
    from mergekit_pcb.kinds import RunOptions

    plan = kind.plan(loaded, recipe, RunOptions(allow_pickle=allow_pickle))
    _print_plan(kind, plan, json_out, dry_run=False)


def _print_plan(kind: RecipeKind, plan: dict[str, Any], json_out: bool, dry_run: bool) -> None:
    if json_out:
        print(json.dumps({**plan, "dry_run": dry_run}))
        return
    lines = kind.describe(plan)
    stdout.print(f"[green]{lines[0]}[/green]", highlight=False, soft_wrap=True)
    for line in lines[1:]:
        stdout.print(line, highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        stdout.print("dry run: nothing written")


@app.command()
@handle_errors
def methods(json_out: JsonOpt = False) -> None:
    """List every method of every recipe kind, with its parameters and defaults."""
    from mergekit_pcb.kinds.catalog import listing

    infos = listing()  # without importing torch, once the listing is kept
    if json_out:
        print(json.dumps({m.name: {"kind": m.kind, "summary": m.summary,
                                   "parameters": m.parameters} for m in infos},
                         indent=2, default=str))
        return
    for m in infos:
        table = Table("parameter", "default", "where", "meaning",
                      title=f"{m.name} ({m.kind}): {m.summary}", title_justify="left")
        for p in m.parameters:
            default = str(p["default"]) + (f" ({'|'.join(map(str, p['choices']))})"
                                           if p["choices"] else "")
            table.add_row(p["name"], default, p["where"], p["doc"])
        stdout.print(table)


@app.command()
@handle_errors
def inspect(
    path: Annotated[str, typer.Argument(help="model directory, .safetensors file or hub id")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="allow pickled .bin checkpoints")] = False,
) -> None:
    """List a checkpoint's tensors with shapes and dtypes, and totals."""
    from mergekit_pcb.io.resolve import resolve_model_path

    # A path that is not there (or a hub id not to be had) is refused before the reader
    # imports torch: seconds sooner.
    where = resolve_model_path(path, allow_pickle=allow_pickle)
    from mergekit_pcb.io.checkpoints import open_checkpoint

    with open_checkpoint(path, allow_pickle=allow_pickle, resolved=where) as ckpt:
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


@app.command("extract-lora")
@handle_errors
def extract_lora_command(
    finetuned: Annotated[str, typer.Argument(
        help="fine-tuned model (directory, .safetensors file, hub id or BASE+ADAPTER)")],
    base: Annotated[str, typer.Option("--base", help="the model the adapter applies to")],
    rank: Annotated[int, typer.Option("--rank", "-r", min=1,
                                      help="LoRA rank (with --energy: the largest)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="adapter directory")],
    energy: Annotated[float | None, typer.Option(
        help="choose each matrix's rank as the smallest holding this share of its update's "
             "squared singular values, e.g. 0.9")] = None,
    force: Annotated[bool, typer.Option(help="replace an output a previous run wrote")]
    = False,
    json_out: JsonOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Write FINETUNED − BASE as a PEFT LoRA adapter (the job of mergekit-extract-lora), with
    each matrix's rank and relative error."""
    from mergekit_pcb.engine.extract import extract_lora

    result = extract_lora(finetuned, base, output, rank=rank, energy=energy, force=force,
                          allow_pickle=allow_pickle)
    if json_out:
        print(json.dumps(result.report()))
        return
    table = Table("matrix", "rank", "relative error")
    for m in result.matrices:
        table.add_row(m.name, f"{m.rank}/{m.full_rank}", f"{m.relative_error:.3g}")
    stdout.print(table)
    info = result.summary()
    stdout.print(f"{info['matrices']} matrices as LoRA (largest relative error "
                 f"{info['max_relative_error']:.3g}), {info['whole_tensors']} tensors whole; "
                 f"written to {info['output']}", soft_wrap=True, markup=False, highlight=False)


@app.command()
@handle_errors
def analyze(
    recipe: RecipeArg,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o",
        help="report directory: report.json, report.md, report.html, heat maps (PNG)")]
    = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    merged: Annotated[Path | None, typer.Option(
        help="an existing merge output to measure instead of merging in memory")] = None,
    merge: Annotated[bool, typer.Option(
        help="measure the recipe's own merge (computed in memory, tensor by tensor)")] = True,
    density: Annotated[float | None, typer.Option(
        help="density for the sign-conflict and used-by-k counts [default: the recipe's; "
             "0.2 for a method without one]")] = None,
    spectral: Annotated[bool, typer.Option(
        help="SVD figures of the 2-D tensors (effective rank, interference, alignment)")]
    = True,
    conv_matrix: Annotated[bool, typer.Option(
        "--conv-matrix",
        help="SVD figures of conv kernels too (3-D to 5-D), as matrices of one row per "
             "output channel (the spectral methods' `conv: matrix`)")] = False,
    spectrum: Annotated[str | None, typer.Option(
        metavar="TENSOR",
        help="the matrix whose singular values the report plots (each task's, their sum's, "
             "the merged update's) [default: the layer matrix with the largest norm ratio "
             "if one reaches 5×, else the highest sign conflict]")] = None,
    device: Annotated[str, typer.Option(
        help="device for the math: cpu, cuda, cuda:N or auto")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress line")] = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Diagnose a merge recipe layer by layer: where the tasks compete, before and after."""
    kind, method, _ = _read(recipe)
    if kind.name != "merge":
        from mergekit_pcb.errors import RecipeError

        raise RecipeError(f"{recipe}: merge_method '{method}' is a {kind.name}; analyze "
                          "reads merge recipes")
    from mergekit_pcb.mergekit_compat import parse_device

    device = parse_device(device)
    _setup_torch(device, None)
    from mergekit_pcb.analysis.report import (
        aggregate,
        short_names,
        spectrum_summary,
        table_rows,
        write_report,
    )
    from mergekit_pcb.analysis.run import analyze_recipe_file

    def progress(i: int, total: int, name: str) -> None:
        if not (quiet or json_out) and sys.stderr.isatty():
            print(f"\ranalyzing {i + 1}/{total} {name[:60]:<60}", end="", file=sys.stderr,
                  flush=True)

    measured = analyze_recipe_file(recipe, merged_dir=merged, merge=merge, density=density,
                                   spectral=spectral, device=device,
                                   allow_pickle=allow_pickle, conv_matrix=conv_matrix,
                                   spectrum=spectrum, progress=progress)
    if not (quiet or json_out) and sys.stderr.isatty():
        print("\r" + " " * 80 + "\r", end="", file=sys.stderr, flush=True)
    report = aggregate(measured)
    written = write_report(report, output) if output is not None else []
    if json_out:
        print(json.dumps(report))
        return
    header, rows = table_rows(report)
    table = Table(*header, title=f"{report['method']} over "
                  f"{', '.join(short_names(report['models']))} (per-task figures in this "
                  "order)", title_justify="left")
    for row in rows:
        table.add_row(*row)
    # as wide as its cells (3 columns of border and padding each): where stdout is not a
    # terminal, not cut at rich's default 80 columns
    widest = [max(len(line) for cell in col for line in cell.split("\n"))
              for col in zip(header, *rows, strict=True)]
    wide = sum(widest) + 3 * len(widest) + 1
    (stdout if stdout.is_terminal or wide <= stdout.width else Console(width=wide)).print(table)
    if report["spectrum"] is not None:
        stdout.print(spectrum_summary(report), markup=False, highlight=False, soft_wrap=True)
    for line in [*report["plan_warnings"], *(w["message"] for w in report["warnings"])]:
        stderr.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
    s = report["suggestion"]
    stdout.print(f"suggestion (not a measurement): try {s['try']}: {s['reason']}",
                 markup=False, highlight=False, soft_wrap=True)
    if output is not None:
        stdout.print(f"wrote {', '.join(written)} to {output}", markup=False,
                     highlight=False, soft_wrap=True)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


class Split(str, Enum):
    select = "select"
    report = "report"
    all = "all"


@app.command("evolve")
@handle_errors
def evolve_command(
    recipe: Annotated[Path, typer.Argument(help="search recipe (YAML)")] = Path("recipe.yaml"),
    pop: Annotated[int | None, typer.Option(help="population size (overrides the recipe)")]
    = None,
    generations: Annotated[int | None, typer.Option(help="generations (overrides)")] = None,
    workers: Annotated[int | None, typer.Option(
        help="processes (or Ray workers) scoring candidates [default: 1; with --executor "
             "ray, as many as the cluster holds]")] = None,
    resume: Annotated[bool, typer.Option(help="continue a stopped or killed run")] = False,
    seed: Annotated[int | None, typer.Option(help="seed (overrides the recipe)")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="output directory [default: merged-RECIPE]")] = None,
    force: Annotated[bool, typer.Option(help="replace an output and run a previous run wrote")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live table")] = False,
    threads: Annotated[int, typer.Option(
        help="torch threads per scoring process (equal values give equal scores)")] = 1,
    run_dir: Annotated[Path | None, typer.Option(
        help="run state and population [default: OUTPUT.run]")] = None,
    shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB")] = "5GB",
    allow_pickle: PickleOpt = False,
    trust_code: TrustOpt = False,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    cpus_per_worker: CpusOpt = None,
    gpus_per_worker: GpusOpt = None,
    shared_run_dir: SharedOpt = False,
    device: Annotated[str, typer.Option(
        help="where the population is merged and scored: cpu, cuda, cuda:N or auto (with "
             "--executor ray: cuda, each worker's own GPU)")] = "cpu",
    dry_run: Annotated[bool, typer.Option(help="plan and check, write nothing")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
) -> None:
    """Evolve a population of checkpoints with a search recipe (e.g. evolver)."""
    from mergekit_pcb.errors import RecipeError
    from mergekit_pcb.evolve.run import evolve, plan_evolution
    from mergekit_pcb.io.writer import parse_size
    from mergekit_pcb.kinds.search import search_summary
    from mergekit_pcb.mergekit_compat import parse_device

    if not recipe.exists():
        raise RecipeError(f"recipe not found: {recipe}"
                          + (" (no recipe.yaml in the working directory)"
                             if recipe == Path("recipe.yaml") else ""))
    kind, method, loaded = _read(recipe)
    if kind.name != "search":
        raise RecipeError(f"{recipe}: merge_method '{method}' is a {kind.name}, not a search; "
                          "run it with `pcbmerge run`")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    ray = _ray_settings(executor, ray_address, cpus_per_worker, gpus_per_worker,
                        shared_run_dir)
    device = parse_device(device)
    _setup_torch(device, None, ray)
    size = parse_size(shard_size)
    if dry_run:  # as `pcbmerge run --dry-run` on a search, with this command's overrides
        parsed, text = loaded
        _print_plan(kind, plan_evolution(parsed, text, recipe, output=output, pop=pop,
                                         generations=generations, seed=seed, run_dir=run_dir,
                                         allow_pickle=allow_pickle), json_out, dry_run=True)
        return
    with _resume_hint(True):
        summary = evolve(recipe, output, pop=pop, generations=generations,
                         workers=workers if workers is not None or ray is not None else 1,
                         resume=resume, seed=seed, force=force, quiet=quiet or json_out,
                         threads=threads, run_dir=run_dir, shard_size=size,
                         allow_pickle=allow_pickle, trust_code=trust_code, loaded=loaded,
                         ray=ray, device=device)
    if json_out:
        print(json.dumps(search_summary(summary, method)))
    else:  # even with --quiet (no live table): where the result is
        stderr.print(f"wrote {summary.output} in {summary.seconds:.1f}s "
                     f"(run state in {summary.run_dir})", soft_wrap=True, markup=False,
                     highlight=False)


@app.command("eval")
@handle_errors
def eval_command(
    model: Annotated[str, typer.Argument(help="model directory, .safetensors file or hub id")],
    fitness: Annotated[Path, typer.Option(help="fitness YAML (or a search recipe)")],
    split: Annotated[Split, typer.Option(help="which data to score on")] = Split.all,
    json_out: JsonOpt = False,
    threads: Annotated[int, typer.Option(help="torch threads")] = 1,
    trust_code: TrustOpt = False,
) -> None:
    """Score a checkpoint with the fitness code a search uses."""
    from mergekit_pcb.evolve.fitness import SPLITS
    from mergekit_pcb.evolve.run import evaluate_checkpoint, load_fitness_file

    splits = SPLITS if split is Split.all else (split.value,)
    spec = load_fitness_file(fitness)
    scores = evaluate_checkpoint(model, fitness, splits, threads=threads, spec=spec,
                                 trust_code=trust_code)
    if json_out:
        print(json.dumps({"model": model, "metric": spec.metric_name,
                          "maximize": spec.maximize, **scores}))
        return
    table = Table("split", spec.metric_name)
    for name, value in scores.items():
        table.add_row(name, f"{value:.6g}")
    stdout.print(table)


@app.command()
@handle_errors
def restore(
    in_dir: Annotated[Path, typer.Argument(help="folder of degraded PNG/JPEG images")],
    out_dir: Annotated[Path, typer.Argument(help="folder to write the restored PNGs to")],
    model: Annotated[Path, typer.Option(
        help="the frozen model: an osr-reprogram recipe (its model: block), a Hugging Face "
             "model directory, or .safetensors weights with --arch")],
    module: Annotated[Path, typer.Option(
        help="the trained module: module.safetensors or the run's output directory")],
    arch: Annotated[str | None, typer.Option(
        help="with .safetensors --model: package.module:factory building the model")] = None,
    arch_kwargs: Annotated[str | None, typer.Option(
        help="with --arch: keyword arguments of the factory, as a JSON object")] = None,
    force: Annotated[bool, typer.Option(help="replace an OUT_DIR a previous run wrote")]
    = False,
    device: Annotated[Device, typer.Option(help="device for the model")] = Device.cpu,
    json_out: JsonOpt = False,
    trust_code: TrustOpt = False,
) -> None:
    """Restore images with a frozen model and its osr-reprogram module (any image size)."""
    from mergekit_pcb.reprogram.restore import restore_folder

    _setup_torch(device.value, None)
    summary = restore_folder(model, module, in_dir, out_dir, arch=arch, arch_kwargs=arch_kwargs,
                             force=force, trust_code=trust_code, device=device.value)
    if json_out:
        print(json.dumps(summary))
    else:
        stderr.print(f"wrote {summary['images']} image(s) to {summary['output']} in "
                     f"{summary['seconds']:.1f}s", soft_wrap=True, markup=False, highlight=False)


# `mergekit-yaml CONFIG_FILE OUT_PATH [flags]`: `pcbmerge run` under mergekit's name, so
# a script written for mergekit runs by changing nothing but the install.
mergekit_yaml_app = typer.Typer(name="mergekit-yaml", no_args_is_help=True,
                                pretty_exceptions_enable=False, add_completion=False)
mergekit_yaml_app.command(help="Merge models from a mergekit YAML recipe (mergekit-yaml's "
                          "command line, run by mergekit-pcb's `pcbmerge run`).")(run)


def _invoke(command: typer.Typer, argv: list[str] | None, prog_name: str) -> int:
    """Run a typer app; its usage errors (an unknown flag, a value of the wrong type) as
    the one line our own errors are (typer would draw a box), exit code 2."""
    try:  # typer 0.2x parses with its own copy of click
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx

    args = sys.argv[1:] if argv is None else argv
    try:
        rv = command(args=args, prog_name=prog_name, standalone_mode=False)
    except cx.NoArgsIsHelpError as e:
        e.show()
        return 2
    except cx.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else prog_name
        report_error("error", f"{where}: {e.format_message()}", 2, "--json" in args)
        return 2
    except cx.ClickException as e:  # a file that cannot be opened and the like
        report_error("error", e.format_message(), 2, "--json" in args)
        return 2
    except typer.Abort:
        report_error("interrupted", "", 130, "--json" in args)
        return 130
    return rv if isinstance(rv, int) else 0


def _quiet_omp() -> None:
    # Idle OpenMP threads sleep instead of spinning: a spinning thread takes a core that
    # another process (or our reader and writer threads) needs. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _exit(code: int, argv: list[str] | None) -> NoReturn:
    """The process's exit, which waits for a kernel build under way: said in one line
    (not with --quiet or --json). Here, at the process's end, not in each command: a
    command run in process (tests, scripts) leaves its process running."""
    args = sys.argv[1:] if argv is None else argv
    if not {"--quiet", "--json"} & set(args):
        note_kernel_build()
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    _quiet_omp()
    _exit(_invoke(app, argv, "pcbmerge"), argv)


def mergekit_yaml_main(argv: list[str] | None = None) -> None:
    _quiet_omp()
    _exit(_invoke(mergekit_yaml_app, argv, "mergekit-yaml"), argv)


if __name__ == "__main__":
    main()
