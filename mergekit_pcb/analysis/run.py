"""Streaming a recipe's tensors through the diagnostics, with the merge engine's readers.

The recipe is planned as `pcbmerge run` plans it (every check of files, names, shapes and
parameters, with the same one-line errors), then each merged tensor is read, measured and
dropped in turn: peak memory is one tensor's inputs, their task vectors and the method's
scratch, whatever the model size. After the merge, the merged update is either computed
by the engine's own per-tensor merge (`engine.stream.compute_part`, in the slices
`pcbmerge run` uses, so it is bit-identical to what `run` writes) or read from `--merged`.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_pcb.analysis.metrics import (
    SLICE,
    Spectra,
    TensorStats,
    after_merge,
    pick_spectrum,
    spectra,
    tensor_stats,
)
from mergekit_pcb.engine import plan_recipe_file
from mergekit_pcb.engine.plan import MergePlan, TensorTask
from mergekit_pcb.engine.stream import (
    compute_part,
    gather_statistics,
    read_part,
    release_freed_memory,
    slices,
)
from mergekit_pcb.engine.vocab import is_vocabulary_tensor
from mergekit_pcb.errors import CheckpointError, RecipeError
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.io.tokenizer import has_tokenizer, load_tokenizer
from mergekit_pcb.methods.pcb import PcbGlobalStats, pcb_scores, tensor_rows
from mergekit_pcb.methods.spectral import task_matrices

# The density at which sign conflicts and the used-by-k histogram are counted when the
# recipe's method has none (task_arithmetic, linear, the spectral methods): the TIES
# paper's default, top 20%.
DEFAULT_DENSITY = 0.2


@dataclass
class Measured:
    """What `analyze_plan` gives: per-tensor statistics and what the report says about the
    recipe."""

    recipe: str
    method: str
    base: str
    models: list[str]
    tensors: list[TensorStats]
    skipped: list[str]  # tensors not merged from task vectors (copied, averaged, taken)
    after: str | None  # "merge" (the recipe's method), "merged" (--merged) or None
    merged_dir: str | None
    density_source: str  # where the densities came from
    notes: list[str] = field(default_factory=list)  # the plan's own warnings
    tokenizers_differ: list[str] = field(default_factory=list)
    seconds: float = 0.0
    conv_matrix: bool = False  # conv kernels measured as matrices (spectral figures)
    spectrum: Spectra | None = None  # the spectra of one chosen matrix


def _density(task: TensorTask, i: int, override: float | None) -> tuple[float, str]:
    if override is not None:
        return override, "--density"
    if "density" in task.model_params[i]:
        return float(task.model_params[i]["density"]), "recipe"
    if "density" in task.global_params:
        return float(task.global_params["density"]), "recipe"
    return DEFAULT_DENSITY, f"default {DEFAULT_DENSITY} (the method has no density)"


def _weights(task: TensorTask) -> list[float]:
    return [float(p.get("weight", 1.0)) for p in task.model_params]


def _analysed(plan: MergePlan) -> list[TensorTask]:
    """The tensors the recipe's methods merge (not those copied, averaged or taken), where
    each model's task vector against the base is defined: a method that does not read the
    base (linear) has its base read beside, unless the rows move to another vocabulary."""
    return [t for t in plan.tasks if t.route.kind == "merge" and t.route.method is not None
            and (t.route.method.requires_base or t.vocab is None)]


def _merged_update(plan: MergePlan, task: TensorTask, dev: torch.device,
                   values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The recipe's merge of this tensor, by the engine's own per-part merge, from the
    inputs already read."""
    parts = slices(plan, task)
    if len(parts) == 1:
        return compute_part(plan, task, dev, inputs=dict(values)).reshape(task.shape)
    out = torch.empty(task.shape, dtype=task.out_dtype)
    flat = out.view(-1)
    for a, b in parts:
        sliced = {k: v.reshape(-1)[a:b] for k, v in values.items()}
        flat[a:b] = compute_part(plan, task, dev, a, b, inputs=sliced)
    return out


def _pcb_kept(task: TensorTask, deltas: list[torch.Tensor]) -> list[int]:
    """Entries each task keeps in a `pcb` merge (soft weight Sᵢ > 0: score above the task's
    drop threshold), from the same statistics the merge uses."""
    params = task.global_params
    tau = [d.float() for d in deltas]  # PCB computes in float32
    stats = task.route.stats
    if not isinstance(stats, PcbGlobalStats):
        rows, scores = tensor_rows(tau, [float(p["density"]) for p in task.model_params],
                                   clip=params["clip"], inter=params["inter"])
        return [int(torch.count_nonzero(s > r.drop_threshold))
                for s, r in zip(scores, rows, strict=True)]
    # whole-model statistics: the scores are elementwise, so a slice's scratch will do
    flat = [t.reshape(-1) for t in tau]
    kept = [0] * len(flat)
    for a in range(0, flat[0].numel(), SLICE):
        scores = pcb_scores([f[a:a + SLICE] for f in flat], stats.rows, params["inter"])
        for i, (s, r) in enumerate(zip(scores, stats.rows, strict=True)):
            kept[i] += int(torch.count_nonzero(s > r.drop_threshold))
    return kept


def _tokenizers_differ(plan: MergePlan) -> list[str]:
    """The models whose tokenizer maps tokens to other ids than the base's, when the recipe
    builds no output tokenizer (then embedding rows of the same index are other tokens)."""
    if plan.vocab is not None or plan.base_key is None:
        return []
    roots = {k: c.root for k, c in plan.checkpoints.items()}
    if not all(has_tokenizer(r) for r in roots.values()):
        return []
    base_vocab = load_tokenizer(roots[plan.base_key], plan.base_key).get_vocab()
    return [k for k, r in roots.items() if k != plan.base_key
            and load_tokenizer(r, k).get_vocab() != base_vocab]


def _open_merged(merged_dir: Path, plan: MergePlan, tasks: list[TensorTask],
                 allow_pickle: bool) -> Checkpoint:
    ckpt = open_checkpoint(str(merged_dir), allow_pickle=allow_pickle)
    try:
        for task in tasks:
            if task.name not in ckpt:
                raise CheckpointError(f"--merged {merged_dir}: has no tensor '{task.name}'")
            shape = tuple(ckpt.info(task.name).shape)
            if shape != tuple(task.shape):
                raise CheckpointError(
                    f"--merged {merged_dir}: tensor '{task.name}' has shape {list(shape)}, "
                    f"the recipe's merge gives {list(task.shape)}")
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def _is_matrix(shape: list[int] | tuple[int, ...], conv_matrix: bool) -> bool:
    """Whether a tensor of this shape is measured as a matrix: 2-D, or a conv kernel (3-D to
    5-D) under `conv_matrix`."""
    return len(shape) == 2 or (conv_matrix and 3 <= len(shape) <= 5)


def _named_spectrum(plan: MergePlan, tasks: list[TensorTask], name: str,
                    conv_matrix: bool) -> TensorTask:
    """The tensor `--spectrum NAME` names, checked before the long pass: one the recipe
    merges from the models' task vectors, and a matrix."""
    task = next((t for t in tasks if t.name == name), None)
    if task is None:
        if any(t.name == name for t in plan.tasks):
            raise RecipeError(f"--spectrum {name}: analyze measures no task vectors of this "
                              "tensor (the recipe copies, averages or takes it, or moves its "
                              "rows to another vocabulary)")
        close = difflib.get_close_matches(name, [t.name for t in tasks], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"--spectrum {name}: no such tensor among the {len(tasks)} the "
                          f"recipe merges{hint}")
    shape = list(task.shape)
    if not _is_matrix(shape, conv_matrix):
        also = (" (add --conv-matrix to take a conv kernel as a matrix)"
                if 3 <= len(shape) <= 5 else "")
        raise RecipeError(f"--spectrum {name}: tensor of shape {shape} is not a matrix "
                          f"(2-D){also}")
    return task


def analyze_plan(plan: MergePlan, recipe: str, *, merged_dir: Path | None = None,
                 merge: bool = True, density: float | None = None, spectral: bool = True,
                 device: str = "cpu", allow_pickle: bool = False, conv_matrix: bool = False,
                 spectrum: str | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> Measured:
    """Measure every tensor `plan` merges from task vectors; after the merge too unless
    `merge` is False and no `merged_dir` is given. `conv_matrix`: conv kernels (3-D to 5-D)
    get the spectral figures too, as matrices of one row per output channel. `spectrum`:
    the matrix whose singular values the report plots; without it, with `spectral`, the
    `metrics.pick_spectrum` of the layer matrices."""
    start = time.perf_counter()
    if plan.base_key is None:
        raise RecipeError(f"{recipe}: base_model: analyze measures task vectors θᵢ − θ₀ and "
                          "needs the recipe's base model")
    tasks = _analysed(plan)
    if not tasks:
        raise RecipeError(f"{recipe}: merge_method {plan.method.name}: no tensor is merged "
                          "from the models")
    if density is not None and not 0 < density <= 1:
        raise RecipeError(f"--density must be in (0, 1], got {density}")
    named = None if spectrum is None else _named_spectrum(plan, tasks, spectrum, conv_matrix)
    dev = torch.device(device)
    merged_ckpt = _open_merged(merged_dir, plan, tasks, allow_pickle) if merged_dir else None
    after = "merged" if merged_ckpt is not None else ("merge" if merge else None)
    try:
        if after == "merge":
            gather_statistics(plan, dev)  # whole-model statistics (global scope) first
        measured: list[TensorStats] = []
        sources: set[str] = set()
        for i, task in enumerate(tasks):
            if progress is not None:
                progress(i, len(tasks), task.name)
            stats, nbytes = _measure(plan, task, dev, merged_ckpt, after, density, spectral,
                                     sources, conv_matrix)
            measured.append(stats)
            release_freed_memory(nbytes)
        chosen = _chosen_spectrum(tasks, measured, named, spectral, conv_matrix)
        spectra_of = None
        if chosen is not None:
            # a second read of this one tensor's inputs: which one is known only now
            spectra_of = _spectra(plan, chosen[0], dev, merged_ckpt, after, conv_matrix,
                                  chosen[1])
    finally:
        if merged_ckpt is not None:
            merged_ckpt.close()
    route = tasks[0].route
    return Measured(
        recipe=recipe, method=plan.method.name, base=plan.base_key,
        models=list(route.inputs), tensors=measured,
        skipped=[t.name for t in plan.tasks if t not in tasks], after=after,
        merged_dir=str(merged_dir) if merged_dir else None,
        density_source=", ".join(sorted(sources)),
        # (what the plan says of the output's tokenizer concerns a written merge, not this)
        notes=[w for w in plan.warnings if not w.startswith("the output gets no tokenizer")],
        tokenizers_differ=_tokenizers_differ(plan), seconds=time.perf_counter() - start,
        conv_matrix=conv_matrix, spectrum=spectra_of)


def _chosen_spectrum(tasks: list[TensorTask], measured: list[TensorStats],
                     named: TensorTask | None, spectral: bool, conv_matrix: bool
                     ) -> tuple[TensorTask, str] | None:
    """The tensor whose spectra the report shows, and why: the one named, else (with the
    spectral figures on) the pick among the matrices of the layers (no vocabulary matrix:
    its SVD costs more than the rest of the model's)."""
    if named is not None:
        return named, "the matrix named by --spectrum"
    if not spectral:
        return None
    candidates = [s for t, s in zip(tasks, measured, strict=True)
                  if _is_matrix(s.shape, conv_matrix) and not is_vocabulary_tensor(t.name)]
    picked = pick_spectrum(candidates)
    if picked is None:
        return None
    return next(t for t in tasks if t.name == picked[0]), picked[1]


def _spectra(plan: MergePlan, task: TensorTask, dev: torch.device,
             merged_ckpt: Checkpoint | None, after: str | None, conv_matrix: bool,
             reason: str) -> Spectra:
    shape, base, deltas, update, nbytes = _task_vectors(plan, task, dev, merged_ckpt, after,
                                                        conv_matrix)
    out = spectra(task.name, shape, reason, deltas, update)
    del base, deltas, update
    release_freed_memory(nbytes)
    return out


def _task_vectors(plan: MergePlan, task: TensorTask, dev: torch.device,
                  merged_ckpt: Checkpoint | None, after: str | None, conv_matrix: bool
                  ) -> tuple[list[int], torch.Tensor, list[torch.Tensor], torch.Tensor | None,
                             int]:
    """One tensor read: its shape, the base, each model's task vector, the merged update
    (None without a merge) and the bytes read. The inputs go once the merge and the task vectors
    are made from them. Under `conv_matrix` a conv kernel comes as its matrix."""
    assert plan.base_key is not None
    values = read_part(plan, task, dev)
    assert isinstance(values, dict)
    nbytes = sum(v.numel() * v.element_size() for v in values.values())
    merged = None
    if after == "merge":
        merged = _merged_update(plan, task, dev, values)
    elif merged_ckpt is not None:
        merged = merged_ckpt.read(task.name).to(device=dev)
    if plan.base_key not in values:  # a method that does not read the base (linear)
        values[plan.base_key] = plan.checkpoints[plan.base_key].read(
            task.source(plan.base_key)).to(device=dev, dtype=task.compute_dtype)
    base = values[plan.base_key]
    deltas = task_matrices(base, [values[k] for k in task.route.inputs])
    update = None if merged is None else task_matrices(base, [merged])[0]
    del values, merged
    shape = list(base.shape)
    if conv_matrix and 3 <= base.dim() <= 5:
        # the spectral methods' `conv: matrix` view of a kernel: one row per output channel
        # (norms, cosines, signs and distances do not depend on the shape)
        base, deltas = base.reshape(shape[0], -1), [d.reshape(shape[0], -1) for d in deltas]
        update = None if update is None else update.reshape(shape[0], -1)
    return shape, base, deltas, update, nbytes


def _measure(plan: MergePlan, task: TensorTask, dev: torch.device,
             merged_ckpt: Checkpoint | None, after: str | None, density: float | None,
             spectral: bool, sources: set[str], conv_matrix: bool = False
             ) -> tuple[TensorStats, int]:
    """One tensor: read, merged, measured before and after the merge, dropped."""
    shape, base, deltas, update, nbytes = _task_vectors(plan, task, dev, merged_ckpt, after,
                                                        conv_matrix)
    chosen = [_density(task, i, density) for i in range(len(deltas))]
    sources.update(src for _, src in chosen)
    # Spectral figures for the matrices of the layers; a vocabulary matrix (embedding, LM
    # head) costs more SVD than the rest of the model together (design/spectral.md).
    spectral_here = spectral and not is_vocabulary_tensor(task.name)
    stats = tensor_stats(task.name, base, deltas, [d for d, _ in chosen], _weights(task),
                         spectral=spectral_here)
    stats.shape = shape
    if update is not None:
        after_merge(stats, update, deltas, spectral=spectral_here)
        if after == "merge" and plan.method.name == "pcb":
            stats.merge_kept = _pcb_kept(task, deltas)
    return stats, nbytes


def analyze_recipe_file(recipe_path: Path, *, merged_dir: Path | None = None,
                        merge: bool = True, density: float | None = None,
                        spectral: bool = True, device: str = "cpu",
                        allow_pickle: bool = False, conv_matrix: bool = False,
                        spectrum: str | None = None,
                        progress: Callable[[int, int, str], None] | None = None) -> Measured:
    """`analyze_plan` of a recipe file, planned as `pcbmerge run` plans it."""
    plan = plan_recipe_file(recipe_path, allow_pickle=allow_pickle)
    try:
        return analyze_plan(plan, str(recipe_path), merged_dir=merged_dir, merge=merge,
                            density=density, spectral=spectral, device=device,
                            allow_pickle=allow_pickle, conv_matrix=conv_matrix,
                            spectrum=spectrum, progress=progress)
    finally:
        plan.close()


__all__ = ["DEFAULT_DENSITY", "Measured", "analyze_plan", "analyze_recipe_file"]
