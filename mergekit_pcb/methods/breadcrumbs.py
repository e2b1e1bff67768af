"""`breadcrumbs` and `breadcrumbs_ties`: Model Breadcrumbs (Davari & Belilovsky, 2023).

mergekit 0.1.5's `magnitude_outliers` sparsifier inside its generalized task arithmetic:
per model and tensor, drop the ⌊gamma·n⌋ largest |τ| (outliers) and keep the next
⌊density·n⌋ largest; then θ₀ + λ·Σᵢ wᵢτ̃ᵢ (`breadcrumbs`) or with TIES's sign election
(`breadcrumbs_ties`). Deterministic. As in mergekit, density 1 (the default) keeps every
entry and ignores gamma, and `normalize` is off by default for both.
"""

from __future__ import annotations

import torch

from mergekit_pcb.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    MergeMethod,
    ParamSpec,
    Range,
    TensorInputs,
)
from mergekit_pcb.methods.ops import (
    SliceMask,
    combine_in_slices,
    combine_weighted,
    magnitude_outliers,
    outliers_mask,
    sliceable,
)
from mergekit_pcb.methods.ties import INT8_MASK, RESCALE_L1

GAMMA = ParamSpec("gamma", 0.01, "fraction of the largest-magnitude entries dropped as "
                  "outliers (ignored at density 1)", per_model=True, bounds=Range(0.0, 1.0))
NORMALIZE_GTA = ParamSpec("normalize", False, "divide by the sum of the (agreeing) weights",
                          kind=bool)


class _Breadcrumbs(MergeMethod):
    sign_consensus = False
    params = (WEIGHT, DENSITY, GAMMA, LAMBDA, NORMALIZE_GTA, RESCALE_L1, INT8_MASK)

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        rescale = bool(inputs.params["rescale"])
        bounds = None if rescale else sliceable(inputs)
        if bounds is not None:
            # A large tensor: each window's ends over the whole tensor, then trimmed and
            # combined a slice at a time (the same bits, a slice's scratch).
            masks = [SliceMask() if p["density"] >= 1 else
                     outliers_mask(inputs.base, m, p["density"], p["gamma"], bounds)
                     for m, p in zip(inputs.models, inputs.model_params, strict=True)]
            return combine_in_slices(inputs, bounds,
                                     lambda i, delta, a, b: masks[i].apply(delta, a, b),
                                     sign_consensus=self.sign_consensus)
        deltas = [magnitude_outliers(m - inputs.base, p["density"], p["gamma"], rescale)
                  for m, p in zip(inputs.models, inputs.model_params, strict=True)]
        return combine_weighted(inputs, deltas, sign_consensus=self.sign_consensus)


class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"
    summary = "Model Breadcrumbs: drop outliers and small entries, then task arithmetic"


class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    summary = "Model Breadcrumbs, then TIES sign election"
    sign_consensus = True
