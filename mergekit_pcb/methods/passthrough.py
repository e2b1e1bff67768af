"""`passthrough`: one model's tensors, optionally multiplied by `scale` (mergekit 0.1.5).

mergekit's passthrough takes exactly one input (its use is layer stacking with `slices:`,
which recipes here do not have); `scale` unset returns the tensor untouched. No base:
`requires_base` is false, so a recipe's `base_model` is not read unless listed under
`models:`. Extension (not mergekit, which refuses): several models give the uniform mean
of their scaled tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergekit_pcb.methods.base import WEIGHT_RANGE, MergeMethod, ParamSpec, TensorInputs
from mergekit_pcb.methods.ops import uniform_mean

SCALE = ParamSpec("scale", None, "multiply this model's tensors by this (unset: unchanged)",
                  per_model=True, bounds=WEIGHT_RANGE)


class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "copy one model's tensors, optionally scaled"
    requires_base = False
    params = (SCALE,)

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        scaled = [m if p["scale"] is None else m * p["scale"]
                  for m, p in zip(inputs.models, inputs.model_params, strict=True)]
        return uniform_mean(scaled)
