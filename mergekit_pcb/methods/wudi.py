"""`wudi`: WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference
Should End It").

Per matrix, X minimises L(X) = Σᵢ ‖(X − Δᵢ)Δᵢᵀ‖²_F / ‖Δᵢ‖²_F. `solver: adam` is the
official solver (`nathanielyvo/WUDI-Merging`, `vit/wudi_main.py`): X starts at Σᵢ Δᵢ,
then `steps` Adam steps (torch's defaults, lr `lr`, no weight decay) in float32; the
published figures come from it. The gradient is 2(X·A − B) with A = Σᵢ wᵢΔᵢᵀΔᵢ and
B = Σᵢ wᵢΔᵢΔᵢᵀΔᵢ, wᵢ = 1/‖Δᵢ‖²_F (an all-zero Δᵢ has no term): one m×n×n product a
step when n ≤ m, else the per-task m×m form. `solver: closed_form` solves the quadratic
instead: X·A = B, the solution nearest the Adam start, X = S − (S·A − B)·A⁺ with S = ΣΔᵢ
(A⁺ in float64 from A's eigenvalues above 1.9e-9·λ_max, below which float64 rounding
would exceed float32's). It is the optimum the
early-stopped Adam only moves towards: a different merge, never substituted.

Output W₀ + X (no α). Which matrices: `matrices: attn_mlp` (names holding `attn` or
`mlp`, neither `ln` nor `bias`: on CLIP exactly the official code's four keys,
`attn.in_proj_weight`, `attn.out_proj.weight`, `mlp.c_fc.weight`, `mlp.c_proj.weight`)
or `all_2d` (FusionBench); the other
tensors (and vocabulary matrices unless `vocabulary: true`) take `rest`: `base` (the
official code leaves them at W₀) or `mean` (FusionBench: W₀ + mean Δᵢ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.methods.base import ParamSpec, Range, TensorInputs
from mergekit_pcb.methods.spectral import (
    CONV,
    MATRICES,
    VOCABULARY,
    SelectiveSpectralMethod,
    mean_of,
)

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the official code uses
ADAM_EPS = 1e-8
EIGEN_RTOL = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps  # ≈ 1.9e-9


def wudi_weights(deltas: Sequence[torch.Tensor]) -> list[float]:
    out = []
    for d in deltas:
        sq = float(torch.linalg.matrix_norm(d) ** 2)
        out.append(1.0 / sq if sq > 0 else 0.0)
    return out


def wudi_loss(x: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """L(X), computed as the official code does (through the m×m products)."""
    total = x.new_zeros(())
    for d, w in zip(deltas, wudi_weights(deltas), strict=True):
        total = total + w * ((x - d) @ d.mT).square().sum()
    return total


class _Gradient:
    """∇L(X)/2 = X·A − B, precomputed as far as the shape makes it cheap."""

    def __init__(self, deltas: Sequence[torch.Tensor]) -> None:
        self.deltas = [d for d, w in zip(deltas, wudi_weights(deltas), strict=True) if w > 0]
        self.weights = [w for w in wudi_weights(deltas) if w > 0]
        rows, cols = deltas[0].shape
        self.gram = cols <= rows
        like = deltas[0]
        self.b = like.new_zeros(like.shape)
        self.a = like.new_zeros(cols, cols) if self.gram else None
        for d, w in zip(self.deltas, self.weights, strict=True):
            g = d.mT @ d
            self.b += w * (d @ g)
            if self.a is not None:
                self.a += w * g

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.a is not None:
            return x @ self.a - self.b
        out = -self.b
        for d, w in zip(self.deltas, self.weights, strict=True):
            out = out + w * ((x @ d.mT) @ d)
        return out


def wudi_adam(deltas: Sequence[torch.Tensor], steps: int = 300, lr: float = 1e-5
              ) -> torch.Tensor:
    """The official solver: Adam from Σ Δᵢ, written out as torch.optim.Adam computes it
    (the gradient in closed form rather than by autograd)."""
    x = mean_of(deltas) * len(deltas)
    grad = _Gradient(deltas)
    if len(grad.deltas) < 2:
        # One task with a non-zero Δ (or none): the start Σ Δᵢ is that Δ, where the
        # official gradient is exactly zero and Adam stays put; our precomputed form would
        # give rounding noise there, which Adam's normalized steps would follow.
        return x
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    beta1, beta2 = ADAM_BETAS
    for t in range(1, steps + 1):
        g = 2 * grad(x)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** t)
        denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(ADAM_EPS)
        x.addcdiv_(m, denom, value=-step_size)
    return x


def wudi_closed_form(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The minimiser of L nearest Σ Δᵢ: X = S − (S·A − B)·A⁺, in float64."""
    dtype = deltas[0].dtype
    d64 = [d.to(torch.float64) for d in deltas]
    weights = wudi_weights(d64)
    cols = d64[0].shape[1]
    a = d64[0].new_zeros(cols, cols)
    b = torch.zeros_like(d64[0])
    for d, w in zip(d64, weights, strict=True):
        g = d.mT @ d
        a += w * g
        b += w * (d @ g)
    s = mean_of(d64) * len(d64)
    evals, evecs = torch.linalg.eigh(a)
    top = float(evals.abs().max()) if evals.numel() else 0.0
    # Dividing by an eigenvalue λ multiplies float64 rounding (eps64·λ_max) by λ_max/λ:
    # below λ_max·eps64/eps32 that would exceed float32's own rounding of the result.
    keep = evals > EIGEN_RTOL * top
    vk = evecs[:, keep]
    residual = s @ a - b
    x = s - ((residual @ vk) / evals[keep]) @ vk.mT
    return x.to(dtype)


class Wudi(SelectiveSpectralMethod):
    name = "wudi"
    summary = "WUDI: the matrix whose interference with every task vector is least"
    params = (ParamSpec("solver", "adam", "adam: the official early-stopped Adam; "
                        "closed_form: the exact optimum (a different merge)", kind=str,
                        choices=("adam", "closed_form")),
              ParamSpec("steps", 300, "Adam steps", kind=int, bounds=Range(0, 100_000)),
              ParamSpec("lr", 1e-5, "Adam learning rate", bounds=Range(0.0, 1.0,
                                                                      low_open=True)),
              MATRICES,
              ParamSpec("rest", "base", "the tensors WUDI does not optimise: the base "
                        "(official code) or the models' mean (FusionBench)", kind=str,
                        choices=("base", "mean")),
              VOCABULARY, CONV)
    matrix_rule = "W₀ + X, X = argmin Σᵢ ‖(X − Δᵢ)Δᵢᵀ‖²/‖Δᵢ‖² (solver)"

    @classmethod
    def other_rule(cls, params: Mapping[str, Any]) -> str:
        rest = params.get("rest")
        if rest is None:  # `pcbmerge methods`: both choices
            return "W₀ (rest: base) or W₀ + mean(Δᵢ) (rest: mean)"
        return "W₀ (rest: base)" if rest == "base" else "W₀ + mean(Δᵢ) (rest: mean)"

    def matrix_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        params = inputs.params
        if params["solver"] == "closed_form":
            return wudi_closed_form(deltas)
        return wudi_adam(deltas, int(params["steps"]), float(params["lr"]))

    def other_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        return torch.zeros_like(deltas[0]) if inputs.params["rest"] == "base" \
            else mean_of(deltas)
