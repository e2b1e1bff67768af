"""Executing a plan: one output tensor at a time, straight into its shard.

For each output tensor the engine reads that tensor from each input it needs, checks it is
finite, hands it to the method on the compute device, and writes the result. Peak memory
is one tensor's inputs plus the method's scratch, whatever the model size, and whatever
the thread count: the parts read ahead, those being merged and those waiting to be
written each add up to at most the largest part (`part_budget`), and a part larger than
a slice is read only once it is admitted. The methods that rank or draw over a whole
tensor merge a large one in slices themselves (`methods.ops.combine_in_slices`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mergekit_pcb.engine.card import OutputFiles, write_artifacts
from mergekit_pcb.engine.memo import ModelParts, PreparedKey, PreparedMemo
from mergekit_pcb.engine.pipeline import InOrder, WriteBehind, read_ahead
from mergekit_pcb.engine.plan import CHUNK_ELEMENTS, MergePlan, TensorTask
from mergekit_pcb.engine.plan import slices as plan_slices
from mergekit_pcb.engine.postprocess import LINES_PASS, NORMS_PASS, Postprocess
from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.engine.vocab import align_rows, is_vocabulary_tensor
from mergekit_pcb.errors import CheckpointError, MethodFailure
from mergekit_pcb.io.writer import (
    OutputTensor,
    Shard,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    plan_shards,
)
from mergekit_pcb.methods import TensorInputs
from mergekit_pcb.methods.base import GlobalStats
from mergekit_pcb.methods.compiled import request_all


@dataclass
class MergeResult:
    output: Path
    tensors: int
    shards: int
    read_bytes: int
    written_bytes: int
    seconds: float


# glibc's mallopt parameter number for the size above which an allocation gets its own
# mapping (returned to the kernel on free, its pages faulted in and zeroed anew on reuse).
_M_MMAP_THRESHOLD = -3


def _load_malloc_policy() -> tuple[Callable[[], None], Callable[[int], object]]:
    """glibc's allocator, tuned for streaming (no-ops elsewhere): `tune()` before a merge,
    `release(nbytes)` after each tensor.

    A merge allocates and frees model-sized temporaries (tens of MB) thousands of times. By
    default glibc maps each one afresh, and the kernel zeroes its pages every time: a third
    of a 1B `ties` merge's time was system time. With the mapping threshold at 512 MB they
    come from the heap and are reused. glibc then keeps freed heap memory, so the resident
    size creeps up with the model size (measured before this tuning: 0.6 GB at 30M
    parameters, 1.9 GB at 500M for a global PCB merge); `release` trims it once per 2 GB of
    processed tensors, which keeps it flat without giving back what the next tensors reuse
    (1B `ties`, one thread: 77.5 s → 57.0 s; trim every 256 MB with the threshold: 64.9 s).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):
        return (lambda: None), (lambda nbytes: None)
    tuned = [False]
    freed_since_trim = [0]

    def tune() -> None:
        if not tuned[0]:
            tuned[0] = True
            mallopt(_M_MMAP_THRESHOLD, 512 << 20)

    def release(nbytes: int) -> None:
        freed_since_trim[0] += nbytes
        if freed_since_trim[0] >= 2 << 30:
            freed_since_trim[0] = 0
            trim(0)

    return tune, release


tune_allocator, release_freed_memory = _load_malloc_policy()


def trim_heap() -> None:
    """Give freed heap memory back now (the trim `release_freed_memory` does every 2 GB)."""
    release_freed_memory(2 << 30)


def all_finite(tensor: torch.Tensor) -> bool:
    """NaN and ±Inf show up in the min or max; one reduction, no boolean temporary."""
    if tensor.numel() == 0:
        return True
    if tensor.dtype.itemsize == 1:  # float8: no aminmax kernel
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def slices(plan: MergePlan, task: TensorTask) -> list[tuple[int | None, int | None]]:
    """[start, stop) element ranges to process `task` in; (None, None) is the whole tensor
    (`plan.slices`, with this module's `CHUNK_ELEMENTS`)."""
    return plan_slices(plan, task, CHUNK_ELEMENTS)


def _read_inputs(plan: MergePlan, task: TensorTask, device: torch.device,
                 start: int | None = None, stop: int | None = None,
                 keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The task's inputs (or a slice of them; or only `keys` of them), checked finite, on
    `device` in the compute dtype."""
    values = {}
    for key in task.reads(plan.base_key) if keys is None else keys:
        tensor = plan.checkpoints[key].read(task.source(key), start, stop)
        if plan.check_finite and not all_finite(tensor):
            raise CheckpointError(f"tensor '{task.name}' of model {key} contains NaN or Inf")
        values[key] = tensor.to(device=device, dtype=task.compute_dtype)
    if task.vocab is not None:  # whole tensors: rows in the output tokenizer's order
        values.update(align_rows(values, task.vocab))
    if plan.postprocess is not None and task.route.kind == "merge" and keys is None:
        # `rescale_norms`: every consumer (statistics, merge) sees the rescaled models
        values = plan.postprocess.rescale_inputs(values, task.route.inputs)
    return values


def _method_inputs(plan: MergePlan, task: TensorTask, values: dict[str, torch.Tensor],
                   models: list[int] | None = None, start: int | None = None) -> TensorInputs:
    """The method's view of a part: every model, or only those at positions `models`."""
    route = task.route
    assert route.method is not None
    positions = range(len(route.inputs)) if models is None else models
    generators = None
    if route.method.uses_rng:
        # Keyed by the model's position, not its path: moving checkpoints changes nothing.
        generators = [tensor_generator(plan.seed, task.name, str(i)) for i in positions]
    return TensorInputs(
        name=task.name,
        factors=_factors(plan, task, values, positions) if route.method.uses_factors
        and start is None and task.vocab is None else None,
        base=values.get(plan.base_key) if plan.base_key else None,
        models=[values[route.inputs[i]] for i in positions],
        model_params=[task.model_params[i] for i in positions],
        params=task.global_params,
        generators=generators,
        stats=route.stats,
        start=start,
        vocabulary=is_vocabulary_tensor(task.name),
    )


def _factors(plan: MergePlan, task: TensorTask, values: dict[str, torch.Tensor],
             positions: Iterable[int]) -> list[tuple[torch.Tensor, torch.Tensor] | None] | None:
    """Each model's task vector as LoRA factors (left·scale, right) where it is exactly one:
    an adapter over the recipe's own base; None when no model has them."""
    route = task.route
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for i in positions:
        key = route.inputs[i]
        ckpt = plan.checkpoints[key]
        update = getattr(ckpt, "update", None)
        found = update(task.source(key)) if update is not None \
            and getattr(ckpt, "base_ref", None) == plan.base_key else None
        if found is None:
            out.append(None)
            continue
        device = values[key].device
        out.append(((found.left * found.scale).to(device), found.right.to(device)))
    return out if any(f is not None for f in out) else None


Inputs = dict[str, torch.Tensor] | torch.Tensor  # a part's inputs, or a copied tensor


def read_part(plan: MergePlan, task: TensorTask, device: torch.device,
              start: int | None = None, stop: int | None = None) -> Inputs:
    """What computing a part needs from the disk: the inputs it merges, or the tensor it
    copies (what the reader thread does ahead of the merge)."""
    route = task.route
    if route.kind in ("take", "copy"):
        assert route.source is not None
        if task.vocab is not None:
            aligned = _read_inputs(plan, task, device)[route.source]
            return aligned.to(device="cpu", dtype=task.out_dtype)
        return plan.checkpoints[route.source].read(task.source(route.source), start, stop)
    return _read_inputs(plan, task, device, start, stop)


def compute_part(plan: MergePlan, task: TensorTask, device: torch.device,
                 start: int | None = None, stop: int | None = None,
                 inputs: Inputs | None = None, memo: PreparedMemo | None = None
                 ) -> torch.Tensor:
    """The output for `task` (or its flat elements [start, stop)), in its output dtype, on
    the CPU; `inputs` are what `read_part` gave, or are read now. With a `memo`, a separable
    method's per-model step is taken from it where it holds it (those models are not even
    read) and kept there otherwise."""
    route = task.route
    if (memo is not None and inputs is None and route.kind == "merge" and task.vocab is None
            and plan.postprocess is None
            and route.method is not None and route.method.separable(task.global_params)):
        return _output(plan, task, _compute_separable(plan, task, device, start, stop, memo))
    if inputs is None:
        inputs = read_part(plan, task, device, start, stop)
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs
    if route.kind == "average":
        out = torch.stack([values[k] for k in route.inputs]).mean(dim=0)
    else:
        assert route.method is not None
        try:
            out = route.method.merge(_method_inputs(plan, task, values, start=start))
        except torch.linalg.LinAlgError as e:
            raise MethodFailure(f"tensor {task.name}: {route.method.name}: {e}") from e
        if plan.postprocess is not None:
            out = plan.postprocess.apply(task.name, task.shape, is_vocabulary_tensor(task.name),
                                         out, values, route.inputs)
    return _output(plan, task, out)


def _compute_separable(plan: MergePlan, task: TensorTask, device: torch.device,
                       start: int | None, stop: int | None, memo: PreparedMemo
                       ) -> torch.Tensor:
    route = task.route
    method = route.method
    assert method is not None
    keys: list[PreparedKey | None] = []
    for i, key in enumerate(route.inputs):
        identity = plan.checkpoints[key].identity
        keys.append(None if identity is None else (identity, i, task.name, start))
    prepared = [None if k is None else memo.get(k) for k in keys]
    missing = [i for i, p in enumerate(prepared) if p is None]
    base_keys = [plan.base_key] if method.requires_base and plan.base_key else []
    values = _read_inputs(plan, task, device, start, stop, list(dict.fromkeys(
        base_keys + [route.inputs[i] for i in missing])))
    subset = _method_inputs(plan, task, values, missing)
    if missing:
        for i, tensor in zip(missing, method.prepare(subset), strict=True):
            prepared[i] = tensor
            key = keys[i]
            if key is not None:
                memo.put(key, tensor)
    every = replace(subset, models=(), model_params=task.model_params, generators=None)
    return method.combine(every, [p for p in prepared if p is not None])


def _output(plan: MergePlan, task: TensorTask, out: torch.Tensor) -> torch.Tensor:
    """A part's merge result in the output dtype on the CPU, checked finite."""
    route = task.route
    out = out.to(device="cpu", dtype=task.out_dtype)
    if not all_finite(out):
        # Finite inputs, so the parameters (or the output dtype's range) are at fault.
        params = {**task.global_params, **({"models": task.model_params}
                                           if task.model_params else {})}
        raise CheckpointError(
            f"tensor '{task.name}': {route.label} gives NaN or Inf in "
            f"{str(task.out_dtype).removeprefix('torch.')} with parameters {params}")
    return out


Part = tuple[int, TensorTask, int | None, int | None, bool]  # index, task, slice, last
R = TypeVar("R")

# torch threads per part. Slices of 1M elements are memory-bound: a parallel region each
# buys little when the cores are free and costs several times the work when another process
# holds one (measured: ties at 30M parameters took 18 s with 2 threads on a 2-core machine
# with one core busy, 4.6 s with 1). So parts run on one thread each, several parts side by
# side on as many worker threads as torch has threads (plain threads, no barrier to spin
# at: a busy core slows one worker, not all), next to the reader and writer threads. Whole
# tensors too: a per-tensor trim's histogram and tie-break run on one core anyway, so two
# tensors side by side keep both cores busy where one tensor on two threads would not. Only
# a huge whole tensor (an embedding of a large vocabulary) gets every thread, alone, so
# that no more than one such tensor's scratch is held at once; so does a tensor whose method
# sums over it (`thread_count_reductions`): torch splits a sum into one partial sum per
# thread, and mergekit sums with every thread of its process, so only the same count gives
# its bits.
SOLO_PART_ELEMENTS = 1 << 25


def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # per thread: the caller's own count is left alone


class ThreadPolicy:
    """`fixed` threads for everything, one part at a time (the `--threads` flag), or the
    rule above."""

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self.most = fixed or torch.get_num_threads()
        self._current = torch.get_num_threads()
        self._initial = self._current

    def solo(self, task: TensorTask, start: int | None) -> bool:
        """Whether this part runs alone in the calling thread (else on a part worker)."""
        if self.fixed is not None or self.most == 1:
            return True
        if task.route.method is not None and task.route.method.thread_count_reductions:
            # its sums split as mergekit's, on this process's thread count (a sliced
            # slerp's too: each slice's norms are those of one of mergekit's chunks)
            return True
        return start is None and math.prod(task.shape) >= SOLO_PART_ELEMENTS

    def workers(self, device: torch.device, pipeline: bool) -> InOrder:
        """Part workers: one per torch thread on the CPU when pipelined, else none."""
        side_by_side = pipeline and self.fixed is None and device.type == "cpu"
        return InOrder(self.most if side_by_side else 1, initializer=_one_torch_thread)

    def enter(self, task: TensorTask, start: int | None) -> None:
        want = self.fixed or (self.most if self.solo(task, start) else 1)
        if want != self._current:
            torch.set_num_threads(want)
            self._current = want

    def restore(self) -> None:
        if self._current != self._initial:
            torch.set_num_threads(self._initial)
            self._current = self._initial


def part_elements(part: Part) -> int:
    """Entries of a part's output (a slice, or the whole tensor)."""
    _, task, start, stop, _ = part
    return math.prod(task.shape) if start is None or stop is None else stop - start


def part_budget(plan: MergePlan, tasks: list[TensorTask] | None = None) -> int:
    """Entries of the largest part of `tasks` (default: the plan's): what the engine lets
    be held at once at each stage (read ahead, merging, waiting to be written), whatever
    the thread count, so that peak memory is a few times the largest part's, not the
    workers' count times it (two embeddings merged side by side, two more read ahead)."""
    return max((part_elements(p) for p in _parts(plan, plan.tasks if tasks is None else tasks)),
               default=1)


class Budgeted:
    """Parts handed to `workers` while the entries of those not yet handed over stay within
    `budget` (or are one part): past it, the caller waits for those in flight first."""

    def __init__(self, workers: InOrder, budget: int) -> None:
        self.workers = workers
        self.budget = budget
        self.held = 0

    def admit(self, part: Part, done: Callable[[R], None]) -> Callable[[R], None]:
        """Room for `part` (waiting for the parts in flight if need be); returns `done`
        wrapped to give its room back when it is handed over."""
        size = part_elements(part)
        if self.held + size > self.budget:
            self.workers.drain()
        self.held += size

        def handed_over(result: R) -> None:
            self.held -= size
            done(result)
        return handed_over


def _parts(plan: MergePlan, tasks: list[TensorTask]) -> Iterator[Part]:
    for i, task in enumerate(tasks):
        parts = slices(plan, task)
        for k, (start, stop) in enumerate(parts):
            yield i, task, start, stop, k == len(parts) - 1


def _reads(plan: MergePlan, tasks: list[TensorTask], device: torch.device, pipeline: bool,
           depth: int = 1) -> Iterator[tuple[Part, Inputs | None]]:
    """Every part of `tasks` with its inputs, read up to `depth` parts ahead in a thread
    when `pipeline`. A part larger than a slice (a whole tensor the method ranks or draws
    over) comes without them (None): whoever merges it reads them once `Budgeted` admits
    it, so that they count in the budget and no two such tensors' inputs are held at once
    (reading one ahead while another is merged would hold both)."""
    def read(part: Part) -> Inputs | None:
        if pipeline and part_elements(part) > CHUNK_ELEMENTS:
            return None
        return read_part(plan, part[1], device, part[2], part[3])

    if pipeline:
        yield from read_ahead(_parts(plan, tasks), read, depth, part_elements,
                              part_budget(plan, tasks))
    else:
        for part in _parts(plan, tasks):
            yield part, read(part)


def gather_statistics(plan: MergePlan, device: torch.device,
                      progress: Progress | None = None, pipeline: bool = False,
                      threads: ThreadPolicy | None = None, keep_parts: bool = False,
                      memo: PreparedMemo | None = None) -> None:
    """Run every statistics pass of every route that has them, in order, from fresh
    statistics (a plan may be executed more than once).

    With a thread policy, statistics that allow it (`GlobalStats.concurrent`) observe parts
    side by side on the policy's part workers. `keep_parts`: see `GlobalStats`. With a
    `memo`, what each model alone determined in an earlier merge is reused, and kept."""
    plan.reset_statistics()
    post = plan.postprocess
    if post is not None and post.rescale:
        _postprocess_pass(plan, NORMS_PASS, device, pipeline, progress, threads,
                          lambda task, start, values: post.norms_part(values,
                                                                      task.route.inputs),
                          post.add_norms)
        post.finish_norms()
    for r, route in enumerate(plan.routes):
        stats = route.stats
        if stats is None:
            continue
        stats.keep_parts = keep_parts
        keys: list[PreparedKey | None] = []
        if memo is not None:
            scope = f"statistics/{r}/{len(route.inputs)}"
            for i, key in enumerate(route.inputs):
                identity = plan.checkpoints[key].identity
                keys.append(None if identity is None else (identity, i, scope, None))
            stats.reuse([None if k is None else memo.result(k) for k in keys])
            stats.reuse_parts([None if k is None else ModelParts(memo, k[0], k[1], scope)
                               for k in keys])
        tasks = [t for t in plan.tasks if t.route is route and plan.observed(t)]
        with (threads.workers(device, pipeline) if threads is not None and stats.concurrent
              else InOrder(1)) as workers:
            for p, name in enumerate(stats.pass_names):
                bar = None if progress is None else progress.add_task(
                    name, total=sum(plan.task_read_bytes(t) for t in tasks),
                    tensors=f"0/{len(tasks)}")
                _statistics_pass(plan, stats, p, tasks, device, pipeline, threads, workers,
                                 progress, bar)
                stats.finish(p)
        results = stats.model_results() if memo is not None else None
        for key, value in zip(keys, results or (), strict=False):
            if key is not None and memo is not None:
                memo.keep_result(key, value)
    if post is not None and LINES_PASS in post.pass_names:
        _postprocess_pass(plan, LINES_PASS, device, pipeline, progress, threads,
                          functools.partial(_lines_part, plan, post), post.add_lines)
        post.finish_lines()
    if post is not None and post.pass_names:
        # What these passes freed stays in the heap (and in the part workers' arenas,
        # which the merge's workers do not reuse): given back now, the merge that follows
        # peaks where it would without them.
        trim_heap()


def _lines_part(plan: MergePlan, post: Postprocess, task: TensorTask, start: int | None,
                values: dict[str, torch.Tensor]) -> tuple[float, float]:
    """LiNeS's norms for one part: the merge (the method's statistics finished) and the
    steps before `lines`, as the merge pass will compute them."""
    route = task.route
    assert route.method is not None
    merged = route.method.merge(_method_inputs(plan, task, values, start=start))
    update = post.update(task.name, task.shape, is_vocabulary_tensor(task.name), merged,
                         values, route.inputs, before_lines=True)
    return post.lines_part(values, route.inputs, merged, update)


def _postprocess_pass(plan: MergePlan, name: str, device: torch.device, pipeline: bool,
                      progress: Progress | None, threads: ThreadPolicy | None,
                      work: Callable[[TensorTask, int | None, dict[str, torch.Tensor]], R],
                      collect: Callable[[R], None]) -> None:
    """One post-processing statistics pass over every merged part, on the part workers as
    the merge pass runs (its memory is the merge's); each part's numbers are summed in
    chunks no thread count splits, and `collect`ed in plan order."""
    tasks = [t for t in plan.tasks if t.route.kind == "merge"]
    bar = None if progress is None else progress.add_task(
        name, total=sum(plan.task_read_bytes(t) for t in tasks), tensors=f"0/{len(tasks)}")
    with (threads.workers(device, pipeline) if threads is not None else InOrder(1)) as workers:
        _pass_over(plan, tasks, device, pipeline, threads, workers, progress, bar, work,
                   collect)


def _statistics_pass(plan: MergePlan, stats: GlobalStats, p: int, tasks: list[TensorTask],
                     device: torch.device, pipeline: bool, threads: ThreadPolicy | None,
                     workers: InOrder, progress: Progress | None, bar: TaskID | None) -> None:
    def observe(task: TensorTask, start: int | None, values: dict[str, torch.Tensor]) -> None:
        stats.observe(p, _method_inputs(plan, task, values, start=start))

    _pass_over(plan, tasks, device, pipeline, threads, workers, progress, bar, observe)


def _pass_over(plan: MergePlan, tasks: list[TensorTask], device: torch.device, pipeline: bool,
               threads: ThreadPolicy | None, workers: InOrder, progress: Progress | None,
               bar: TaskID | None,
               work: Callable[[TensorTask, int | None, dict[str, torch.Tensor]], R],
               collect: Callable[[R], None] | None = None) -> None:
    """`work` on every part of `tasks` (read ahead when `pipeline`), on the part workers or
    alone as `threads` says; `collect` gets each part's result in plan order (so that sums
    of floats gathered there do not depend on which worker finished first)."""
    def observe(part: Part, values: Inputs | None) -> tuple[R, int]:
        _, task, start, stop, _ = part
        if values is None:  # a large part, read now (`_reads`)
            values = read_part(plan, task, device, start, stop)
        assert isinstance(values, dict)
        result = work(task, start, values)
        return result, sum(v.numel() * v.element_size() for v in values.values())

    def observed(part: Part, out: tuple[R, int]) -> None:
        i, task, _, _, last = part
        result, nbytes = out
        if collect is not None:
            collect(result)
        release_freed_memory(nbytes)
        if last and progress is not None and bar is not None:
            progress.update(bar, advance=plan.task_read_bytes(task),
                            tensors=f"{i + 1}/{len(tasks)}")

    budgeted = Budgeted(workers, part_budget(plan, tasks))
    for part, values in _reads(plan, tasks, device, pipeline, workers.width):
        task, start = part[1], part[2]
        done = budgeted.admit(part, functools.partial(observed, part))
        if threads is None or workers.width == 1 or threads.solo(task, start):
            workers.drain()  # a large whole tensor gets every thread, alone
            if threads is not None:
                threads.enter(task, start)
            workers.run_here(observe, done, part, values)
        else:
            workers.submit(observe, done, part, values)
        del values
    workers.drain()


# Entries visited (each input's entries, once per statistics pass and once to merge) from
# which a merge loads the fused kernels at its start: loading them costs about a second of
# one core, which a 30M-parameter `ties` merge (about 90M) does not win back (3.9–4.2 s
# against 3.6 s measured) and a 30M global `pcb` (about 450M) does (5.2–5.9 s, was 6.7).
KERNELS_WORTH = 1 << 28


def request_kernels_if_worth_it(plan: MergePlan) -> None:
    visits = sum(math.prod(t.shape) * len(t.route.inputs)
                 * (1 + (len(t.route.stat_passes) if plan.observed(t) else 0))
                 for t in plan.tasks if t.route.kind == "merge")
    if visits >= KERNELS_WORTH:
        request_all()


def merge_in_memory(plan: MergePlan, device: str = "cpu", memo: PreparedMemo | None = None
                    ) -> dict[str, torch.Tensor]:
    """Execute `plan` into a state dict: the same passes and slices as `write_plan`, so the
    tensors are bit-identical to what `pcbmerge run` writes. A `memo` carries separable
    methods' per-model steps over to the next merge of the same checkpoints."""
    dev = torch.device(device)
    tune_allocator()
    request_kernels_if_worth_it(plan)
    # With a memo the caller trades memory for speed: statistics may keep per-part values
    # for their later passes and the merge (a global PCB's task vectors and intra terms,
    # 2n × the model's size, held in the memo where its budget allows).
    gather_statistics(plan, dev, keep_parts=memo is not None, memo=memo)
    out: dict[str, torch.Tensor] = {}
    for task in plan.tasks:
        parts = slices(plan, task)
        if len(parts) == 1:
            out[task.name] = compute_part(plan, task, dev, memo=memo).reshape(task.shape)
            continue
        merged = torch.empty(task.shape, dtype=task.out_dtype)
        flat = merged.view(-1)
        for a, b in parts:
            flat[a:b] = compute_part(plan, task, dev, a, b, memo=memo)
        out[task.name] = merged
    return out


def merge_parts(plan: MergePlan, dev: torch.device, pipeline: bool, policy: ThreadPolicy,
                workers: InOrder, computed: Callable[[Part, torch.Tensor], None]) -> None:
    """Merge every part of `plan` (statistics gathered), read ahead when `pipeline`, on the
    part workers or alone as `policy` says; `computed` gets each output in plan order."""
    budgeted = Budgeted(workers, part_budget(plan))
    for part, inputs in _reads(plan, plan.tasks, dev, pipeline, workers.width):
        _, task, start, stop, _ = part
        done = budgeted.admit(part, functools.partial(computed, part))
        if workers.width == 1 or policy.solo(task, start):
            workers.drain()  # a large whole tensor gets every thread, alone
            policy.enter(task, start)
            workers.run_here(compute_part, done, plan, task, dev, start, stop, inputs)
        else:
            workers.submit(compute_part, done, plan, task, dev, start, stop, inputs)
        del inputs
    workers.drain()


def write_plan(plan: MergePlan, directory: Path, *, shard_size: int = 5 * 10**9,
               device: str = "cpu", progress: Progress | None = None,
               artifacts: bool = True, pipeline: bool = True,
               threads: int | None = None, files: OutputFiles | None = None) -> int:
    """Execute `plan` into safetensors shards in `directory` (plus config, tokenizer, card
    and recipe with `artifacts`); returns the number of shards.

    With `pipeline`, a reader thread reads the next part while this one is merged and a
    writer thread writes behind (`engine.pipeline`); the bytes are the same either way.
    `threads` fixes torch's thread count; None applies `ThreadPolicy`'s rule.
    """
    dev = torch.device(device)
    tune_allocator()
    request_kernels_if_worth_it(plan)
    outputs = [OutputTensor(t.name, t.out_dtype, t.shape) for t in plan.tasks]
    shards = plan_shards(outputs, shard_size)
    policy = ThreadPolicy(threads)
    try:
        return _write(plan, directory, dev, shards, progress,
                      (files or OutputFiles()) if artifacts else None, pipeline, policy)
    finally:
        policy.restore()


def _write(plan: MergePlan, directory: Path, dev: torch.device, shards: list[Shard],
           progress: Progress | None, artifacts: OutputFiles | None, pipeline: bool,
           policy: ThreadPolicy) -> int:
    gather_statistics(plan, dev, progress, pipeline=pipeline, threads=policy)
    total = sum(plan.task_read_bytes(t) for t in plan.tasks)
    bar = None if progress is None else progress.add_task(
        "merging", total=total, tensors=f"0/{len(plan.tasks)}")
    writer = ShardedSafetensorsWriter(directory, shards, metadata={"merged_by": "mergekit-pcb"})
    behind = WriteBehind(budget=part_budget(plan)) if pipeline else None

    def write(fn: Callable[..., object], *args: object, size: int = 0) -> None:
        if behind is None:
            fn(*args)
        else:
            behind.submit(fn, *args, size=size)

    def computed(part: Part, out: torch.Tensor) -> None:
        """A part's output, handed over in order: into the writer."""
        i, task, start, _, last = part
        if start is None or start == 0:
            write(writer.begin, task.name)
        write(writer.add, out, size=out.numel())
        if last:
            write(writer.end)
            release_freed_memory(plan.task_read_bytes(task))
            if progress is not None and bar is not None:
                progress.update(bar, advance=plan.task_read_bytes(task),
                                tensors=f"{i + 1}/{len(plan.tasks)}")

    workers = policy.workers(dev, pipeline)
    try:
        merge_parts(plan, dev, pipeline, policy, workers, computed)
        write(writer.close)
        if behind is not None:
            behind.drain()
    except BaseException:
        workers.close()
        if behind is not None:
            behind.close()  # the writer thread finishes what it holds before the abort
        writer.abort()
        raise
    finally:
        workers.close()
        if behind is not None:
            behind.close()
    if artifacts is not None:
        left_out = write_artifacts(plan, directory, artifacts, device=str(dev))
        if progress is not None and not progress.disable:  # the card lists them too
            for note in left_out:
                progress.console.print("note: not carried over from the inputs: "
                                       + note.replace("`", ""), markup=False, highlight=False,
                                       soft_wrap=True)
    return len(shards)


def run_plan(plan: MergePlan, output: Path, *, force: bool = False, shard_size: int = 5 * 10**9,
             device: str = "cpu", quiet: bool = False, console: Console | None = None,
             threads: int | None = None, files: OutputFiles | None = None) -> MergeResult:
    """Execute `plan` into `output`, built beside it and renamed into place when complete."""
    start = time.perf_counter()
    with atomic_output_dir(output, force=force, inputs=plan.input_paths()) as tmp, \
            progress_display(quiet, console) as progress:
        shards = write_plan(plan, tmp, shard_size=shard_size, device=device, progress=progress,
                            threads=threads, files=files)
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
