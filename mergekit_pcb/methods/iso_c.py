"""`iso_c`: isotropic merging in a common subspace (Marczak et al., ICML 2025).

As the official code computes it (`danielm1405/iso-merging`, `src/utils/iso.py`,
`iso_c`), per 2-D matrix: Δ = Σᵢ Δᵢ (the sum, not the mean), Δ = U diag(s) Vᵀ, every
singular value replaced by their mean s̄; merged = s̄·U Vᵀ, output W₀ + α·merged. Other
tensors (and vocabulary matrices unless `vocabulary: true`): W₀ + α·mean(Δᵢ).

Directions of Δ below the rank threshold are dropped (s̄ stays the mean of all r values,
so the kept part is exactly the official result; the official code would give each
arbitrary null direction the weight s̄ too). `solver: newton_schulz` computes the same
result with matmuls only: U Vᵀ = polar(Δ) by the Newton–Schulz iteration and
s̄ = tr(polar(Δ)ᵀΔ)/r = ‖Δ‖_*/r; where the iteration has not converged (a Δ with tiny but
nonzero singular values), the SVD form is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_pcb.methods.base import ParamSpec, TensorInputs
from mergekit_pcb.methods.spectral import (
    ALPHA,
    CONV,
    VOCABULARY,
    ScaledSpectralMethod,
    default_rtol,
    kept,
    mean_of,
    newton_schulz_polar,
    thin_svd,
)


def sum_of(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    return mean_of(deltas) * len(deltas)  # the official code's order: the mean times T


def iso_c_matrix(deltas: Sequence[torch.Tensor], solver: str = "svd") -> torch.Tensor:
    """The Iso-C merged task matrix of `deltas` (all m×n)."""
    total = sum_of(deltas)
    r = min(total.shape)
    if solver == "newton_schulz":
        q, converged = newton_schulz_polar(total)
        if converged:
            return (q * total).sum() / r * q
    u, s, vh = thin_svd(total)
    keep = kept(s, s[0], default_rtol(total.shape, total.dtype))
    return s.mean() * (u[:, keep] @ vh[keep])


class IsoC(ScaledSpectralMethod):
    name = "iso_c"
    summary = "Iso-C: the summed task matrix with a flat singular spectrum"
    matrix_rule = "W₀ + α·Iso-C(ΣΔᵢ)"
    params = (ALPHA,
              ParamSpec("solver", "svd", "the SVD (official) or a Newton–Schulz polar "
                        "factor (matmuls only; same result)", kind=str,
                        choices=("svd", "newton_schulz")),
              VOCABULARY, CONV)

    def task_matrix(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        return iso_c_matrix(deltas, inputs.params["solver"])
