"""`slices:` as mergekit defines them: output layers taken, in order, from layer ranges of
several models, merged layer by layer.

Each output layer maps to one source layer per slice source, so the streaming engine still
reads one tensor per input at a time: a task's `source_names` say which tensor of which
model feeds it. As in mergekit 0.1.5:
- a slice's sources must span the same number of layers; its layer at offset i of n sits at
  t = i/(n−1) for gradient parameters (t = 1 for a one-layer slice);
- tensors before the layers (embeddings) merge the first slice's sources, tensors after
  them (final norm, output head) the last slice's, both at t = 0;
- parameters come from the recipe, then the slice, then each source (per model);
- the output config's layer count is the number of output layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mergekit_pcb.errors import CheckpointError, RecipeError
from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.methods.base import MergeMethod
from mergekit_pcb.recipe.params import LAYER_INDEX, layer_index
from mergekit_pcb.recipe.schema import MergeRecipe, SliceDef

# Tensors outside the layers that come before them in a decoder (merged from the first
# slice); every other outside tensor comes after (merged from the last slice).
PRE_LAYER = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|"
                       r"token_type_embeddings)")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def with_layer(name: str, index: int) -> str:
    """`name` with its layer number replaced by `index`."""
    m = LAYER_INDEX.search(name)
    assert m is not None
    return name[: m.start(1)] + str(index) + name[m.end(1):]


def check_slices(recipe: MergeRecipe, method: MergeMethod) -> None:
    """Recipe-level rules for `slices:` (before any checkpoint is opened)."""
    if recipe.models:
        raise RecipeError("slices: give either models or slices, not both")
    for i, sl in enumerate(recipe.slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            raise RecipeError(f"slices[{i}].sources: every source must span the same number "
                              f"of layers, got {sorted(lengths)}")
        models = [s.model for s in sl.sources]
        if len(set(models)) != len(models):
            raise RecipeError(f"slices[{i}].sources: a model appears twice in one slice")
        base = sl.base_model or recipe.base_model
        if sl.base_model is not None and sl.base_model != recipe.base_model:
            raise RecipeError(f"slices[{i}].base_model: a slice base other than the recipe's "
                              "base_model is not supported")
        if method.requires_base and (base is not None or not method.optional_base):
            if base is None:
                raise RecipeError(f"base_model: required by {method.name}")
            if base not in models:
                raise RecipeError(f"slices[{i}].sources: {method.name} needs the base model "
                                  f"{base} among the slice's sources")
            if len(models) < 2:
                raise RecipeError(f"slices[{i}].sources: {method.name} needs a model besides "
                                  "the base")


def slice_inputs(recipe: MergeRecipe, sl: SliceDef, method: MergeMethod
                 ) -> tuple[list[str], list[Mapping[str, Any]]]:
    """The models a slice's method combines and their per-model parameters."""
    sources = [s for s in sl.sources
               if not (method.requires_base and s.model == recipe.base_model)]
    per_model = {p.name for p in method.params if p.per_model}
    return ([s.model for s in sources],
            [{k: v for k, v in s.parameters.items() if k in per_model} for s in sources])


def layer_templates(reference: Checkpoint, first_layer: int) -> list[str]:
    """The tensor names of one layer of `reference` (layer `first_layer`), in order."""
    names = [n for n in reference.names() if layer_index(n) == first_layer]
    if not names:
        raise CheckpointError(f"model {reference.ref} has no layer {first_layer} (no tensor "
                              "named like 'layers.N.' or 'h.N.')")
    return names


def check_range(ckpt: Checkpoint, start: int, end: int, where: str) -> None:
    layers = {layer_index(n) for n in ckpt.names()} - {None}
    count = 1 + max(layers) if layers else 0  # type: ignore[type-var]
    if end > count:
        raise RecipeError(f"{where}.layer_range: [{start}, {end}) but model {ckpt.ref} has "
                          f"{count} layers")


def layer_count_overrides(config: Mapping[str, Any], total: int) -> dict[str, int]:
    """The config keys that hold the layer count, set to `total`."""
    return {k: total for k in LAYER_COUNT_KEYS if k in config}


__all__ = ["PRE_LAYER", "check_range", "check_slices", "layer_count_overrides",
           "layer_templates", "slice_inputs", "with_layer"]
