"""`ties`: trim each task vector to its top-density magnitudes, elect signs, disjoint mean.

Bit-compatible with mergekit's `ties`: weights multiply the trimmed task vectors before
the sign election, and `normalize` divides by the sum of the agreeing weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_pcb.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    MergeMethod,
    ParamSpec,
    TensorInputs,
)
from mergekit_pcb.methods.ops import combine_task_vectors, magnitude_trim


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               densities: Sequence[float], lambda_: float = 1.0,
               normalize: bool = True) -> torch.Tensor:
    deltas = [magnitude_trim(t - base, d) for t, d in zip(tensors, densities, strict=True)]
    return combine_task_vectors(base, deltas, weights, lambda_=lambda_, normalize=normalize,
                                sign_consensus=True)


NORMALIZE_TIES = ParamSpec("normalize", True, "divide by the sum of the agreeing weights",
                           kind=bool)
INT8_MASK = ParamSpec("int8_mask", False, "accepted for mergekit recipes; no effect on results",
                      kind=bool)


class Ties(MergeMethod):
    name = "ties"
    summary = "TIES: trim, elect sign, disjoint merge"
    params = (WEIGHT, DENSITY, LAMBDA, NORMALIZE_TIES, INT8_MASK)

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return ties_merge(
            inputs.base, inputs.models,
            [p["weight"] for p in inputs.model_params],
            [p["density"] for p in inputs.model_params],
            inputs.params["lambda"], inputs.params["normalize"],
        )
