"""`task_arithmetic`: θ₀ + λ Σ wᵢτᵢ with τᵢ = θᵢ − θ₀."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.methods.base import LAMBDA, WEIGHT, MergeMethod, ParamSpec, TensorInputs
from mergekit_pcb.methods.ops import combine_task_vectors
from mergekit_pcb.methods.ties import INT8_MASK


def task_arithmetic_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                          weights: Sequence[float], lambda_: float = 1.0,
                          normalize: bool = False) -> torch.Tensor:
    deltas = [t - base for t in tensors]
    return combine_task_vectors(base, deltas, weights, lambda_=lambda_, normalize=normalize)


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "base plus the weighted sum of task vectors"
    params = (
        WEIGHT,
        LAMBDA,
        ParamSpec("normalize", False, "divide the sum by the sum of the weights", kind=bool),
        INT8_MASK,  # mergekit accepts it for every task-arithmetic method
    )

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        return task_arithmetic_merge(
            inputs.base, inputs.models, [p["weight"] for p in inputs.model_params],
            inputs.params["lambda"], inputs.params["normalize"],
        )
