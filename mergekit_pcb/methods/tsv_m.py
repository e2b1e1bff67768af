"""`tsv_m`: Task Singular Vectors: Merge (Gargiulo et al., CVPR 2025).

As the official code computes it (`AntoAndGar/task_singular_vectors`,
`src/utils/TSVM_utils.py`, `compute_and_sum_svd_mem_reduction`), per 2-D matrix with
r = min(m, n) and T tasks: k = ⌊r/T⌋; task i's top-k singular triplets go to slots
[i·k, (i+1)·k) of Ū (m×r), s̄ and V̄ᵀ (r×n), slots past T·k stay zero, s̄ is not re-sorted;
the merged task matrix is polar(Ū)·diag(s̄)·polar(V̄ᵀ) and the output W₀ + α·that.
Other tensors (and vocabulary matrices unless `vocabulary: true`): W₀ + α·mean(Δᵢ).

Our additions, neither changing a full-rank result: a task's directions below the rank
threshold are dropped before the polar factors (see `spectral`), and `svd: randomized`
finds the top-k triplets with a seeded randomized SVD (one test matrix for every task, so
the result does not depend on the models' order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_pcb.methods.base import TensorInputs
from mergekit_pcb.methods.spectral import (
    ALPHA,
    CONV,
    SVD_KIND,
    VOCABULARY,
    ScaledSpectralMethod,
    default_rtol,
    kept,
    polar,
    top_svd,
)


def tsv_merge_matrix(deltas: Sequence[torch.Tensor], svd: str = "full",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The TSV-M merged task matrix of the task matrices `deltas` (all m×n)."""
    rows, cols = deltas[0].shape
    r, tasks = min(rows, cols), len(deltas)
    k = r // tasks
    like = deltas[0]
    u_bar = like.new_zeros(rows, r)
    s_bar = like.new_zeros(r)
    vh_bar = like.new_zeros(r, cols)
    if k > 0:
        rtol = default_rtol(like.shape, like.dtype)
        # One randomized test matrix for every task: a generator re-seeded per task would
        # tie the result to the models' order.
        state = generator.get_state() if generator is not None else None
        for i, delta in enumerate(deltas):
            if generator is not None and state is not None:
                generator.set_state(state)
            u, s, vh = top_svd(delta, k, svd, generator)
            keep = kept(s, s[0] if s.numel() else 0.0, rtol).to(s.dtype)
            u_bar[:, i * k:i * k + u.shape[1]] = u * keep
            s_bar[i * k:i * k + s.shape[0]] = s * keep
            vh_bar[i * k:i * k + vh.shape[0]] = vh * keep[:, None]
    return polar(u_bar) @ torch.diag(s_bar) @ polar(vh_bar)


class TsvM(ScaledSpectralMethod):
    name = "tsv_m"
    summary = "TSV-M: each task's top singular vectors side by side, orthogonalized"
    params = (ALPHA, SVD_KIND, VOCABULARY, CONV)
    matrix_rule = "W₀ + α·TSV-M(Δ₁…Δ_T)"
    uses_rng = True  # only `svd: randomized` draws

    def task_matrix(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        generator = inputs.generators[0] if inputs.generators else None
        return tsv_merge_matrix(deltas, inputs.params["svd"], generator)
