"""The inner merge of a population: any registered method, one tensor at a time.

Mirrors the streaming engine's routing (methods.md): floating tensors go to the method,
normalization running statistics are averaged, integer buffers are copied from the first
member. Random methods (DARE) draw from generators keyed by (seed, tensor, slot), so a
merge does not depend on member file names or on the order tensors are merged in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.engine.plan import RUNNING_STATS
from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.methods import TensorInputs, get_method
from mergekit_pcb.recipe.params import depth_position, layer_index, resolve_params
from mergekit_pcb.recipe.schema import ParameterValue


class PopulationMerger:
    def __init__(self, method_name: str, parameters: Mapping[str, ParameterValue],
                 names: Sequence[str], size: int, seed: int) -> None:
        self.method = get_method(method_name, where="merge.merge_method")
        self.parameters = dict(parameters)
        self.size = size
        self.seed = seed
        self.num_layers = 1 + max((layer_index(n) or 0) for n in names) if names else 1
        self._params: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    @property
    def requires_base(self) -> bool:
        return self.method.requires_base

    def params_for(self, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        cached = self._params.get(name)
        if cached is None:
            t = depth_position(name, self.num_layers)
            cached = resolve_params(type(self.method), self.parameters,
                                    [{} for _ in range(self.size)], name, t, where="merge.")
            self._params[name] = cached
        return cached

    def merge_tensor(self, name: str, members: Sequence[torch.Tensor],
                     base: torch.Tensor | None) -> torch.Tensor:
        """Merged tensor `name` from one tensor per member (in slot order), in their dtype."""
        first = members[0]
        if not first.dtype.is_floating_point:
            return first
        acc = torch.float64 if first.dtype == torch.float64 else torch.float32
        values = [m.to(acc) for m in members]
        if name.endswith(RUNNING_STATS):
            return torch.stack(values).mean(dim=0).to(first.dtype)
        global_params, model_params = self.params_for(name)
        generators = None
        if self.method.uses_rng:
            generators = [tensor_generator(self.seed, name, f"member{i}")
                          for i in range(len(members))]
        out = self.method.merge(TensorInputs(
            name=name,
            base=base.to(acc) if base is not None else None,
            models=values,
            model_params=model_params[: len(members)],
            params=global_params,
            generators=generators,
        ))
        return out.to(first.dtype)


__all__ = ["PopulationMerger"]
