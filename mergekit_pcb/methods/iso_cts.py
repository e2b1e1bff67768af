"""`iso_cts`: isotropic merging in common and task-specific subspaces (Marczak et al.,
ICML 2025).

As the official code computes it (`danielm1405/iso-merging`, `src/utils/iso.py`,
`iso_cts`), per 2-D matrix with r = min(m, n), T tasks, f = `common_space_fraction`:
c₀ = ⌊f·r⌋; the task slots number round((r − c₀)/T)·T (Python's round, as there) and
k_t = that/T each; the common subspace keeps the other c = r − T·k_t triplets of the SVD
of Σᵢ Δᵢ. Each task's Δᵢ − U_c U_cᵀ Δᵢ gives its top k_t triplets. Task blocks fill slots
[0, T·k_t) in model order, the common block the rest; merged = mean(s)·polar(U)·polar(Vᵀ)
and the output W₀ + α·merged. Other tensors (and vocabulary matrices unless
`vocabulary: true`): W₀ + α·mean(Δᵢ).

Differences, none affecting a full-rank result: directions below the rank threshold
(relative to Σ Δᵢ for the common block, to Δᵢ for task i's) are dropped; and where the
rounding would give the tasks more slots than r − 0 (small r with f near 0, where the
official code fails), the tasks get ⌊r/T⌋ each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_pcb.methods.base import ParamSpec, Range, TensorInputs
from mergekit_pcb.methods.iso_c import sum_of
from mergekit_pcb.methods.spectral import (
    ALPHA,
    CONV,
    VOCABULARY,
    ScaledSpectralMethod,
    default_rtol,
    kept,
    polar,
    thin_svd,
)


def iso_cts_split(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common slots c, slots per task k_t), c + T·k_t = r."""
    common0 = int(r * fraction)
    per_task = min(round((r - common0) / tasks), r // tasks)
    return r - per_task * tasks, per_task


def iso_cts_matrix(deltas: Sequence[torch.Tensor], fraction: float = 0.8) -> torch.Tensor:
    """The Iso-CTS merged task matrix of `deltas` (all m×n)."""
    total = sum_of(deltas)
    rows, cols = total.shape
    r, tasks = min(rows, cols), len(deltas)
    rtol = default_rtol(total.shape, total.dtype)
    common, per_task = iso_cts_split(r, tasks, fraction)
    u, s, vh = thin_svd(total)
    keep = kept(s[:common], s[0], rtol).to(s.dtype)
    u_c, s_c, vh_c = u[:, :common] * keep, s[:common] * keep, vh[:common] * keep[:, None]
    u_all = total.new_zeros(rows, r)
    s_all = total.new_zeros(r)
    vh_all = total.new_zeros(r, cols)
    for i, delta in enumerate(deltas):
        if per_task == 0:
            break
        specific = delta - u_c @ (u_c.mT @ delta)
        ut, st, vht = thin_svd(specific)
        scale = torch.linalg.matrix_norm(delta, ord=2)
        kt = kept(st[:per_task], scale, rtol).to(st.dtype)
        block = slice(i * per_task, (i + 1) * per_task)
        u_all[:, block] = ut[:, :per_task] * kt
        s_all[block] = st[:per_task] * kt
        vh_all[block] = vht[:per_task] * kt[:, None]
    u_all[:, tasks * per_task:] = u_c
    s_all[tasks * per_task:] = s_c
    vh_all[tasks * per_task:] = vh_c
    return s_all.mean() * (polar(u_all) @ polar(vh_all))


class IsoCts(ScaledSpectralMethod):
    name = "iso_cts"
    summary = "Iso-CTS: a common and per-task subspaces, flat singular spectrum"
    matrix_rule = "W₀ + α·Iso-CTS(Δ₁…Δ_T)"
    params = (ALPHA,
              ParamSpec("common_space_fraction", 0.8, "share of the r directions taken from "
                        "the summed task matrix", bounds=Range(0.0, 1.0)),
              VOCABULARY, CONV)

    def task_matrix(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        return iso_cts_matrix(deltas, float(inputs.params["common_space_fraction"]))
