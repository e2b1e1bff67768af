"""Post-processing a merge's update (merged − base), whatever method made it: pure tensor
functions; the engine (`engine.postprocess`) applies them tensor by tensor.

- `svc`: singular value calibration (FusionBench, "When Shared Knowledge Hurts: Spectral
  Over-Accumulation in Model Merging"). Each singular value σ_r of the merged update Δ is
  multiplied by γ_r = K / Σ_k max(α, s_rk), where s_rk = ⟨u_rᵀΔ, u_rᵀΔ_k⟩ / ‖u_rᵀΔ_k‖² says
  how many times task k's response along the merged direction u_r is counted in the merge.
  Computed in float64, as the official (vectorised) code does, per 2-D tensor.
- `lines_factor` / `lines_scale`: LiNeS (ICLR 2025): the update of residual block ℓ of L
  is scaled by a + b·ℓ/(L−1), tensors outside the blocks by a; `lines_alpha` is the
  paper's a, ‖Σ_k τ_k‖₁ / ‖Δ‖₁ / K over the whole model.
- `rescale_norms`: each task vector scaled to the mean of their (whole-model) norms
  before the merge, so that no task dominates by its norm alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergekit_pcb.methods.base import WEIGHT_RANGE, ParamSpec, Range

# FusionBench's configurations set α = 0.1 for task arithmetic, TIES, DARE, the simple
# average and ISO-C (1.0 only for TSV-M and WUDI, which calibrate their own spectrum).
SVC_ALPHA = 0.1
# The official code's floor under ‖u_rᵀΔ_k‖², so that a task with no response along u_r
# gives s = 0 (then max(α, 0) = α) rather than 0/0.
SVC_EPS = 1e-12


# The steps' numbers a coefficient search can vary, named as its `search:` names them.
# LiNeS's multi-task runs search b over (0, 1] (`evaluate_task_vector`: linspace(0, 1)[1:]);
# the SVC paper gives no search range for α, nor LiNeS for a given a: bounds are needed.
STEP_PARAMS: dict[str, ParamSpec] = {p.name: p for p in (
    ParamSpec("lines.b", None, "LiNeS's b: the last block's scale minus the first's",
              bounds=WEIGHT_RANGE, search_range=Range(0.0, 1.0)),
    ParamSpec("lines.a", None, "LiNeS's a: the first block's scale (and outside the blocks)",
              bounds=WEIGHT_RANGE),
    ParamSpec("svc.alpha", SVC_ALPHA, "SVC's α: the floor under each task's projection "
              "coefficient", bounds=Range(0.0, 1e6, low_open=True)),
)}


def svc(update: torch.Tensor, task_updates: Sequence[torch.Tensor],
        alpha: float = SVC_ALPHA) -> torch.Tensor:
    """The merged update `update` (m × n) with its singular values calibrated against the
    task vectors `task_updates` (each m × n); a tensor that is not 2-D is returned as it is.

    The result has `update`'s dtype; the computation runs in float64 (as the official code).
    """
    if update.dim() != 2 or not task_updates or update.numel() == 0:
        return update
    delta = update.to(torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    ut = u.mT
    merged_responses = ut @ delta  # row r: u_rᵀΔ (= σ_r v_rᵀ)
    # Σ_k max(α, s_rk), one task at a time so that only one R × n response block is held.
    total = torch.zeros_like(s)
    for task in task_updates:
        responses = ut @ task.to(torch.float64)
        denom = (responses * responses).sum(dim=1).clamp_min(SVC_EPS)
        coef = (merged_responses * responses).sum(dim=1) / denom
        coef = torch.nan_to_num(coef, nan=alpha, neginf=alpha)
        total += coef.clamp_min(alpha)
    gamma = len(task_updates) / total
    calibrated = (u * (gamma * s)) @ vh
    return calibrated.to(update.dtype)


def lines_factor(block_index: int | None, num_blocks: int, a: float, b: float) -> float:
    """LiNeS's scale for a tensor of block `block_index` of `num_blocks` (None: outside the
    blocks, scaled by `a` as the official code does)."""
    if block_index is None:
        return a
    depth = block_index / (num_blocks - 1) if num_blocks > 1 else 0.0
    return a + b * depth


def lines_scale(update: torch.Tensor, block_index: int | None, num_blocks: int, a: float,
                b: float) -> torch.Tensor:
    """`update` scaled by LiNeS's factor; the same tensor (not a copy) when the factor is 1,
    so that a = 1, b = 0 changes no bit."""
    factor = lines_factor(block_index, num_blocks, a, b)
    return update if factor == 1.0 else update * factor


def lines_alpha(summed_l1: float, merged_l1: float, num_tasks: int) -> float:
    """LiNeS's a for a multi-task merge: ‖Σ_k τ_k‖₁ / ‖Δ‖₁ / K (whole-model L1 norms of the
    task vectors' sum and of the merged update). It gives the merged update the L1 norm of
    the mean task vector whatever the merge method's own scale. A zero update keeps 1."""
    if merged_l1 == 0.0 or not math.isfinite(merged_l1):
        return 1.0
    return summed_l1 / merged_l1 / num_tasks


def rescale_factors(norms: Sequence[float]) -> list[float]:
    """The factor each task vector is multiplied by so that its norm becomes the mean of
    `norms`; a zero task vector stays as it is (factor 1)."""
    target = sum(norms) / len(norms) if norms else 0.0
    return [target / n if n > 0.0 else 1.0 for n in norms]


def rescale_norms(task_updates: Sequence[torch.Tensor],
                  norms: Sequence[float] | None = None) -> list[torch.Tensor]:
    """`task_updates` scaled to a common norm (their mean). `norms` are the whole-model
    norms the engine gathers in a statistics pass; None: each tensor's own L2 norm."""
    if norms is None:
        norms = [float(torch.linalg.vector_norm(t.to(torch.float64))) for t in task_updates]
    factors = rescale_factors(norms)
    return [t if f == 1.0 else t * f for t, f in zip(task_updates, factors, strict=True)]


__all__ = ["STEP_PARAMS", "SVC_ALPHA", "lines_alpha", "lines_factor", "lines_scale",
           "rescale_factors", "rescale_norms", "svc"]
