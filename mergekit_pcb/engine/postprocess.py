"""The recipe's `postprocess:` steps, planned and applied to every merged tensor.

Each tensor a merge method produces (every `merge` route: the recipe's method and the
`tensors:` rules with a method) becomes base + steps(merged − base). The steps are the pure
functions of `methods.postprocess`:
- `rescale_norms` (first, if given) acts before the merge: each fine-tuned model's task
  vector is scaled by mean_j ‖τ_j‖ / ‖τ_k‖ (whole-model L2 norms, a statistics pass), so
  the method's own statistics and merge see the rescaled models;
- `svc` calibrates each 2-D update against the task vectors (whole tensors: a matrix's SVD
  does not stream in slices; 1-D tensors pass through);
- `lines` scales each tensor's update by a + b·ℓ/(L−1). Without a given `a`, the paper's a
  needs two whole-model L1 norms of the update reaching the step; a statistics pass after
  the method's own computes them (the merge, and the steps before `lines`, run once more),
  so the merge still streams at flat memory.

A step that changes nothing (LiNeS's factor 1) leaves the merged tensor's bits as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_pcb.engine.slices import LAYER_COUNT_KEYS
from mergekit_pcb.errors import CheckpointError, RecipeError
from mergekit_pcb.methods.postprocess import (
    lines_alpha,
    lines_factor,
    rescale_factors,
    svc,
)
from mergekit_pcb.recipe.params import layer_index
from mergekit_pcb.recipe.schema import PostStep

# The statistics passes sum in float64 over flat chunks of this many entries: no float64
# copy of a whole tensor is made (an embedding would cost several times its size), and no
# chunk is long enough for torch to split its sum by thread (past 32,768 entries), so the
# bits of the sums do not depend on the thread count.
STAT_CHUNK = 1 << 15
NORMS_PASS = "task-vector norms"
LINES_PASS = "LiNeS norms"


def check_postprocess(steps: Sequence[PostStep], base_model: str | None) -> None:
    """The rules across steps (each step's own keys are the schema's), as one-line errors."""
    if not steps:
        return
    if base_model is None:
        raise RecipeError("postprocess: the steps act on merged − base; the recipe needs a "
                          "base_model")
    kinds = [s.kind for s in steps]
    for i, kind in enumerate(kinds):
        if kind == "rescale_norms" and i != 0:
            raise RecipeError(f"postprocess[{i}]: rescale_norms acts on the task vectors "
                              "before the merge; list it first")
    if kinds.count("lines") > 1:
        second = [i for i, k in enumerate(kinds) if k == "lines"][1]
        raise RecipeError(f"postprocess[{second}]: one lines step per recipe")
    if kinds.count("rescale_norms") > 1:
        raise RecipeError(f"postprocess[{kinds.index('rescale_norms', 1)}]: rescale_norms "
                          "given twice")


def config_layer_count(config: Mapping[str, object]) -> int | None:
    """The model's block count from its config.json (`num_hidden_layers` and the like)."""
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass
class LayerMap:
    """Each tensor's LiNeS block index (None: outside the blocks) and the block count L."""

    blocks: dict[str, int | None]
    count: int
    source: str  # where L came from, for --dry-run


def layer_map(names: Sequence[str], pattern: str | None, config: Mapping[str, object] | None,
              overrides: Mapping[str, object], where: str) -> LayerMap:
    """Block indices from the tensor names (`pattern`'s first group, or the usual layer
    numbering) and L from the output's config (a `slices:` recipe's new count first), else
    one more than the largest index."""
    compiled = re.compile(pattern) if pattern is not None else None
    blocks: dict[str, int | None] = {}
    for name in names:
        if compiled is None:
            blocks[name] = layer_index(name)
            continue
        m = compiled.search(name)
        if m is None or m.group(1) is None:
            blocks[name] = None
            continue
        try:
            blocks[name] = int(m.group(1))
        except ValueError:
            raise RecipeError(f"{where}.layers: the group matches '{m.group(1)}' in tensor "
                              f"'{name}', not a block number") from None
    found = [b for b in blocks.values() if b is not None]
    count = config_layer_count(overrides) or config_layer_count(config or {})
    source = "config.json"
    if count is None:
        count, source = (1 + max(found) if found else 1), "the tensor names"
    worst = max(found, default=-1)
    if worst >= count:
        name = next(n for n, b in blocks.items() if b == worst)
        raise RecipeError(f"{where}: tensor '{name}' is in block {worst}, but the model has "
                          f"{count} blocks ({source})")
    return LayerMap(blocks, count, source)


def read_config(root: Path) -> dict[str, object] | None:
    """The config.json beside a checkpoint, or None where there is none (a bare file)."""
    path = root / "config.json"
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
    return loaded if isinstance(loaded, dict) else None


@dataclass
class Postprocess:
    """The planned steps and, once its statistics passes ran, their whole-model numbers."""

    steps: list[PostStep]
    base_key: str
    num_tasks: int  # K: the fine-tuned models merged (the base excluded)
    layers: LayerMap | None  # with a lines step
    # statistics: model key -> ‖τ‖₂ (rescale_norms); LiNeS's two L1 norms and its a
    norms: dict[str, float] = field(default_factory=dict)
    factors: dict[str, float] = field(default_factory=dict)
    summed_l1: float = 0.0
    merged_l1: float = 0.0
    lines_a: float | None = None

    def __post_init__(self) -> None:
        self.reset()

    @property
    def rescale(self) -> bool:
        return bool(self.steps) and self.steps[0].rescale_norms is not None

    @property
    def after(self) -> list[PostStep]:
        """The steps on the merged update, in order."""
        return [s for s in self.steps if s.rescale_norms is None]

    @property
    def lines(self) -> PostStep | None:
        return next((s for s in self.steps if s.lines is not None), None)

    @property
    def pass_names(self) -> tuple[str, ...]:
        lines = self.lines
        return ((NORMS_PASS,) if self.rescale else ()) + (
            (LINES_PASS,) if lines is not None and lines.lines is not None
            and lines.lines.a is None else ())

    def reset(self) -> None:
        self.norms, self.factors = {}, {}
        self.summed_l1 = self.merged_l1 = 0.0
        lines = self.lines
        self.lines_a = lines.lines.a if lines is not None and lines.lines is not None else None

    def whole_tensor(self, shape: Sequence[int], vocabulary: bool) -> bool:
        """True when a step needs the tensor whole (SVC's SVD of a matrix)."""
        return len(shape) == 2 and any(
            s.svc is not None and (s.svc.vocabulary or not vocabulary) for s in self.after)

    # --- statistics ------------------------------------------------------------------

    def norms_part(self, values: Mapping[str, torch.Tensor], inputs: Sequence[str]
                   ) -> dict[str, float]:
        """One part's share of each ‖τ_k‖₂², summed in float64 over chunks (no float64
        copy of a whole tensor: the pass stays at the merge's own memory)."""
        base = values[self.base_key].reshape(-1)
        out = {}
        for key in inputs:
            if key == self.base_key:
                continue
            model = values[key].reshape(-1)
            total = 0.0
            for a in range(0, base.numel(), STAT_CHUNK):
                tau = model[a:a + STAT_CHUNK].to(torch.float64) \
                    - base[a:a + STAT_CHUNK].to(torch.float64)
                total += float((tau * tau).sum())
            out[key] = total
        return out

    def add_norms(self, part: Mapping[str, float]) -> None:
        for key, value in part.items():
            self.norms[key] = self.norms.get(key, 0.0) + value

    def finish_norms(self) -> None:
        keys = list(self.norms)
        factors = rescale_factors([self.norms[k] ** 0.5 for k in keys])
        self.factors = dict(zip(keys, factors, strict=True))

    def lines_part(self, values: Mapping[str, torch.Tensor], inputs: Sequence[str],
                   merged: torch.Tensor, update: torch.Tensor | None) -> tuple[float, float]:
        """One part's share of ‖Σ τ‖₁ (the task vectors the merge saw) and of ‖Δ‖₁ (the
        update reaching the lines step: `update`, or merged − base when None), summed in
        float64 over chunks."""
        base = values[self.base_key].reshape(-1)
        models = [values[k].reshape(-1) for k in inputs if k != self.base_key]
        flat = (merged if update is None else update).reshape(-1)
        summed_l1 = merged_l1 = 0.0
        for a in range(0, base.numel(), STAT_CHUNK):
            b = base[a:a + STAT_CHUNK].to(torch.float64)
            summed = torch.zeros_like(b)
            for m in models:
                summed += m[a:a + STAT_CHUNK].to(torch.float64) - b
            summed_l1 += float(summed.abs().sum())
            delta = flat[a:a + STAT_CHUNK].to(torch.float64)
            if update is None:
                delta -= b
            merged_l1 += float(delta.abs().sum())
        return summed_l1, merged_l1

    def add_lines(self, part: tuple[float, float]) -> None:
        self.summed_l1 += part[0]
        self.merged_l1 += part[1]

    def finish_lines(self) -> None:
        self.lines_a = lines_alpha(self.summed_l1, self.merged_l1, self.num_tasks)

    # --- applying --------------------------------------------------------------------

    def rescale_inputs(self, values: dict[str, torch.Tensor], inputs: Sequence[str]
                       ) -> dict[str, torch.Tensor]:
        """`values` with each fine-tuned model at base + f_k·τ_k (the norm pass's factors)."""
        if not self.rescale or not self.factors:
            return values
        base = values[self.base_key]
        wide = torch.promote_types(base.dtype, torch.float32)
        out = dict(values)
        for key in inputs:
            f = self.factors.get(key, 1.0)
            if key != self.base_key and f != 1.0:
                b = base.to(wide)
                out[key] = (b + (values[key].to(wide) - b) * f).to(values[key].dtype)
        return out

    def update(self, name: str, shape: Sequence[int], vocabulary: bool, merged: torch.Tensor,
               values: Mapping[str, torch.Tensor], inputs: Sequence[str],
               before_lines: bool = False) -> torch.Tensor | None:
        """The update after the steps (before the lines step with `before_lines`), in
        float32 or wider; None when no step changed it (merged − base stands)."""
        base = values[self.base_key]
        wide = torch.promote_types(merged.dtype, torch.float32)
        delta: torch.Tensor | None = None

        def current() -> torch.Tensor:
            return merged.to(wide) - base.to(wide) if delta is None else delta

        for step in self.after:
            if step.svc is not None:
                if len(shape) != 2 or (vocabulary and not step.svc.vocabulary):
                    continue
                tasks = _TaskUpdates(values, [k for k in inputs if k != self.base_key],
                                     base, shape)
                delta = svc(current().reshape(shape), tasks, step.svc.alpha).to(wide)
            elif step.lines is not None:
                if before_lines:
                    break
                assert self.layers is not None and self.lines_a is not None
                factor = lines_factor(self.layers.blocks.get(name), self.layers.count,
                                      self.lines_a, step.lines.b)
                if factor != 1.0:
                    # in place: `current()` is always a fresh tensor (a difference or SVC's
                    # result), so a step holds one update-sized tensor, not one per operation
                    delta = current().mul_(factor)
        return delta

    def apply(self, name: str, shape: Sequence[int], vocabulary: bool, merged: torch.Tensor,
              values: Mapping[str, torch.Tensor], inputs: Sequence[str]) -> torch.Tensor:
        delta = self.update(name, shape, vocabulary, merged, values, inputs)
        if delta is None:
            return merged  # bit for bit
        base = values[self.base_key]
        return delta.reshape(base.shape).add_(base.to(delta.dtype)).to(merged.dtype)

    def describe(self) -> list[str]:
        """The step plan, one line per step, for `validate` and `--dry-run`."""
        lines = []
        for i, step in enumerate(self.steps):
            if step.rescale_norms is not None:
                lines.append(f"postprocess[{i}] rescale_norms: each of the {self.num_tasks} "
                             "task vectors scaled to their mean whole-model L2 norm before "
                             f"the merge ({NORMS_PASS} pass)")
            elif step.svc is not None:
                vocab = "" if step.svc.vocabulary else ", vocabulary matrices left alone"
                lines.append(f"postprocess[{i}] svc: alpha {step.svc.alpha}, every 2-D "
                             f"tensor merged whole{vocab}; 1-D tensors unchanged")
            elif step.lines is not None and self.layers is not None:
                a = (f"a {step.lines.a}" if step.lines.a is not None else
                     f"a = ‖Σ τ‖₁ / ‖Δ‖₁ / {self.num_tasks} ({LINES_PASS} pass)")
                lines.append(f"postprocess[{i}] lines: {a}, b {step.lines.b}, "
                             f"{self.layers.count} blocks (from {self.layers.source}); "
                             "outside the blocks: a")
        return lines

    def block_groups(self, names: Sequence[str]) -> dict[str, list[str]]:
        """`names` grouped by LiNeS block ("block N", "outside the blocks"), in order."""
        groups: dict[str, list[str]] = {}
        if self.layers is None:
            return groups
        for name in names:
            b = self.layers.blocks.get(name)
            groups.setdefault("outside the blocks" if b is None else f"block {b}",
                              []).append(name)
        return groups


class _TaskUpdates(Sequence[torch.Tensor]):
    """The task vectors τ_k = θ_k − θ₀ of one tensor, each made in float64 when SVC asks
    for it, so that no more than one is held at a time."""

    def __init__(self, values: Mapping[str, torch.Tensor], keys: list[str],
                 base: torch.Tensor, shape: Sequence[int]) -> None:
        self.values, self.keys, self.base, self.shape = values, keys, base, tuple(shape)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        t = self.values[self.keys[i]].to(torch.float64) - self.base.to(torch.float64)
        return t.reshape(self.shape)


__all__ = ["LINES_PASS", "NORMS_PASS", "LayerMap", "Postprocess", "check_postprocess",
           "layer_map", "read_config"]
