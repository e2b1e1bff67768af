"""`knots`: KnOTS, merging LoRA updates in the SVD basis they share (Stoica et al., ICLR 2025).

The steps of the official code (`gstoica27/KnOTS`, `task_merger.py`, `SVDMerger` with
`s_on_V`, `concat_across_output`, then `masking_ops.ties_masking` and `masked_merge` with
`merging_type: mean`), per adapted matrix with T tasks of update Δᵢ (out × in):

1. one thin SVD of the concatenated updates [Δ₁ … Δ_T] = U·diag(s)·[V₁ … V_T], in float64,
   keeping the directions with s > 1e-5; task i's coordinates in the shared basis U are
   Xᵢ = diag(s)·Vᵢ (k × in);
2. optionally DARE on each Xᵢ (drop probability `dare`, survivors scaled by 1/(1−p));
3. TIES on the Xᵢ: each task keeps its entries of magnitude at least its k-th largest
   (k from `density`, over the whole model by default (`scope: global`, the official code
   flattens every matrix into one vector) or per matrix), signs are elected by the sum of
   the kept values, and the agreeing entries are averaged (the disjoint mean);
4. the merged update is λ·U·(that mean), added to the base.

For LoRA inputs (B·A·scale over the recipe's base) step 1 runs through the factors:
[Δ₁ … Δ_T] = [B₁ … B_T]·blockdiag(sᵢAᵢ); with the QR [B₁ … B_T] = Q·R it is
Q·(R·blockdiag(sᵢAᵢ)), so the SVD of the small matrix R·blockdiag(sᵢAᵢ) (Σrᵢ × T·in) gives
the same s and V and U = Q·U_small: no update is ever formed at full size. Other inputs
take the dense SVD.

Tensors KnOTS does not decompose (1-D ones; vocabulary matrices unless `vocabulary: true`)
take TIES per tensor with the same density and λ. Where the official code elects a zero
sign by the majority over the whole model, here a zero sum elects +; it only decides
entries every task dropped (zero either way) or whose kept values cancel exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from mergekit_pcb.methods.base import (
    DENSITY,
    LAMBDA,
    SCOPE,
    GlobalStats,
    ParamSpec,
    Range,
    TensorInputs,
)
from mergekit_pcb.methods.ops import combine_task_vectors, random_drop
from mergekit_pcb.methods.selection import StreamingSelect, kth_smallest
from mergekit_pcb.methods.spectral import VOCABULARY, SpectralMethod, working_dtype
from mergekit_pcb.methods.ties import Ties, ties_merge

# The official code keeps the singular directions with s > 1e-5 (absolute, in float64).
SUPPORT = 1e-5
# Factors: (left, right) with Δ = left @ right (the LoRA scale folded into left).
Factors = tuple[torch.Tensor, torch.Tensor]


def shared_basis_dense(deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U and each task's coordinates diag(s)·Vᵢ from the SVD of [Δ₁ … Δ_T], in float64."""
    joined = torch.cat([d.to(torch.float64) for d in deltas], dim=1)
    u, s, vh = torch.linalg.svd(joined, full_matrices=False)
    return _split(u, s, vh, len(deltas))


def shared_basis_factors(factors: Sequence[Factors]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same as `shared_basis_dense` of Δᵢ = leftᵢ @ rightᵢ, through the factors: a QR of
    the stacked left factors and an SVD of a (Σrᵢ × T·in) matrix."""
    lefts = [f[0].to(torch.float64) for f in factors]
    q, r = torch.linalg.qr(torch.cat(lefts, dim=1))  # reduced: q is out × min(out, Σrᵢ)
    blocks, first = [], 0
    for left, (_, right) in zip(lefts, factors, strict=True):
        width = left.shape[1]
        blocks.append(r[:, first:first + width] @ right.to(torch.float64))
        first += width
    u_small, s, vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    return _split(q @ u_small, s, vh, len(factors))


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, tasks: int
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    keep = s > SUPPORT
    u, s, vh = u[:, keep], s[keep], vh[keep]
    coords = (s[:, None] * vh).chunk(tasks, dim=1) if s.numel() else \
        [vh.new_zeros(0, vh.shape[1] // tasks)] * tasks
    return u, list(coords)


def official_keep_index(count: int, density: float) -> int:
    """The 0-based rank of the threshold among a task's `count` magnitudes, ascending: the
    official `topk_values_mask` keeps |x| ≥ the (count − ⌊count·K⌋)-th smallest."""
    return count - int(count * density) - 1


class KnotsGlobalStats(GlobalStats):
    """Each task's magnitude threshold over the coordinates of every decomposed matrix.

    Two passes, each computing every matrix's shared basis again (cheap through LoRA
    factors; nothing is kept, so memory does not grow with the model): the high bits of
    the magnitudes, then the low bits inside the bin holding the threshold. How many
    coordinates a task has is known only after the first pass (it depends on each matrix's
    rank), so the rank sought is set then.
    """

    pass_names = ("knots: |coordinates| histograms", "knots: threshold refinement")
    concurrent = True  # histogram counts: any order, the same result

    def __init__(self, num_models: int, density: float) -> None:
        self._density = density
        self._selects = [StreamingSelect([0], nonnegative=True) for _ in range(num_models)]
        self._active = [True] * num_models
        self.thresholds: list[float] = [0.0] * num_models  # 0: every coordinate kept

    def observe(self, pass_index: int, inputs: TensorInputs) -> None:
        found = Knots().coordinates(inputs)
        if found is None:
            return
        for i, x in enumerate(found[1]):
            if not self._active[i]:
                continue
            magnitude = x.abs().to(torch.float32)
            if pass_index == 0:
                self._selects[i].observe_high(magnitude)
            else:
                self._selects[i].observe_low(magnitude)

    def finish(self, pass_index: int) -> None:
        for i, sel in enumerate(self._selects):
            if not self._active[i]:
                continue
            if pass_index == 1:
                sel.finish_low()
                self.thresholds[i] = sel.values[0]
            elif sel.total == 0 or self._density >= 1:
                self._active[i] = False  # nothing to trim
            else:
                sel.ks = [official_keep_index(sel.total, self._density)]
                sel.finish_high()


class Knots(SpectralMethod):
    name = "knots"
    summary = "KnOTS: TIES (or DARE-TIES) in the SVD basis the LoRA updates share"
    params = (
        ParamSpec("density", 0.2, "fraction of each task's shared-basis coordinates kept "
                  "(the official topK/100; 20 in its KnOTS-TIES configs)",
                  bounds=DENSITY.bounds),
        ParamSpec("lambda", 0.6, "scale of the merged update (the official scaling "
                  "coefficient; 0.6 in its ViT-B KnOTS-TIES config)", bounds=LAMBDA.bounds,
                  search_range=Range(0.0, 3.0)),
        ParamSpec("dare", 0.0, "DARE drop probability on the coordinates before TIES (0: "
                  "KnOTS-TIES; the official KnOTS-DARE-TIES config uses 0.8)",
                  bounds=Range(0.0, 1.0, high_open=True)),
        ParamSpec("scope", "global", "top-k over every decomposed matrix (the official code) "
                  "or per matrix", kind=str, choices=SCOPE),
        VOCABULARY,
    )
    matrix_rule = "W₀ + λ·U·TIES(diag(s)·Vᵢ), [Δ₁…Δ_T] = U·diag(s)·[V₁…V_T]"
    uses_rng = True  # only `dare` draws
    uses_factors = True

    @classmethod
    def other_rule(cls, params: Mapping[str, Any]) -> str:
        return "W₀ + λ·TIES(Δᵢ) per tensor"

    def global_stats(self, num_models: int, total_numel: int, params: Mapping[str, Any],
                     model_params: Sequence[Mapping[str, Any]]) -> GlobalStats | None:
        if params["scope"] != "global":
            return None
        return KnotsGlobalStats(num_models, float(params["density"]))

    def coordinates(self, inputs: TensorInputs
                    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """U and the tasks' (DARE-dropped) coordinates of a matrix KnOTS decomposes; None
        for a tensor it does not."""
        assert inputs.base is not None
        if self.fallback_reason(inputs.name, inputs.base.shape, inputs.vocabulary,
                                inputs.params) is not None:
            return None
        base = inputs.base
        rows, cols = base.shape
        # a model that leaves the matrix as it is (an adapter of other modules) is an update
        # of rank 0: with every model such or factored, no dense SVD runs
        factors = [f if f is not None else
                   (base.new_zeros(rows, 0), base.new_zeros(0, cols))
                   if torch.equal(m, base) else None
                   for f, m in zip(inputs.factors or [None] * len(inputs.models),
                                   inputs.models, strict=True)]
        if all(f is not None for f in factors):
            u, coords = shared_basis_factors([f for f in factors if f is not None])
        else:
            b64 = base.to(torch.float64)
            u, coords = shared_basis_dense([m.to(torch.float64) - b64 for m in inputs.models])
        p = float(inputs.params["dare"])
        if p > 0:
            assert inputs.generators is not None
            coords = [random_drop(x, 1 - p, g) for x, g
                      in zip(coords, inputs.generators, strict=True)]
        return u, coords

    def merged_update(self, inputs: TensorInputs) -> torch.Tensor:
        """λ·U·TIES(coordinates) of a matrix KnOTS decomposes, in float64."""
        found = self.coordinates(inputs)
        assert found is not None
        u, coords = found
        density = float(inputs.params["density"])
        if inputs.params["scope"] == "global":
            assert isinstance(inputs.stats, KnotsGlobalStats)
            thresholds = inputs.stats.thresholds
        elif density >= 1 or coords[0].numel() == 0:
            thresholds = [0.0] * len(coords)
        else:
            thresholds = [kth_smallest(x.abs().to(torch.float32),
                                       official_keep_index(x.numel(), density),
                                       nonnegative=True) for x in coords]
        kept = [x * (x.abs().to(torch.float32) >= t).to(x.dtype)
                for x, t in zip(coords, thresholds, strict=True)]
        merged = combine_task_vectors(torch.zeros_like(kept[0]), kept, [1.0] * len(kept),
                                      lambda_=float(inputs.params["lambda"]), normalize=True,
                                      sign_consensus=True)
        return u @ merged

    def matrix_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        return self.merged_update(inputs).to(deltas[0].dtype)

    def other_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        density = float(inputs.params["density"])
        zero = torch.zeros_like(deltas[0])
        return ties_merge(zero, deltas, [1.0] * len(deltas), [density] * len(deltas),
                          lambda_=float(inputs.params["lambda"]))

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        """`SpectralMethod.merge` without its dense task matrices: a decomposed matrix needs
        only the coordinates (from the factors, for adapters), and the other tensors go to
        `ties` itself, whose large-tensor path trims and combines a slice at a time (an
        embedding's copies would otherwise dominate the peak memory)."""
        base = inputs.base
        assert base is not None
        dtype = working_dtype(base, *inputs.models)
        if self.fallback_reason(inputs.name, base.shape, inputs.vocabulary,
                                inputs.params) is None:
            return base.to(dtype) + self.merged_update(inputs).to(dtype)
        n = len(inputs.models)
        params = {"lambda": float(inputs.params["lambda"]), "normalize": True,
                  "int8_mask": False, "scope": "tensor", "rescale": False}
        each = {"weight": 1.0, "density": float(inputs.params["density"])}
        return Ties().merge(replace(inputs, base=base.to(dtype),
                                    models=[m.to(dtype) for m in inputs.models],
                                    params=params, model_params=[each] * n, stats=None))
