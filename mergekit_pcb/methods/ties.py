"""`ties`: trim each task vector to its top-density magnitudes, elect signs, disjoint mean.

Bit-compatible with mergekit's `ties`: weights multiply the trimmed task vectors before
the sign election, and `normalize` divides by the sum of the agreeing weights. mergekit
trims per tensor (`scope: tensor`, the default); the TIES paper trims over the whole model
(`scope: global`), which streams: each task's magnitude threshold is found in two passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods.base import (
    DENSITY,
    LAMBDA,
    SCOPE,
    WEIGHT,
    GlobalStats,
    MergeMethod,
    ParamSpec,
    TensorInputs,
)
from mergekit_pcb.methods.ops import (
    combine_in_slices,
    combine_task_vectors,
    combine_weighted,
    l1_rescale,
    magnitude_trim_all,
    sliceable,
    trim_mask,
)
from mergekit_pcb.methods.selection import StreamingSelect


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               densities: Sequence[float], lambda_: float = 1.0,
               normalize: bool = True, rescale: bool = False) -> torch.Tensor:
    deltas = trim_task_vectors([t - base for t in tensors], densities, rescale)
    return combine_task_vectors(base, deltas, weights, lambda_=lambda_, normalize=normalize,
                                sign_consensus=True)


def trim_task_vectors(deltas: Sequence[torch.Tensor], densities: Sequence[float],
                      rescale: bool) -> list[torch.Tensor]:
    """The TIES trim of each task vector; with `rescale`, mergekit's L1 rescale of the
    survivors (its `magnitude` sparsifier returns density ≥ 1 untouched, so no rescale
    there either)."""
    trimmed = magnitude_trim_all(deltas, densities)
    return [l1_rescale(d, t) if rescale and density < 1 else t
            for d, t, density in zip(deltas, trimmed, densities, strict=True)]


def ties_merge_thresholds(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                          weights: Sequence[float], thresholds: Sequence[float],
                          lambda_: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """TIES with the trim given as magnitude thresholds (|τ| ≥ threshold survives)."""
    deltas = []
    for t, thr in zip(tensors, thresholds, strict=True):
        delta = t - base
        deltas.append(delta * (delta.abs().float() >= thr).to(delta.dtype))
    return combine_task_vectors(base, deltas, weights, lambda_=lambda_, normalize=normalize,
                                sign_consensus=True)


def global_keep_count(total: int, density: float) -> int:
    """How many entries of a task survive a global trim (at least one, as per tensor)."""
    return max(1, int(density * total))


class TiesGlobalStats(GlobalStats):
    """Each task's magnitude threshold over the whole model: the k-th largest |τᵢ|.

    Entries tied with the threshold all survive, so a task keeps ⌊density·D⌋ entries up to
    ties at the threshold (none for continuous values).
    """

    pass_names = ("ties: |τ| histograms", "ties: threshold refinement")
    concurrent = True  # counts only (StreamingSelect adds them under its lock)

    def __init__(self, total: int, densities: Sequence[float]) -> None:
        self._selects: list[StreamingSelect | None] = [
            None if d >= 1 else StreamingSelect([total - global_keep_count(total, d)],
                                                 nonnegative=True)
            for d in densities
        ]
        self.thresholds: list[float] = [float("-inf")] * len(densities)

    def observe(self, pass_index: int, inputs: TensorInputs) -> None:
        assert inputs.base is not None
        for sel, m in zip(self._selects, inputs.models, strict=True):
            if sel is None:
                continue
            magnitude = (m - inputs.base).abs()
            if pass_index == 0:
                sel.observe_high(magnitude)
            else:
                sel.observe_low(magnitude)

    def finish(self, pass_index: int) -> None:
        for i, sel in enumerate(self._selects):
            if sel is None:
                continue
            if pass_index == 0:
                sel.finish_high()
            else:
                sel.finish_low()
                self.thresholds[i] = sel.values[0]


NORMALIZE_TIES = ParamSpec("normalize", True, "divide by the sum of the agreeing weights",
                           kind=bool)
# mergekit computes the sign-consensus mask in int8 instead of the compute dtype; the mask's
# values (and so the result) are the same, and methods without a consensus never use it.
INT8_MASK = ParamSpec("int8_mask", False, "accepted for mergekit recipes; no effect on results",
                      kind=bool)
RESCALE_L1 = ParamSpec("rescale", False, "scale each trimmed task vector back to the L1 norm "
                       "it had before trimming (mergekit's rescale)", kind=bool)


class Ties(MergeMethod):
    name = "ties"
    summary = "TIES: trim, elect sign, disjoint merge"
    params = (WEIGHT, DENSITY, LAMBDA, NORMALIZE_TIES, INT8_MASK,
              ParamSpec("scope", "tensor", "trim per tensor (mergekit) or over the whole "
                        "model (TIES paper)", kind=str, choices=SCOPE),
              RESCALE_L1)

    @classmethod
    def check_params(cls, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                     tensor: str) -> None:
        # The L1 ratio is a sum over the tensor: with a whole-model trim (streamed in
        # slices) there is no per-tensor pass to take it in.
        if params.get("rescale") and params.get("scope") == "global":
            raise RecipeError("ties: parameters.rescale: true needs scope: tensor (mergekit's "
                              "rescale is per tensor)")

    def global_stats(self, num_models: int, total_numel: int, params: Mapping[str, Any],
                     model_params: Sequence[Mapping[str, Any]]) -> GlobalStats | None:
        if params["scope"] != "global":
            return None
        return TiesGlobalStats(total_numel, [p["density"] for p in model_params])

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return params["scope"] == "global"

    def separable(self, params: Mapping[str, Any]) -> bool:
        return params["scope"] == "tensor"  # each task vector's trim is its own

    def prepare(self, inputs: TensorInputs) -> list[torch.Tensor]:
        base = inputs.base
        assert base is not None
        return trim_task_vectors([m - base for m in inputs.models],
                                 [p["density"] for p in inputs.model_params],
                                 inputs.params["rescale"])

    def combine(self, inputs: TensorInputs, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        return combine_weighted(inputs, prepared, sign_consensus=True)

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        params = inputs.params
        if params["scope"] == "global":
            assert isinstance(inputs.stats, TiesGlobalStats)
            return ties_merge_thresholds(inputs.base, inputs.models,
                                         [p["weight"] for p in inputs.model_params],
                                         inputs.stats.thresholds, params["lambda"],
                                         params["normalize"])
        bounds = None if params["rescale"] else sliceable(inputs)
        if bounds is not None:
            # A large tensor: each task vector's cut over the whole tensor, then trimmed
            # and combined a slice at a time (the same bits, a slice's scratch).
            masks = [trim_mask(inputs.base, m, p["density"], bounds)
                     for m, p in zip(inputs.models, inputs.model_params, strict=True)]
            return combine_in_slices(inputs, bounds,
                                     lambda i, delta, a, b: masks[i].apply(delta, a, b),
                                     sign_consensus=True)
        return self.combine(inputs, self.prepare(inputs))  # = ties_merge
