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
        value = (1 - frac) * values[i0] + frac * values[i1]
        # Rounding must not carry a value past its two ends (e.g. [1, 1] -> 1.0000000000000002
        # would leave density's range).
        return min(max(value, min(values[i0], values[i1])), max(values[i0], values[i1]))
    return setting[int(t * (len(setting) - 1))]  # type: ignore[return-value]


def _show(value: object, limit: int = 60) -> str:
    """A recipe value or key for a one-line message: repr'd (no raw newlines), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _key_name(key: object) -> str:
    return key if isinstance(key, str) and key.isprintable() and key else _show(key)


def check_value(spec: ParamSpec, value: object, key: str) -> ParamValue:
    """`value` converted to `spec.kind`, or a RecipeError naming the recipe `key` path.

    Numbers must be finite and inside `spec.bounds` (NaN and ±inf are outside every range).
    """
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: must be true or false, got {_show(value)}")
        return value
    if spec.kind in (float, int):
        assert spec.bounds is not None  # ParamSpec requires bounds on numbers
        # The range test comes before float(): an int of 400 digits would overflow it.
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or value not in spec.bounds):
            raise RecipeError(f"{key}: must be a number in {spec.bounds}, got {_show(value)}")
        return spec.kind(value)
    if spec.choices is not None and value not in spec.choices:
        raise RecipeError(f"{key}: must be one of {', '.join(spec.choices)}, got {_show(value)}")
    return value  # type: ignore[return-value]  # a choice, or a string parameter's value


def check_setting(spec: ParamSpec, setting: object, key: str) -> None:
    """Every value a setting holds, checked whether or not some tensor selects it: a bad
    item in a gradient or a filtered list is named by its index (`density[2]`,
    `weight[0].value`)."""
    if not isinstance(setting, list):
        check_value(spec, setting, key)
        return
    if not setting:
        raise RecipeError(f"{key}: an empty list gives no value")
    for j, item in enumerate(setting):
        if isinstance(item, FilteredValue):
            check_setting(spec, item.value, f"{key}[{j}].value")
        else:
            check_value(spec, item, f"{key}[{j}]")


def _any_method_takes(key: object) -> bool:
    """Whether `key` is a parameter of some merge method (so not a misspelling)."""
    from mergekit_pcb.methods import REGISTRY  # the registry imports every method module

    return any(p.name == key for cls in REGISTRY.values() for p in cls.params)


def check_parameter_keys(method: type[MergeMethod], recipe_params: Mapping[str, object],
                         model_params: list[Mapping[str, object]], prefix: str = "",
                         models_key: str = "models") -> list[str]:
    """Unknown parameter names, and values of the wrong type or out of range, are errors
    naming their key path (checked before any checkpoint is opened).

    A key that is another method's parameter but not this method's (mergekit's recipes give
    `weight` to every model, also for slerp) is ignored, as mergekit ignores it: returned
    as one warning line per key name. A key no method takes stays an error (a misspelling).
    `prefix` leads the key paths of `recipe_params`; `model_params[i]` is named
    `{models_key}[i]` (`slices[0].sources[i]` for a slice's sources).
    """
    known = {p.name: p for p in method.params}
    names = ", ".join(known) or "none"
    ignored: dict[str, list[str]] = {}
    sections = [(f"{prefix}parameters", recipe_params, False),
                *((f"{models_key}[{i}].parameters", params, True)
                  for i, params in enumerate(model_params))]
    for where, params, per_model_only in sections:
        for key, setting in params.items():
            spec = known.get(key)
            if spec is None and _any_method_takes(key):
                ignored.setdefault(str(key), []).append(f"{where}.{key}")
                continue
            if spec is None:
                raise RecipeError(f"{where}.{_key_name(key)}: unknown parameter for "
                                  f"{method.name} (known: {names})")
            if per_model_only and not spec.per_model:
                per_model = ", ".join(p.name for p in method.params if p.per_model) or "none"
                raise RecipeError(
                    f"{where}.{_key_name(key)}: not a per-model parameter of "
                    f"{method.name} (per-model: {per_model})"
                )
            check_setting(spec, setting, f"{where}.{key}")
    return [f"{paths[0]}{f' (and {len(paths) - 1} more)' if len(paths) > 1 else ''}: "
            f"{method.name} takes no '{key}' parameter; ignored, as mergekit ignores it"
            for key, paths in ignored.items()]


def setting_filters(setting: object, key: str) -> list[tuple[str, str]]:
    """(key path, filter) of every `{filter, value}` item of a setting that names a filter
    (not `*` or none, which match every tensor)."""
    if not isinstance(setting, list):
        return []
    return [(f"{key}[{j}].filter", item.filter) for j, item in enumerate(setting)
            if isinstance(item, FilteredValue) and item.filter not in (None, "*")]


def _resolve(spec: ParamSpec, setting: ParameterValue | None, key: str, tensor_name: str,
             t: float) -> ParamValue | None:
    """The setting's value for this tensor, or None when it gives none (absent, or no
    filter matches)."""
    if setting is None:
        return None
    check_setting(spec, setting, key)
    value = evaluate(setting, tensor_name, t)
    if value is None:
        return None
    return check_value(spec, value, f"{key} (tensor '{tensor_name}')"
                       if isinstance(setting, list) else key)


def resolve_params(
    method: type[MergeMethod],
    recipe_params: Mapping[str, ParameterValue],
    model_params: list[Mapping[str, ParameterValue]],
    tensor_name: str,
    t: float,
    where: str,
) -> tuple[dict[str, ParamValue | None], list[dict[str, ParamValue | None]]]:
    """(global params, per-model params) evaluated for one tensor, defaults filled in.

    Every value is checked against its ParamSpec (type, finite, in range) and the method's
    rules across parameters, so whatever this returns the method can merge; errors name the
    recipe key (a top-level value that is a per-model default is named as such).
    """
    global_values: dict[str, ParamValue | None] = {}
    per_model: list[dict[str, ParamValue | None]] = [{} for _ in model_params]
    for spec in method.params:
        top_key = f"{where}parameters.{spec.name}"
        default_value = _resolve(spec, recipe_params.get(spec.name), top_key, tensor_name, t)
        if not spec.per_model:
            global_values[spec.name] = _fill(spec, default_value, top_key)
            continue
        for i, params in enumerate(model_params):
            key = f"models[{i}].parameters.{spec.name}"
            setting = params.get(spec.name)
            value = (default_value if setting is None
                     else _resolve(spec, setting, key, tensor_name, t))
            per_model[i][spec.name] = _fill(spec, value, key)
    method.check_params(global_values, per_model, tensor_name)
    return global_values, per_model


def _fill(spec: ParamSpec, value: ParamValue | None, key: str) -> ParamValue | None:
    if value is not None:
        return value
    if spec.required:
        raise RecipeError(f"{key}: required")
    return spec.default
