"""The merge-method interface: declared parameters plus a pure function of tensors.

A method never reads files or knows about shards: the streaming engine hands it one
tensor's inputs (already on the compute device, in the compute dtype) and writes what it
returns. A new method is one module defining a `MergeMethod` subclass and one entry in
`mergekit_pcb.methods.REGISTRY`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

ParamValue = float | int | bool | str


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method accepts.

    `per_model` parameters live under `models[].parameters` (a value under the top-level
    `parameters` is their default for every model, as in mergekit); the others only under
    the top-level `parameters`.
    """

    name: str
    default: ParamValue | None
    doc: str
    per_model: bool = False
    kind: type = float
    choices: tuple[str, ...] | None = None
    required: bool = False


@dataclass(frozen=True)
class TensorInputs:
    """What a method sees for one output tensor.

    `models` are the tensors the method combines (for task-vector methods the fine-tuned
    models, without the base); `model_params[i]` holds the per-model parameters of
    `models[i]` evaluated for this tensor; `generators[i]` is seeded from (seed, tensor
    name, model) so results do not depend on the order tensors are processed in.
    """

    name: str
    base: torch.Tensor | None
    models: Sequence[torch.Tensor]
    model_params: Sequence[Mapping[str, Any]]
    params: Mapping[str, Any]
    generators: Sequence[torch.Generator] | None = None
    stats: GlobalStats | None = None


class GlobalStats(ABC):
    """Whole-model statistics a method gathers in streaming passes before it merges.

    The engine calls `observe(p, inputs)` for every tensor the method serves, then
    `finish(p)`, for each pass p in order; the finished object reaches `merge` as
    `inputs.stats`. Memory must not grow with the number of tensors.
    """

    pass_names: tuple[str, ...] = ()

    @abstractmethod
    def observe(self, pass_index: int, inputs: TensorInputs) -> None: ...

    @abstractmethod
    def finish(self, pass_index: int) -> None: ...


class MergeMethod(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    # Task-vector methods need the base and exclude it from `models`; `linear` does not.
    requires_base: ClassVar[bool] = True
    uses_rng: ClassVar[bool] = False

    @abstractmethod
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        """Return the merged tensor (any float dtype; the engine casts it for output)."""

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        """True when each output entry depends only on the inputs' entries at the same
        position (and on global statistics): the engine may then stream a large tensor in
        slices. Methods that rank within a tensor, or draw random masks per tensor, are not."""
        return False

    def global_stats(self, num_models: int, total_numel: int, params: Mapping[str, Any],
                     model_params: Sequence[Mapping[str, Any]]) -> GlobalStats | None:
        """Statistics over all the tensors this method serves, or None (per-tensor methods).

        `params`/`model_params` are the parameters shared by every tensor served; a method
        with global statistics requires them not to vary by tensor.
        """
        return None

    @classmethod
    def param_spec(cls, name: str) -> ParamSpec | None:
        return next((p for p in cls.params if p.name == name), None)


WEIGHT = ParamSpec("weight", 1.0, "scale of this model's contribution", per_model=True)
DENSITY = ParamSpec("density", 1.0, "fraction of task-vector entries kept", per_model=True)
LAMBDA = ParamSpec("lambda", 1.0, "scale of the merged task vector")
SCOPE = ("tensor", "global")
