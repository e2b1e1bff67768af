"""`dare_linear` and `dare_ties`: random drop and rescale, then task arithmetic or TIES."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    MergeMethod,
    ParamSpec,
    TensorInputs,
)
from mergekit_pcb.methods.ops import (
    combine_in_slices,
    combine_task_vectors,
    combine_weighted,
    random_drop,
    sliceable,
)
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

    def separable(self, params: Mapping[str, Any]) -> bool:
        return True  # each model's mask comes from its own generator

    def prepare(self, inputs: TensorInputs) -> list[torch.Tensor]:
        base = inputs.base
        assert base is not None and inputs.generators is not None
        return [random_drop(m - base, p["density"], g, rescale=inputs.params["rescale"])
                for m, p, g in zip(inputs.models, inputs.model_params, inputs.generators,
                                   strict=True)]

    def combine(self, inputs: TensorInputs, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        return combine_weighted(inputs, prepared, sign_consensus=self.sign_consensus)

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        bounds = sliceable(inputs)
        if bounds is not None and inputs.generators is not None:
            # A large tensor a slice at a time: each model's generator draws the next
            # slice's mask, so the masks are the whole tensor's (torch's CPU `rand` gives
            # the same values in pieces as at once; tests/test_methods.py checks it).
            generators, models = inputs.generators, inputs.model_params
            rescale = inputs.params["rescale"]
            return combine_in_slices(
                inputs, bounds,
                lambda i, delta, a, b: random_drop(delta, models[i]["density"],
                                                   generators[i], rescale=rescale),
                sign_consensus=self.sign_consensus)
        return self.combine(inputs, self.prepare(inputs))  # = dare_merge


class DareLinear(_Dare):
    name = "dare_linear"
    summary = "DARE drop-and-rescale, then task arithmetic"
    params = (WEIGHT, DENSITY, LAMBDA, NORMALIZE_DARE, RESCALE, INT8_MASK)


class DareTies(_Dare):
    name = "dare_ties"
    summary = "DARE drop-and-rescale, then TIES sign election"
    sign_consensus = True
    params = (WEIGHT, DENSITY, LAMBDA, NORMALIZE_DARE, RESCALE, INT8_MASK)
