"""`dare_linear` and `dare_ties`: random drop and rescale, then task arithmetic or TIES."""

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
from mergekit_pcb.methods.ops import combine_task_vectors, random_drop
from mergekit_pcb.methods.ties import INT8_MASK


def dare_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               densities: Sequence[float], generators: Sequence[torch.Generator], *,
               sign_consensus: bool, lambda_: float = 1.0, normalize: bool = False,
               rescale: bool = True) -> torch.Tensor:
    deltas = [
        random_drop(t - base, d, g, rescale=rescale)
        for t, d, g in zip(tensors, densities, generators, strict=True)
    ]
    return combine_task_vectors(base, deltas, weights, lambda_=lambda_, normalize=normalize,
                                sign_consensus=sign_consensus)


RESCALE = ParamSpec("rescale", True, "divide survivors by density", kind=bool)
NORMALIZE_DARE = ParamSpec("normalize", False, "divide by the sum of the (agreeing) weights",
                           kind=bool)


class _Dare(MergeMethod):
    uses_rng = True
    sign_consensus = False

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None and inputs.generators is not None
        return dare_merge(
            inputs.base, inputs.models,
            [p["weight"] for p in inputs.model_params],
            [p["density"] for p in inputs.model_params],
            inputs.generators,
            sign_consensus=self.sign_consensus,
            lambda_=inputs.params["lambda"],
            normalize=inputs.params["normalize"],
            rescale=inputs.params["rescale"],
        )


class DareLinear(_Dare):
    name = "dare_linear"
    summary = "DARE drop-and-rescale, then task arithmetic"
    params = (WEIGHT, DENSITY, LAMBDA, NORMALIZE_DARE, RESCALE, INT8_MASK)


class DareTies(_Dare):
    name = "dare_ties"
    summary = "DARE drop-and-rescale, then TIES sign election"
    sign_consensus = True
    params = (WEIGHT, DENSITY, LAMBDA, NORMALIZE_DARE, RESCALE, INT8_MASK)
