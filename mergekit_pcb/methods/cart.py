"""`cart`: centered arithmetic with rank reduction (Choi et al., arXiv 2412.12153).

As the official code computes it (`JH-GEECS/CART`, `src/merging.py`, merge method
`CART`): W_avg = W₀ + mean(Δᵢ); centered cᵢ = Δᵢ − mean(Δ); for the matrices it acts on,
W = W_avg + λ·Σᵢ LowRank_k(cᵢ) with k = max(1, ⌊rank_ratio·r⌋) (rank_ratio 0: k = 0);
every other tensor (and vocabulary matrices unless `vocabulary: true`) is W_avg. Which
matrices: `matrices: attn_mlp` (the official code's rule: the name holds `attn` or `mlp`
and neither `ln` nor `bias`) or `all_2d`. Defaults are the shipped 8-task setting (ratio
0.12, λ 2.0); the 14-task one is 0.16 / 1.5, the 20-task one 0.32 / 1.9.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergekit_pcb.methods.base import WEIGHT_RANGE, ParamSpec, Range, TensorInputs
from mergekit_pcb.methods.spectral import (
    CONV,
    MATRICES,
    SVD_KIND,
    VOCABULARY,
    SelectiveSpectralMethod,
    mean_of,
    top_svd,
)


def cart_rank(r: int, ratio: float) -> int:
    return 0 if ratio == 0 else max(1, int(ratio * r))


def cart_offset(deltas: list[torch.Tensor], ratio: float, lambda_: float, svd: str = "full",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """W − W₀ for a matrix CART acts on: mean(Δ) + λ·Σ LowRank_k(Δᵢ − mean(Δ))."""
    mean = mean_of(deltas)
    k = cart_rank(min(mean.shape), ratio)
    low_rank = torch.zeros_like(mean)
    if k > 0:
        state = generator.get_state() if generator is not None else None
        for delta in deltas:
            if generator is not None and state is not None:
                generator.set_state(state)  # one test matrix for all: order-free
            u, s, vh = top_svd(delta - mean, k, svd, generator)
            low_rank += (u * s) @ vh
    return mean + lambda_ * low_rank


class Cart(SelectiveSpectralMethod):
    name = "cart"
    summary = "CART: the average plus λ times low-rank parts of the centered task matrices"
    params = (ParamSpec("rank_ratio", 0.12, "share of min(m, n) singular directions kept per "
                        "centered matrix", bounds=Range(0.0, 1.0),
                        search_range=Range(0.0, 1.0)),
              # [0, 3] holds the shipped settings (1.5 to 2.0) with room either side
              ParamSpec("lambda", 2.0, "scale of the summed low-rank parts",
                        bounds=WEIGHT_RANGE, search_range=Range(0.0, 3.0)),
              MATRICES, SVD_KIND, VOCABULARY, CONV)
    uses_rng = True  # only `svd: randomized` draws
    matrix_rule = "W₀ + mean(Δᵢ) + λ·Σ LowRank_k(Δᵢ − mean(Δ))"

    @classmethod
    def other_rule(cls, params: Mapping[str, Any]) -> str:
        return "W₀ + mean(Δᵢ)"

    def matrix_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        params = inputs.params
        generator = inputs.generators[0] if inputs.generators else None
        return cart_offset(deltas, float(params["rank_ratio"]), float(params["lambda"]),
                           params["svd"], generator)

    def other_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        return mean_of(deltas)  # W_avg
