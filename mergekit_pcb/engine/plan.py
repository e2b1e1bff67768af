"""Planning a merge: every check that needs no tensor data, done before any work starts.

The plan opens each checkpoint's headers, decides for every output tensor which rule
serves it (a `tensors:` rule, a built-in rule for buffers, or the recipe's method), checks
names, shapes and dtypes across inputs, evaluates parameters, and fixes the output layout.
`pcbmerge validate` stops here; `pcbmerge run` executes the plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.engine.postprocess import (
    Postprocess,
    check_postprocess,
    layer_map,
    read_config,
)
from mergekit_pcb.engine.slices import (
    PRE_LAYER,
    check_range,
    check_slices,
    layer_count_overrides,
    layer_templates,
    slice_inputs,
    with_layer,
)
from mergekit_pcb.engine.vocab import (
    Alignment,
    VocabPlan,
    build_vocab_plan,
    is_vocabulary_tensor,
    resolve_chat_template,
)
from mergekit_pcb.errors import CheckpointError, RecipeError
from mergekit_pcb.io.artifacts import model_dir
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.mapped import mapped_files
from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.io.resolve import model_paths
from mergekit_pcb.io.tokenizer import has_tokenizer
from mergekit_pcb.methods import REGISTRY, MergeMethod, get_method
from mergekit_pcb.methods.base import GlobalStats
from mergekit_pcb.recipe.params import (
    check_parameter_keys,
    depth_position,
    layer_index,
    resolve_params,
    setting_filters,
)
from mergekit_pcb.recipe.schema import MergeRecipe, ParameterValue

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}
RUNNING_STATS = ("running_mean", "running_var")
# mergekit 0.1.5's methods. A recipe without `dtype` computes them as mergekit does: in the
# inputs' dtype (a half-precision TIES keeps other entries than a float32 one). Methods
# mergekit lacks (pcb) compute in float32.
MERGEKIT_METHODS = frozenset({
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "nuslerp",
    "multislerp", "karcher", "model_stock", "della", "della_linear", "breadcrumbs",
    "breadcrumbs_ties", "sce", "passthrough", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
})


@dataclass
class Route:
    """How a group of output tensors is produced; `label` is what the model card shows."""

    label: str
    kind: str  # "merge" | "take" | "average" | "copy"
    method: MergeMethod | None = None
    recipe_params: Mapping[str, ParameterValue] = field(default_factory=dict)
    model_params: list[Mapping[str, ParameterValue]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # model keys combined (merge/average)
    source: str | None = None  # model key (take/copy)
    tensor_names: list[str] = field(default_factory=list)
    stats: GlobalStats | None = None  # whole-model statistics, gathered before merging
    # What `stats` was made from, so that every execution starts from fresh statistics.
    stats_args: tuple[Any, ...] | None = None
    # The recipe's `postprocess:` steps act on this route's tensors (its merges then read
    # the base, which the steps subtract and add back).
    post: bool = False

    def reset_statistics(self) -> None:
        if self.stats_args is not None:
            assert self.method is not None
            self.stats = self.method.global_stats(*self.stats_args)

    @property
    def stat_passes(self) -> tuple[str, ...]:
        return self.stats.pass_names if self.stats is not None else ()


@dataclass
class TensorTask:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    route: Route
    global_params: dict[str, Any] = field(default_factory=dict)
    model_params: list[dict[str, Any]] = field(default_factory=list)
    compute_dtype: torch.dtype = torch.float32
    # model key -> the tensor that feeds this output there (slices map layers); default: name
    source_names: dict[str, str] = field(default_factory=dict)
    # A vocabulary-indexed tensor whose rows move to the output tokenizer's order (read and
    # merged whole); None: streamed as stored.
    vocab: Alignment | None = None

    def source(self, key: str) -> str:
        return self.source_names.get(key, self.name)

    def reads(self, base_key: str | None) -> list[str]:
        """Model keys whose copy of this tensor must be read, in order."""
        if self.route.kind in ("take", "copy"):
            assert self.route.source is not None
            keys = [self.route.source]
        else:
            needs_base = (self.route.kind == "merge" and self.route.method is not None
                          and (self.route.method.requires_base or self.route.post))
            keys = ([base_key] if needs_base and base_key else []) + self.route.inputs
        if self.vocab is not None:  # every model whose rows feed a missing token's default
            keys += self.vocab.keys
        return list(dict.fromkeys(keys))


@dataclass
class MergePlan:
    recipe: MergeRecipe
    recipe_text: str
    method: MergeMethod
    checkpoints: dict[str, Checkpoint]
    base_key: str | None
    tasks: list[TensorTask]
    routes: list[Route]
    compute_dtype: torch.dtype | None  # the recipe's `dtype`; None: chosen per tensor
    seed: int
    owned: frozenset[str] = frozenset()  # checkpoints this plan opened (and closes)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. the layer count
    # Inputs are checked finite as they are read; a caller whose inputs were checked when
    # they were made (an evolution's members) turns it off.
    check_finite: bool = True
    # The output tokenizer and each model's permutation (`tokenizer_source` or `tokenizer:`);
    # None: the tokenizer files are copied and no row moves.
    vocab: VocabPlan | None = None
    chat_template: str | None = None  # the resolved `chat_template`, written into the tokenizer
    # What runs otherwise than the recipe may lead one to expect (a parameter ignored, a
    # filter that matches nothing): one line each, for the caller to show (`errors.warn`).
    warnings: list[str] = field(default_factory=list)
    # The recipe's `postprocess:` steps and their whole-model statistics; None: none.
    postprocess: Postprocess | None = None

    def rebind(self, sources: Mapping[str, Checkpoint]) -> MergePlan:
        """Read model keys from other checkpoints of the same layout (swapped in, not owned).

        The tasks depend only on names, shapes and dtypes, so a plan built once serves every
        population of members that share the layout.
        """
        for key, ckpt in sources.items():
            if key not in self.checkpoints:
                raise KeyError(key)
            if key in self.owned:
                self.checkpoints[key].close()
                self.owned = self.owned - {key}
            self.checkpoints[key] = ckpt
        return self

    def map_model(self, key: str) -> None:
        """Read model `key` through memory maps from now on (`io.mapped.mapped_files`): for
        a plan executed again and again, as a search's population merge is. The plan owns
        the mapped view; the checkpoint it replaces is closed if the plan owned it."""
        ckpt = self.checkpoints[key]
        view = mapped_files(ckpt)
        if view is ckpt:
            return
        if key in self.owned:
            ckpt.close()
        self.checkpoints[key] = view
        self.owned = self.owned | {key}

    def reset_statistics(self) -> None:
        """Fresh whole-model statistics for every route that gathers them."""
        for route in self.routes:
            route.reset_statistics()
        if self.postprocess is not None:
            self.postprocess.reset()

    @property
    def post_passes(self) -> tuple[str, ...]:
        return self.postprocess.pass_names if self.postprocess is not None else ()

    @property
    def pass_names(self) -> list[str]:
        """Every pass over the inputs in order: the post-processing's norms of the task
        vectors, the methods' statistics, LiNeS's norms, the merge."""
        post = list(self.post_passes)
        first = post[:1] if self.postprocess is not None and self.postprocess.rescale else []
        return [*first, *[n for r in self.routes for n in r.stat_passes],
                *post[len(first):], "merge"]

    def rule_groups(self, route: Route) -> dict[str, list[str]]:
        """The tensors of `route` grouped by the rule of its method that serves each
        (`MergeMethod.rule_for`), in plan order; empty when the method has one rule."""
        groups: dict[str, list[str]] = {}
        if route.kind != "merge" or route.method is None:
            return groups
        for task in self.tasks:
            if task.route is not route:
                continue
            rule = route.method.rule_for(task.name, task.shape,
                                         is_vocabulary_tensor(task.name), task.global_params)
            if rule is None:
                return {}
            groups.setdefault(rule, []).append(task.name)
        return groups

    def task_read_bytes(self, task: TensorTask) -> int:
        return sum(self.checkpoints[k].info(task.source(k)).nbytes
                   for k in task.reads(self.base_key))

    @property
    def read_bytes(self) -> int:
        """Bytes read by the whole run, statistics passes included."""
        post = len(self.post_passes)
        return sum(self.task_read_bytes(t) * (1 + (len(t.route.stat_passes)
                                                   if self.observed(t) else 0)
                                              + (post if t.route.kind == "merge" else 0))
                   for t in self.tasks)

    def observed(self, task: TensorTask) -> bool:
        """Whether the statistics passes of `task`'s route read it: every tensor, or for
        per-tensor statistics (`GlobalStats.per_tensor`) only those streamed in slices."""
        stats = task.route.stats
        return stats is not None and (not stats.per_tensor
                                      or slices(self, task)[0] != (None, None))

    @property
    def passes(self) -> int:
        """Passes over the inputs: the merge itself plus each statistics pass."""
        return 1 + sum(len(r.stat_passes) for r in self.routes) + len(self.post_passes)

    @property
    def write_bytes(self) -> int:
        return sum(_numel(t.shape) * t.out_dtype.itemsize for t in self.tasks)

    @property
    def config_source(self) -> Checkpoint:
        key = self.base_key or (self.recipe.models[0].model if self.recipe.models
                                else self.recipe.slices[0].sources[0].model)
        return self.checkpoints[key]

    def input_paths(self) -> list[Path]:
        """Where the models this plan opened live (directories, or single files): an output
        must never be, contain or lie inside one of them."""
        paths = [p for ref in sorted(self.owned) for p in model_paths(ref, allow_pickle=True)]
        source = self.recipe.vocabulary_source
        if source not in (None, "base", "union") and source not in self.checkpoints:
            paths.append(model_dir(source))
        return paths

    def tokenizer_root(self) -> Path:
        """Where tokenizer files are copied from when no tokenizer is built: the base (or
        first model); a built one (`plan.vocab`) is saved instead."""
        source = self.recipe.vocabulary_source
        if source in (None, "base", "union"):
            return self.config_source.root
        ckpt = self.checkpoints.get(source)
        return ckpt.root if ckpt is not None else model_dir(source)

    def close(self) -> None:
        for key in self.owned:
            self.checkpoints[key].close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_merge_recipe(recipe: MergeRecipe) -> tuple[MergeMethod, list[str]]:
    """Every check of a merge recipe that needs no checkpoint: its method, its shape (models,
    base, slices, rules) and every parameter's name and value; returns the method and the
    warnings (parameters ignored as mergekit ignores them). `build_plan` runs these before it
    opens anything; the documentation's test runs them alone on the recipes the pages show,
    whose models do not exist."""
    method = get_method(recipe.merge_method)
    _check_recipe_shape(recipe, method)
    check_postprocess(recipe.postprocess, recipe.base_model)
    warnings = check_parameter_keys(type(method), recipe.parameters,
                                    [m.parameters for m in recipe.models])
    for i, sl in enumerate(recipe.slices):
        warnings += check_parameter_keys(type(method), sl.parameters,
                                         [s.parameters for s in sl.sources],
                                         prefix=f"slices[{i}].",
                                         models_key=f"slices[{i}].sources")
    for i, rule in enumerate(recipe.tensors):
        if rule.method is not None:
            sub = type(get_method(rule.method, where=f"tensors[{i}].method"))
            warnings += check_parameter_keys(sub, rule.parameters, [],
                                             prefix=f"tensors[{i}].")
    return method, warnings


# Elementwise work streams in slices of this many elements, so peak memory does not grow
# with the largest tensor (an embedding can hold a fifth of a small model). Measured on a
# global PCB merge: 4M-element slices left the heap fragmented (0.6 GB at 30M parameters,
# 1.1 GB at 500M); 1M-element slices stay flat (0.40 / 0.43 GB) and run faster.
CHUNK_ELEMENTS = 1 << 20


def slices(plan: MergePlan, task: TensorTask, chunk: int = CHUNK_ELEMENTS
           ) -> list[tuple[int | None, int | None]]:
    """[start, stop) element ranges to process `task` in, `chunk` entries each or the
    method's own `slice_elements`; [(None, None)]: the whole tensor."""
    route = task.route
    if task.vocab is not None:  # rows move across the whole tensor
        return [(None, None)]
    elementwise = route.kind != "merge" or (
        route.method is not None and route.method.elementwise(task.global_params)
        and not (plan.postprocess is not None and plan.postprocess.whole_tensor(
            task.shape, is_vocabulary_tensor(task.name))))
    if route.method is not None and route.method.slice_elements is not None:
        chunk = route.method.slice_elements
    numel = math.prod(task.shape)
    if not elementwise or numel <= chunk:
        return [(None, None)]
    return [(a, min(a + chunk, numel)) for a in range(0, numel, chunk)]


def build_plan(recipe: MergeRecipe, recipe_text: str, *, seed: int | None = None,
               allow_pickle: bool = False, base_dir: Path | None = None,
               sources: Mapping[str, Checkpoint] | None = None) -> MergePlan:
    """Check `recipe` against its checkpoints' headers and fix every output tensor's route.

    `sources` supplies already open checkpoints by model key (the caller keeps them);
    the other models are opened here and closed by `MergePlan.close`.
    """
    method, warnings = check_merge_recipe(recipe)
    checkpoints: dict[str, Checkpoint] = {}
    owned: list[str] = []
    try:
        for ref in recipe.model_refs():
            if sources is not None and ref in sources:
                checkpoints[ref] = sources[ref]
                continue
            checkpoints[ref] = open_checkpoint(ref, allow_pickle=allow_pickle,
                                               base_dir=base_dir)
            owned.append(ref)
        vocab = _vocab_plan(recipe, checkpoints)
        plan = (_plan_slices(recipe, recipe_text, method, checkpoints, seed, vocab)
                if recipe.slices
                else _plan_tensors(recipe, recipe_text, method, checkpoints, seed, vocab))
        plan.owned = frozenset(owned)
        if sources is None:
            plan.tokenizer_root()  # a bad tokenizer_source fails now, not after the merge
        _finish_vocab(plan, vocab)
        _plan_postprocess(plan)
        _drop_idle_statistics(plan)
        plan.warnings = list(dict.fromkeys([*warnings, *_plan_warnings(plan)]))
    except BaseException:
        for ref in owned:
            checkpoints[ref].close()
        raise
    return plan


def _drop_idle_statistics(plan: MergePlan) -> None:
    """Per-tensor statistics serve only the tensors streamed in slices (the others are
    merged from their whole inputs): with none, the route has no statistics passes."""
    for route in plan.routes:
        if route.stats is not None and route.stats.per_tensor \
                and not any(t.route is route and plan.observed(t) for t in plan.tasks):
            route.stats = route.stats_args = None


def _first_model(recipe: MergeRecipe) -> str:
    return recipe.base_model or (recipe.models[0].model if recipe.models
                                 else recipe.slices[0].sources[0].model)


def _vocab_plan(recipe: MergeRecipe, checkpoints: dict[str, Checkpoint]) -> VocabPlan | None:
    source = recipe.vocabulary_source
    if source is None:
        return None
    source_root = None
    if source not in ("base", "union") and source not in checkpoints:
        source_root = model_dir(source)
    return build_vocab_plan(recipe, {k: c.root for k, c in checkpoints.items()},
                            _first_model(recipe), source_root)


def _finish_vocab(plan: MergePlan, vocab: VocabPlan | None) -> None:
    """The output's vocabulary size, the chat template, and a line saying what moved."""
    recipe = plan.recipe
    plan.vocab = vocab
    plan.chat_template = resolve_chat_template(recipe, [c.root for c in
                                                        plan.checkpoints.values()])
    if recipe.chat_template is not None and vocab is None \
            and not has_tokenizer(plan.tokenizer_root()):
        raise RecipeError(f"chat_template: no tokenizer to hold it ({plan.tokenizer_root()} "
                          "has no tokenizer files)")
    if vocab is None:
        return
    plan.config_overrides["vocab_size"] = vocab.rows
    names = [t.name for t in plan.tasks if is_vocabulary_tensor(t.name)]
    plan.routes.insert(0, Route(vocab.label(), "align", tensor_names=names))


def _plan_postprocess(plan: MergePlan) -> None:
    """The `postprocess:` steps over the plan's merged tensors (`engine.postprocess`)."""
    steps = plan.recipe.postprocess
    if not steps:
        return
    assert plan.base_key is not None  # check_postprocess
    merged = [t for t in plan.tasks if t.route.kind == "merge"]
    tasks = {k for t in merged for k in t.route.inputs if k != plan.base_key}
    layers = None
    index = next((i for i, s in enumerate(steps) if s.lines is not None), None)
    if index is not None:
        lines = steps[index].lines
        assert lines is not None
        layers = layer_map([t.name for t in merged], lines.layers,
                           read_config(plan.config_source.root), plan.config_overrides,
                           f"postprocess[{index}].lines")
        if all(b is None for b in layers.blocks.values()):
            plan.warnings.append(
                f"postprocess[{index}].lines: no merged tensor's name has a block index "
                f"({'its layers pattern' if lines.layers else 'layers.N., h.N., blocks.N.'}"
                " matches none): every tensor is scaled by a")
    plan.postprocess = Postprocess(list(steps), plan.base_key, len(tasks), layers)


def _plan_warnings(plan: MergePlan) -> list[str]:
    """What the plan does that the recipe does not say plainly, one line each: a `tensors:`
    rule or a parameter filter that matches no tensor, a two-model method given more
    models (it takes their mean), an output that gets no tokenizer."""
    recipe = plan.recipe
    names = [t.name for t in plan.tasks]
    lines = []
    for i, rule in enumerate(recipe.tensors):
        matched = [n for n in names if rule.filter in n]
        earlier = [r.filter for r in recipe.tensors[:i]]
        if not matched:
            lines.append(f"tensors[{i}].filter: {rule.filter!r} matches no tensor name; the "
                         "rule does nothing")
        elif all(any(f in n for f in earlier) for n in matched):
            lines.append(f"tensors[{i}].filter: every tensor {rule.filter!r} matches goes to "
                         "an earlier rule; the rule does nothing")
    for key, pattern in _parameter_filters(recipe):
        if not any(pattern in n for n in names):
            lines.append(f"{key}: {pattern!r} matches no tensor name; that value is never used")
    for route in plan.routes:
        if route.kind == "merge" and route.method is not None and route.method.pairwise \
                and len(route.inputs) > 1:
            lines.append(f"{route.method.name} merges the base with one other model, but is "
                         f"given {len(route.inputs)} ({', '.join(route.inputs)}): it merges "
                         "with their uniform mean (mergekit refuses more than one)")
    for route in plan.routes:
        lines += _fallback_only(plan, route)
    if plan.vocab is None and not has_tokenizer(plan.tokenizer_root()):
        others = [k for k, c in plan.checkpoints.items() if has_tokenizer(c.root)]
        hint = f"; set tokenizer_source: {others[0]} to take that model's" if others else ""
        lines.append(f"the output gets no tokenizer: {plan.tokenizer_root()} has no tokenizer "
                     f"files{hint}")
    return lines


def _fallback_only(plan: MergePlan, route: Route) -> list[str]:
    """A method with a matrix rule whose every tensor takes its fallback (CART's official
    `attn`/`mlp` names on a BERT, any spectral merge of a CNN): the merge is the fallback."""
    groups = plan.rule_groups(route)
    if not groups or any(rule.startswith("matrix") for rule in groups):
        return []
    assert route.method is not None
    reasons = [rule.split("(", 1)[1].split("):", 1)[0] if rule.startswith("fallback (")
               else rule for rule in groups]
    hints = []
    if any("matrices: attn_mlp" in r for r in reasons):
        hints.append("matrices: all_2d acts on every 2-D tensor")
    if any(len(t.shape) >= 3 for t in plan.tasks if t.route is route):
        hints.append("conv: matrix decomposes conv kernels")
    return [f"{route.method.name}: no tensor gets its matrix rule ({'; '.join(reasons)}), so "
            "every tensor gets its fallback" + (f"; {', '.join(hints)}" if hints else "")]


def _parameter_filters(recipe: MergeRecipe) -> list[tuple[str, str]]:
    """(key path, filter) of every filtered parameter value the recipe's methods use."""
    method = REGISTRY[recipe.merge_method]
    used = {p.name for p in method.params}
    per_model = {p.name for p in method.params if p.per_model}
    for rule in recipe.tensors:
        if rule.method is not None:
            per_model |= {p.name for p in REGISTRY[rule.method].params if p.per_model}
    sections: list[tuple[str, Mapping[str, ParameterValue], set[str]]] = [
        ("parameters", recipe.parameters, used)]
    sections += [(f"models[{i}].parameters", m.parameters, per_model)
                 for i, m in enumerate(recipe.models)]
    for i, sl in enumerate(recipe.slices):
        sections.append((f"slices[{i}].parameters", sl.parameters, used))
        sections += [(f"slices[{i}].sources[{j}].parameters", src.parameters, per_model)
                     for j, src in enumerate(sl.sources)]
    sections += [(f"tensors[{i}].parameters", rule.parameters,
                  {p.name for p in REGISTRY[rule.method].params})
                 for i, rule in enumerate(recipe.tensors) if rule.method is not None]
    return [found for where, params, keys in sections for key, setting in params.items()
            if key in keys for found in setting_filters(setting, f"{where}.{key}")]


def _vocab_group(task: TensorTask, recipe: MergeRecipe, base_key: str | None) -> list[str]:
    """The models whose rows feed the defaults of `task`'s missing tokens, in mergekit's
    order: the merged models as listed (a slice's sources), the base after them."""
    if recipe.slices:
        keys = list(task.source_names)
    else:
        keys = [m.model for m in recipe.models]
        if base_key is not None and base_key not in keys:
            keys.append(base_key)
    return list(dict.fromkeys([*keys, *task.reads(base_key)]))


def _attach_vocab(task: TensorTask, vocab: VocabPlan, checkpoints: dict[str, Checkpoint],
                  group: list[str]) -> None:
    """Align `task`'s rows to the output tokenizer, unless that moves nothing."""
    infos = {k: checkpoints[k].info(task.source(k)) for k in group}
    first_key, first = next(iter(infos.items()))
    for key, info in infos.items():
        if len(info.shape) == 0 or info.shape[1:] != first.shape[1:]:
            raise CheckpointError(
                f"shape mismatch for tensor '{task.name}': {first_key} has {list(first.shape)}, "
                f"{key} has {list(info.shape)} (only the vocabulary axis may differ)")
    alignment = vocab.alignment(group)
    for key, need in alignment.needs_rows().items():
        if infos[key].shape[0] < need:
            raise CheckpointError(
                f"tensor '{task.name}' of model {key} has {infos[key].shape[0]} rows, but its "
                f"tokenizer uses token id {need - 1}")
    if alignment.is_identity({k: info.shape[0] for k, info in infos.items()}):
        return
    task.vocab = alignment
    task.shape = (alignment.rows, *first.shape[1:])


def _check_recipe_shape(recipe: MergeRecipe, method: MergeMethod) -> None:
    if recipe.slices:
        check_slices(recipe, method)
        if recipe.tensors:
            raise RecipeError("tensors: routing rules do not combine with slices")
        return
    if not recipe.models:
        raise RecipeError("models: a merge needs at least one model")
    if method.requires_base:
        if recipe.base_model is None and not method.optional_base:
            raise RecipeError(f"base_model: required by {method.name}")
        if not [m for m in recipe.models if m.model != recipe.base_model]:
            raise RecipeError(f"models: {method.name} needs at least one model besides the base")
    for i, rule in enumerate(recipe.tensors):
        if rule.take == "base" and recipe.base_model is None:
            raise RecipeError(f"tensors[{i}].take: 'base' but the recipe has no base_model")
        rule_method = (get_method(rule.method, where=f"tensors[{i}].method")
                       if rule.method is not None else None)
        if rule_method is not None and recipe.base_model is None \
                and rule_method.requires_base and not rule_method.optional_base:
            raise RecipeError(f"tensors[{i}].method: {rule.method} needs a base model, but the "
                              "recipe has no base_model")


def _plan_tensors(recipe: MergeRecipe, recipe_text: str, method: MergeMethod,
                  checkpoints: dict[str, Checkpoint], seed: int | None,
                  vocab: VocabPlan | None = None) -> MergePlan:
    base_key = recipe.base_model
    reference = checkpoints[base_key or recipe.models[0].model]
    compute_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    out_dtype_override = DTYPES.get(recipe.out_dtype or recipe.dtype or "")

    main_route = _merge_route(method, recipe.parameters, recipe, label=f"{method.name}")
    rule_routes = [_rule_route(i, rule, recipe) for i, rule in enumerate(recipe.tensors)]
    average_inputs = main_route.inputs
    average_route = Route("mean over the fine-tuned models (normalization running statistics)",
                          "average", inputs=average_inputs)
    copy_source = base_key or recipe.models[0].model
    copy_route = Route(f"copied from {copy_source} (integer or boolean buffers)", "copy",
                       source=copy_source)

    names = reference.names()
    # Tensors only some inputs have are errors, unless a `take` rule serves them.
    extras: list[str] = []
    for _key, ckpt in checkpoints.items():
        for name in ckpt.names():
            if name not in reference and name not in extras:
                extras.append(name)
    num_layers = 1 + max((layer_index(n) or 0) for n in [*names, *extras]) if names else 1

    tasks: list[TensorTask] = []
    for name in [*names, *extras]:
        route = next((r for r, rule in zip(rule_routes, recipe.tensors, strict=True)
                      if rule.filter in name), None)
        if route is None and name in extras:
            owner = next(k for k, c in checkpoints.items() if name in c)
            raise CheckpointError(
                f"tensor '{name}' is in model {owner} but not in "
                f"{'base ' if base_key else ''}{reference.ref}; add a tensors rule to take it"
            )
        if route is None:
            info = reference.info(name)
            if not info.dtype.is_floating_point:
                route = copy_route
            elif name.endswith(RUNNING_STATS):
                route = average_route
            else:
                route = main_route
        aligned = vocab is not None and is_vocabulary_tensor(name)
        task = _task(name, route, checkpoints, base_key, num_layers, out_dtype_override,
                     rows_free=aligned)
        if aligned:
            assert vocab is not None
            _attach_vocab(task, vocab, checkpoints, _vocab_group(task, recipe, base_key))
        _set_dtypes(task, recipe, compute_dtype, checkpoints, base_key)
        tasks.append(task)

    routes = [r for r in [*rule_routes, copy_route, average_route, main_route] if r.tensor_names]
    for route in routes:
        _attach_global_stats(route, [t for t in tasks if t.route is route])
    return MergePlan(recipe, recipe_text, method, checkpoints, base_key, tasks, routes,
                     compute_dtype, seed if seed is not None else (recipe.seed or 0))


def _plan_slices(recipe: MergeRecipe, recipe_text: str, method: MergeMethod,
                 checkpoints: dict[str, Checkpoint], seed: int | None,
                 vocab: VocabPlan | None = None) -> MergePlan:
    """Tasks for `slices:` (see `engine.slices`): outside tensors from the first and last
    slices, then each slice's layers in order, renumbered."""
    base_key = recipe.base_model
    compute_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    out_dtype_override = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    first = recipe.slices[0].sources[0]
    reference = checkpoints[first.model]
    templates = layer_templates(reference, first.layer_range[0])
    outside = [n for n in reference.names() if layer_index(n) is None]
    last = len(recipe.slices) - 1

    def route_for(i: int, part: str) -> Route:
        sl = recipe.slices[i]
        models, per_model = slice_inputs(recipe, sl, method)
        return Route(f"slices[{i}]{part}: {method.name} over {', '.join(models)}", "merge",
                     method=method, recipe_params={**recipe.parameters, **sl.parameters},
                     model_params=per_model, inputs=models, post=bool(recipe.postprocess))

    def add(name: str, route: Route, sources: dict[str, str], t: float,
            copy_from: str) -> None:
        info = checkpoints[copy_from].info(sources[copy_from])
        if not info.dtype.is_floating_point:  # integer buffers: copied, not merged
            route = Route(f"copied from {copy_from} (integer or boolean buffers)", "copy",
                          source=copy_from)
            routes.append(route)
        aligned = vocab is not None and is_vocabulary_tensor(name)
        task = _task(name, route, checkpoints, base_key, 1, out_dtype_override,
                     source_names=sources, t=t, rows_free=aligned)
        if aligned:
            assert vocab is not None
            _attach_vocab(task, vocab, checkpoints, _vocab_group(task, recipe, base_key))
        _set_dtypes(task, recipe, compute_dtype, checkpoints, base_key)
        tasks.append(task)

    tasks: list[TensorTask] = []
    pre, post = route_for(0, " (before the layers)"), route_for(last, " (after the layers)")
    routes: list[Route] = [pre]
    for name in outside:
        if PRE_LAYER.search(name):
            add(name, pre, {s.model: name for s in recipe.slices[0].sources}, 0.0, first.model)
    out_layer = 0
    for i, sl in enumerate(recipe.slices):
        for j, s in enumerate(sl.sources):
            check_range(checkpoints[s.model], *s.layer_range, f"slices[{i}].sources[{j}]")
        route = route_for(i, "")
        routes.append(route)
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            for template in templates:
                sources = {s.model: with_layer(template, s.layer_range[0] + offset)
                           for s in sl.sources}
                add(with_layer(template, out_layer), route, sources, t, sl.sources[0].model)
            out_layer += 1
    routes.append(post)
    for name in outside:
        if not PRE_LAYER.search(name):
            add(name, post, {s.model: name for s in recipe.slices[last].sources}, 0.0,
                recipe.slices[last].sources[0].model)
    routes = [r for r in routes if r.tensor_names]
    for route in routes:
        _attach_global_stats(route, [t for t in tasks if t.route is route])
    plan = MergePlan(recipe, recipe_text, method, checkpoints, base_key, tasks, routes,
                     compute_dtype, seed if seed is not None else (recipe.seed or 0))
    config = plan.config_source.root / "config.json"
    if config.is_file():
        try:
            loaded = json.loads(config.read_text())
        except ValueError as e:
            raise CheckpointError(f"{config}: not JSON ({e})") from None
        if isinstance(loaded, dict):
            plan.config_overrides = layer_count_overrides(loaded, out_layer)
    return plan


def _set_dtypes(task: TensorTask, recipe: MergeRecipe, compute_dtype: torch.dtype | None,
                checkpoints: dict[str, Checkpoint], base_key: str | None) -> None:
    """The task's compute dtype, and its output dtype where its method's result is wider
    than what it computes in: without a recipe `out_dtype`, mergekit writes a kernel's
    result uncast (arcee_fusion's float32 for float16 inputs)."""
    task.compute_dtype = compute_dtype or _default_compute_dtype(task, checkpoints, base_key)
    if task.route.kind == "merge" and recipe.out_dtype is None:
        assert task.route.method is not None
        result = task.route.method.result_dtype(task.compute_dtype)
        if result != task.compute_dtype:
            task.out_dtype = result


def _default_compute_dtype(task: TensorTask, checkpoints: dict[str, Checkpoint],
                           base_key: str | None) -> torch.dtype:
    """Without a recipe `dtype`: a mergekit method computes in its inputs' dtype (as
    mergekit loads them), anything else in float32 (float64 inputs stay float64)."""
    route = task.route
    if route.kind in ("take", "copy"):
        return torch.float32  # nothing is computed
    key = task.reads(base_key)[0]
    first = checkpoints[key].info(task.source(key)).dtype
    if first == torch.float64:
        return torch.float64
    if route.kind == "merge" and route.method is not None \
            and route.method.name in MERGEKIT_METHODS and first.itemsize >= 2:
        return first
    return torch.float32


def _attach_global_stats(route: Route, tasks: list[TensorTask]) -> None:
    """Whole-model statistics for a route whose method has them (e.g. `scope: global`)."""
    if route.kind != "merge" or route.method is None:
        return
    first = tasks[0]
    total = sum(_numel(t.shape) for t in tasks)
    args = (len(route.inputs), total, first.global_params, first.model_params)
    route.stats = route.method.global_stats(*args)
    if route.stats is None:
        return
    route.stats_args = args
    if route.stats.per_tensor:  # each tensor's own numbers: its parameters are its own
        return
    for task in tasks[1:]:
        if task.global_params != first.global_params or task.model_params != first.model_params:
            raise RecipeError(
                f"{route.label}: statistics over the whole model need the same parameters for "
                f"every tensor, but '{task.name}' gets {task.model_params or task.global_params}"
                f" and '{first.name}' gets {first.model_params or first.global_params}"
            )


def _merge_route(method: MergeMethod, params: Mapping[str, ParameterValue],
                 recipe: MergeRecipe, label: str) -> Route:
    entries = recipe.models
    if method.requires_base:
        entries = [m for m in entries if m.model != recipe.base_model]
    per_model = {p.name for p in method.params if p.per_model}
    return Route(
        label, "merge", method=method, recipe_params=params,
        model_params=[{k: v for k, v in m.parameters.items() if k in per_model}
                      for m in entries],
        inputs=[m.model for m in entries], post=bool(recipe.postprocess),
    )


def _rule_route(i: int, rule: Any, recipe: MergeRecipe) -> Route:
    if rule.take is not None:
        source = recipe.base_model if rule.take == "base" else rule.take
        return Route(f"tensors[{i}] (filter '{rule.filter}'): taken from {source}", "take",
                     source=source)
    method = get_method(rule.method, where=f"tensors[{i}].method")
    return _merge_route(method, rule.parameters, recipe,
                        label=f"tensors[{i}] (filter '{rule.filter}'): {method.name}")


def _task(name: str, route: Route, checkpoints: dict[str, Checkpoint], base_key: str | None,
          num_layers: int, out_dtype_override: torch.dtype | None,
          source_names: dict[str, str] | None = None, t: float | None = None,
          rows_free: bool = False) -> TensorTask:
    """The task for output `name`; `source_names` map model keys to the tensors that feed it
    (slices), `t` overrides its depth position for gradient parameters. With `rows_free`
    (a tensor aligned to the output vocabulary) the inputs' first axes may differ."""
    route.tensor_names.append(name)
    sources = dict(source_names or {})
    if route.kind in ("take", "copy"):
        assert route.source is not None
        info = checkpoints[route.source].info(sources.get(route.source, name))
        return TensorTask(name, info.shape, info.dtype, route, source_names=sources)
    task = TensorTask(name, (), torch.float32, route, source_names=sources)
    keys = task.reads(base_key)
    infos = [(k, checkpoints[k].info(task.source(k))) for k in keys]
    first_key, first = infos[0]
    for key, info in infos[1:]:
        if rows_free and info.shape[1:] == first.shape[1:]:
            continue  # the vocabulary axis: aligned by `_attach_vocab`
        if info.shape != first.shape:
            hint = ("; set tokenizer_source to align the vocabularies"
                    if is_vocabulary_tensor(name) and not rows_free else "")
            raise CheckpointError(
                f"shape mismatch for tensor '{name}': {first_key} has {list(first.shape)}, "
                f"{key} has {list(info.shape)}{hint}"
            )
        if info.dtype.is_floating_point != first.dtype.is_floating_point:
            raise CheckpointError(
                f"dtype mismatch for tensor '{name}': {first_key} has {first.dtype}, "
                f"{key} has {info.dtype}"
            )
    if not first.dtype.is_floating_point:
        raise CheckpointError(
            f"tensor '{name}' is {first.dtype}: integer tensors cannot be merged; "
            "add a tensors rule with 'take'"
        )
    task.shape = first.shape
    task.out_dtype = out_dtype_override or first.dtype
    if route.kind == "merge":
        assert route.method is not None
        if t is None:
            t = depth_position(name, num_layers)
        task.global_params, task.model_params = resolve_params(
            type(route.method), route.recipe_params, route.model_params, name, t, where=""
        )
    return task


__all__ = ["DTYPES", "REGISTRY", "MergePlan", "Route", "TensorTask", "build_plan"]
