"""Executing a plan: one output tensor at a time, straight into its shard.

For each output tensor the engine reads that tensor from each input it needs, checks it is
finite, hands it to the method on the compute device, and writes the result. Peak memory
is one tensor's inputs plus the method's scratch, whatever the model size.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mergekit_pcb.engine.card import write_artifacts
from mergekit_pcb.engine.plan import MergePlan, TensorTask
from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.io.writer import (
    OutputTensor,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    plan_shards,
)
from mergekit_pcb.methods import TensorInputs


@dataclass
class MergeResult:
    output: Path
    tensors: int
    shards: int
    read_bytes: int
    written_bytes: int
    seconds: float


def _load_malloc_trim() -> Callable[[int], object]:
    """glibc's malloc_trim, or a no-op elsewhere.

    Tensors of many sizes come and go while streaming; glibc keeps freed heap memory, so
    without trimming the resident size creeps up with the model size (measured: 0.6 GB at
    30M parameters, 1.9 GB at 500M for a global PCB merge). Trimming after each tensor keeps
    it flat at a negligible cost.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda nbytes: None
    freed_since_trim = [0]

    def release(nbytes: int) -> None:
        # A trim costs a few ms; once per 256 MB of processed tensors is enough.
        freed_since_trim[0] += nbytes
        if freed_since_trim[0] >= 256 << 20:
            freed_since_trim[0] = 0
            trim(0)

    return release


release_freed_memory = _load_malloc_trim()


def all_finite(tensor: torch.Tensor) -> bool:
    """NaN and ±Inf show up in the min or max; one reduction, no boolean temporary."""
    if tensor.numel() == 0:
        return True
    if tensor.dtype.itemsize == 1:  # float8: no aminmax kernel
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


# Elementwise work streams in slices of this many elements, so peak memory does not grow
# with the largest tensor (an embedding can hold a fifth of a small model). Measured on a
# global PCB merge: 4M-element slices left the heap fragmented (0.6 GB at 30M parameters,
# 1.1 GB at 500M); 1M-element slices stay flat (0.40 / 0.43 GB) and run faster.
CHUNK_ELEMENTS = 1 << 20


def slices(plan: MergePlan, task: TensorTask) -> list[tuple[int | None, int | None]]:
    """[start, stop) element ranges to process `task` in; (None, None) is the whole tensor."""
    route = task.route
    elementwise = route.kind != "merge" or (
        route.method is not None and route.method.elementwise(task.global_params))
    numel = math.prod(task.shape)
    if not elementwise or numel <= CHUNK_ELEMENTS:
        return [(None, None)]
    return [(a, min(a + CHUNK_ELEMENTS, numel)) for a in range(0, numel, CHUNK_ELEMENTS)]


def _read_inputs(plan: MergePlan, task: TensorTask, device: torch.device,
                 start: int | None = None, stop: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """The task's inputs (or a slice of them), checked finite, on `device` in the compute
    dtype."""
    values = {}
    for key in task.reads(plan.base_key):
        tensor = plan.checkpoints[key].read(task.name, start, stop)
        if plan.check_finite and not all_finite(tensor):
            raise CheckpointError(f"tensor '{task.name}' of model {key} contains NaN or Inf")
        values[key] = tensor.to(device=device, dtype=plan.compute_dtype)
    return values


def _method_inputs(plan: MergePlan, task: TensorTask, values: dict[str, torch.Tensor]
                   ) -> TensorInputs:
    route = task.route
    assert route.method is not None
    generators = None
    if route.method.uses_rng:
        # Keyed by the model's position, not its path: moving checkpoints changes nothing.
        generators = [tensor_generator(plan.seed, task.name, str(i))
                      for i in range(len(route.inputs))]
    return TensorInputs(
        name=task.name,
        base=values.get(plan.base_key) if plan.base_key else None,
        models=[values[k] for k in route.inputs],
        model_params=task.model_params,
        params=task.global_params,
        generators=generators,
        stats=route.stats,
    )


def compute_part(plan: MergePlan, task: TensorTask, device: torch.device,
                 start: int | None = None, stop: int | None = None) -> torch.Tensor:
    """The output for `task` (or its flat elements [start, stop)), in its output dtype, on
    the CPU."""
    route = task.route
    if route.kind in ("take", "copy"):
        assert route.source is not None
        return plan.checkpoints[route.source].read(task.name, start, stop)
    values = _read_inputs(plan, task, device, start, stop)
    if route.kind == "average":
        out = torch.stack([values[k] for k in route.inputs]).mean(dim=0)
    else:
        assert route.method is not None
        out = route.method.merge(_method_inputs(plan, task, values))
    out = out.to(device="cpu", dtype=task.out_dtype)
    if not all_finite(out):
        # Finite inputs, so the parameters (or the output dtype's range) are at fault.
        params = {**task.global_params, **({"models": task.model_params}
                                           if task.model_params else {})}
        raise CheckpointError(
            f"tensor '{task.name}': {route.label} gives NaN or Inf in "
            f"{str(task.out_dtype).removeprefix('torch.')} with parameters {params}")
    return out


def gather_statistics(plan: MergePlan, device: torch.device,
                      progress: Progress | None = None) -> None:
    """Run every statistics pass of every route that has them, in order, from fresh
    statistics (a plan may be executed more than once)."""
    plan.reset_statistics()
    for route in plan.routes:
        if route.stats is None:
            continue
        tasks = [t for t in plan.tasks if t.route is route]
        for p, name in enumerate(route.stats.pass_names):
            bar = None if progress is None else progress.add_task(
                name, total=sum(plan.task_read_bytes(t) for t in tasks),
                tensors=f"0/{len(tasks)}")
            for i, task in enumerate(tasks):
                for start, stop in slices(plan, task):
                    values = _read_inputs(plan, task, device, start, stop)
                    route.stats.observe(p, _method_inputs(plan, task, values))
                    release_freed_memory(sum(v.numel() * v.element_size()
                                             for v in values.values()))
                    del values
                if progress is not None and bar is not None:
                    progress.update(bar, advance=plan.task_read_bytes(task),
                                    tensors=f"{i + 1}/{len(tasks)}")
            route.stats.finish(p)


def merge_in_memory(plan: MergePlan, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Execute `plan` into a state dict: the same passes and slices as `write_plan`, so the
    tensors are bit-identical to what `pcbmerge run` writes."""
    dev = torch.device(device)
    gather_statistics(plan, dev)
    out: dict[str, torch.Tensor] = {}
    for task in plan.tasks:
        parts = slices(plan, task)
        if len(parts) == 1:
            out[task.name] = compute_part(plan, task, dev).reshape(task.shape)
            continue
        merged = torch.empty(task.shape, dtype=task.out_dtype)
        flat = merged.view(-1)
        for a, b in parts:
            flat[a:b] = compute_part(plan, task, dev, a, b)
        out[task.name] = merged
    return out


def write_plan(plan: MergePlan, directory: Path, *, shard_size: int = 5 * 10**9,
               device: str = "cpu", progress: Progress | None = None,
               artifacts: bool = True) -> int:
    """Execute `plan` into safetensors shards in `directory` (plus config, tokenizer, card
    and recipe with `artifacts`); returns the number of shards."""
    dev = torch.device(device)
    outputs = [OutputTensor(t.name, t.out_dtype, t.shape) for t in plan.tasks]
    shards = plan_shards(outputs, shard_size)
    gather_statistics(plan, dev, progress)
    total = sum(plan.task_read_bytes(t) for t in plan.tasks)
    bar = None if progress is None else progress.add_task(
        "merging", total=total, tensors=f"0/{len(plan.tasks)}")
    writer = ShardedSafetensorsWriter(directory, shards, metadata={"merged_by": "mergekit-pcb"})
    try:
        for i, task in enumerate(plan.tasks):
            writer.write_chunks(task.name, (compute_part(plan, task, dev, a, b)
                                            for a, b in slices(plan, task)))
            release_freed_memory(plan.task_read_bytes(task))
            if progress is not None and bar is not None:
                progress.update(bar, advance=plan.task_read_bytes(task),
                                tensors=f"{i + 1}/{len(plan.tasks)}")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if artifacts:
        write_artifacts(plan, directory)
    return len(shards)


def run_plan(plan: MergePlan, output: Path, *, force: bool = False, shard_size: int = 5 * 10**9,
             device: str = "cpu", quiet: bool = False, console: Console | None = None
             ) -> MergeResult:
    """Execute `plan` into `output`, built beside it and renamed into place when complete."""
    start = time.perf_counter()
    with atomic_output_dir(output, force=force, inputs=plan.input_paths()) as tmp, \
            progress_display(quiet, console) as progress:
        shards = write_plan(plan, tmp, shard_size=shard_size, device=device, progress=progress)
    return MergeResult(output.resolve(), len(plan.tasks), shards, plan.read_bytes,
                       plan.write_bytes, time.perf_counter() - start)


@contextmanager
def progress_display(quiet: bool, console: Console | None) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[tensors]} tensors"),
        DownloadColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=quiet,
        transient=False,
    )
    with progress:
        yield progress
