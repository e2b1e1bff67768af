"""Evaluating a recipe parameter for one tensor: scalars, filtered lists and layer gradients.

As in mergekit: a list of numbers is a gradient interpolated over the model's depth; a
list of `{filter, value}` items takes the first item whose filter is a substring of the
tensor name (an item without a filter, or with `*`, matches everything).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods.base import MergeMethod, ParamSpec, ParamValue
from mergekit_pcb.recipe.schema import FilteredValue, ParameterValue

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    m = LAYER_INDEX.search(tensor_name)
    return int(m.group(1)) if m else None


def depth_position(tensor_name: str, num_layers: int) -> float:
    """Where a tensor sits for gradient parameters: layer i of n at i/(n−1).

    Tensors outside the layers (embeddings, final norm, output head) sit at 0, as in
    mergekit, so that its recipes give the same values here.
    """
    idx = layer_index(tensor_name)
    if idx is None or num_layers <= 1:
        return 0.0
    return idx / (num_layers - 1)


def evaluate(setting: ParameterValue, tensor_name: str, t: float) -> ParamValue | None:
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(x, FilteredValue) for x in setting):
        for item in setting:
            assert isinstance(item, FilteredValue)
            if item.filter in (None, "*") or item.filter in tensor_name:
                return evaluate(item.value, tensor_name, t)  # type: ignore[arg-type]
        return None
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in setting):
        values = [float(x) for x in setting]  # type: ignore[arg-type]
        scaled = t * (len(values) - 1)
        i0 = min(math.floor(scaled), len(values) - 1)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return setting[int(t * (len(setting) - 1))]  # type: ignore[return-value]


def coerce(spec: ParamSpec, value: ParamValue | None, where: str) -> ParamValue | None:
    if value is None:
        if spec.required:
            raise RecipeError(f"{where}: parameter '{spec.name}' is required")
        return spec.default
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: '{spec.name}' must be true or false, got {value!r}")
        return value
    if spec.kind in (float, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: '{spec.name}' must be a number, got {value!r}")
        return spec.kind(value)
    if spec.choices is not None and value not in spec.choices:
        raise RecipeError(
            f"{where}: '{spec.name}' must be one of {', '.join(spec.choices)}, got {value!r}"
        )
    return value


def check_parameter_keys(method: type[MergeMethod], recipe_params: Mapping[str, object],
                         model_params: list[Mapping[str, object]], prefix: str = "") -> None:
    """Unknown parameter names are errors naming their key path."""
    known = {p.name: p for p in method.params}
    names = ", ".join(known) or "none"
    for key in recipe_params:
        if key not in known:
            raise RecipeError(
                f"{prefix}parameters.{key}: unknown parameter for {method.name} (known: {names})"
            )
    for i, params in enumerate(model_params):
        for key in params:
            spec = known.get(key)
            if spec is None or not spec.per_model:
                per_model = ", ".join(p.name for p in method.params if p.per_model) or "none"
                raise RecipeError(
                    f"models[{i}].parameters.{key}: not a per-model parameter of "
                    f"{method.name} (per-model: {per_model})"
                )


def resolve_params(
    method: type[MergeMethod],
    recipe_params: Mapping[str, ParameterValue],
    model_params: list[Mapping[str, ParameterValue]],
    tensor_name: str,
    t: float,
    where: str,
) -> tuple[dict[str, ParamValue | None], list[dict[str, ParamValue | None]]]:
    """(global params, per-model params) evaluated for one tensor, defaults filled in."""
    global_values: dict[str, ParamValue | None] = {}
    per_model: list[dict[str, ParamValue | None]] = [{} for _ in model_params]
    for spec in method.params:
        default_setting = recipe_params.get(spec.name)
        default_value = (
            evaluate(default_setting, tensor_name, t) if default_setting is not None else None
        )
        if not spec.per_model:
            global_values[spec.name] = coerce(spec, default_value, f"{where}parameters")
            continue
        for i, params in enumerate(model_params):
            setting = params.get(spec.name)
            value = evaluate(setting, tensor_name, t) if setting is not None else default_value
            per_model[i][spec.name] = coerce(spec, value, f"models[{i}].parameters")
    return global_values, per_model

