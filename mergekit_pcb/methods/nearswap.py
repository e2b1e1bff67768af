"""`nearswap`: take the other model's value where it is close to the base (mergekit 0.1.5).

Per entry, w = clamp(t / max(|base − other|, 1e-6), 0, 1) and the result is
w·other + (1 − w)·base: entries closer than `t` become the other model's, far ones stay
near the base. Plan mapping as for `slerp`: the base is held apart (`inputs.base`), the
other model is `inputs.models[0]`. Extensions (not mergekit, which refuses): several other
models use their uniform mean; `t` defaults to 0.5 (mergekit requires it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergekit_pcb.methods.base import WEIGHT_RANGE, MergeMethod, ParamSpec, TensorInputs
from mergekit_pcb.methods.ops import uniform_mean

DIFF_FLOOR = 1e-6
# Same name and range as slerp's `t` (one rule per parameter name), another meaning.
T = ParamSpec("t", 0.5, "distance below which the other model's entry is taken whole "
              "(farther entries blend in as t/|base − other|)", bounds=WEIGHT_RANGE)


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    weight = (t / torch.abs(base - other).clamp(min=DIFF_FLOOR)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


class Nearswap(MergeMethod):
    name = "nearswap"
    summary = "swap in the other model's entries that lie within t of the base"
    params = (T,)
    pairwise = True

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return nearswap(float(inputs.params["t"]), inputs.base, uniform_mean(inputs.models))
