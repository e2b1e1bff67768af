"""The merge-method interface: declared parameters plus a pure function of tensors.

A method never reads files or knows about shards: the streaming engine hands it one
tensor's inputs (already on the compute device, in the compute dtype) and writes what it
returns. A new method is one module defining a `MergeMethod` subclass and one entry in
`mergekit_pcb.methods.REGISTRY`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

ParamValue = float | int | bool | str


def format_number(x: float) -> str:
    """1e6 -> '1e6', 1e-06 -> '1e-6', 0.5 -> '0.5' (for ranges in messages and docs)."""
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).strip("+") + m.group(2),
                  f"{x:g}")


@dataclass(frozen=True)
class Range:
    """The values a numeric parameter accepts: an interval of finite numbers."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        # NaN fails every comparison, so it is never inside; a huge int compares exactly.
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        return (f"{'(' if self.low_open else '['}{format_number(self.low)}, "
                f"{format_number(self.high)}{')' if self.high_open else ']'}")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method accepts.

    `per_model` parameters live under `models[].parameters` (a value under the top-level
    `parameters` is their default for every model, as in mergekit); the others only under
    the top-level `parameters`. A numeric parameter declares its `bounds`, which the plan
    checks for every value a recipe gives it, so a method never sees one outside them.
    """

    name: str
    default: ParamValue | None
    meaning: str
    per_model: bool = False
    kind: type = float
    choices: tuple[str, ...] | None = None
    required: bool = False
    bounds: Range | None = None
    # The interval a coefficient search spans when the recipe names the parameter without
    # bounds (the method's papers' own search range); None: the recipe must give bounds.
    search_range: Range | None = None

    def __post_init__(self) -> None:
        if self.kind in (float, int) and self.bounds is None:
            raise TypeError(f"numeric parameter '{self.name}' needs bounds")

    @property
    def doc(self) -> str:
        """What `pcbmerge methods` shows: the meaning and, for numbers, the range (and the
        coefficient search's default range)."""
        meaning = self.meaning if self.search_range is None else \
            f"{self.meaning} (a coefficient search's default range: {self.search_range})"
        return meaning if self.bounds is None else f"{meaning}; in {self.bounds}"


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
    start: int | None = None  # the slice's first element; None: the whole tensor
    # A vocabulary-indexed matrix (embedding, LM head): methods that decompose matrices
    # give it a stated fallback unless the recipe opts in.
    vocabulary: bool = False
    # For a method with `uses_factors`, whole tensors only: model i's task vector as low-rank
    # factors (left, right), Δᵢ = left @ right exactly (a LoRA adapter over the recipe's
    # base), or None where model i has none; None: no model has any.
    factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None


class PartStore(Protocol):
    """One model's per-part tensors, kept by the engine from one merge to the next
    (`GlobalStats.reuse_parts`): `kind` names what a tensor is, (`name`, `start`) the part."""

    def get(self, kind: str, name: str, start: int | None) -> torch.Tensor | None: ...

    def put(self, kind: str, name: str, start: int | None, tensor: torch.Tensor) -> None: ...


class GlobalStats(ABC):
    """Whole-model statistics a method gathers in streaming passes before it merges.

    The engine calls `observe(p, inputs)` for every tensor the method serves, then
    `finish(p)`, for each pass p in order; the finished object reaches `merge` as
    `inputs.stats`. Memory must not grow with the number of tensors, unless the engine
    sets `keep_parts`: it merges in memory anyway (an evolution's population), and the
    object may keep what it derives per part (`inputs.name`, `inputs.start`) for the next
    passes and the merge instead of deriving it again.
    """

    keep_parts: bool = False

    pass_names: tuple[str, ...] = ()
    # True for statistics of each tensor on its own (its norms), which a per-tensor method
    # needs only where the engine streams a tensor in slices: the passes then read only
    # those tensors (`MergePlan.observed`; none: no passes), and the parameters may vary
    # from tensor to tensor. The method merges a whole tensor without them.
    per_tensor: ClassVar[bool] = False
    # True when `observe` may run for different inputs on several threads at once and what
    # it gathers does not depend on their order (counts, minima, maxima): the engine then
    # spreads a pass over its part workers. Sums of floats depend on order: keep False.
    concurrent: ClassVar[bool] = False

    @abstractmethod
    def observe(self, pass_index: int, inputs: TensorInputs) -> None: ...

    def model_results(self) -> Sequence[Any] | None:
        """After the last pass: what each model alone determined (its own row of the
        statistics), for `reuse` in a later merge with that same model; None: nothing."""
        return None

    def reuse(self, known: Sequence[Any]) -> None:
        """Before the first pass: `known[i]` is model i's `model_results` entry from an
        earlier merge of the same model at the same position, or None; the object may then
        skip the work that model alone determines."""
        return None

    def reuse_parts(self, stores: Sequence[PartStore | None]) -> None:
        """Before the first pass, merging in memory (`keep_parts`): `stores[i]` keeps what
        model i alone determines per part (at this position, with these models' count) from
        one merge to the next, or is None; the object may take such tensors from it and
        put them there."""
        return None

    @abstractmethod
    def finish(self, pass_index: int) -> None: ...


class MergeMethod(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    # Task-vector methods need the base and exclude it from `models`; `linear` does not.
    requires_base: ClassVar[bool] = True
    # mergekit's optional base (multislerp, nuslerp): held apart when the recipe names one;
    # without one, `inputs.base` is None and the models themselves are merged.
    optional_base: ClassVar[bool] = False
    # Merges the base with ONE other model (slerp, nearswap, arcee_fusion); given several,
    # it uses their uniform mean, where mergekit refuses: the plan says so when it happens.
    pairwise: ClassVar[bool] = False
    uses_rng: ClassVar[bool] = False
    # Reads `TensorInputs.factors` (LoRA inputs' updates as factors) where they exist.
    uses_factors: ClassVar[bool] = False
    # True when the result depends on sums over a whole tensor (or long rows) whose bits
    # depend on torch's thread count: past 32,768 entries torch splits a sum into one
    # partial sum per thread. mergekit runs every tensor with its process's thread count,
    # so the engine gives such a method that count too (alone), not one thread side by side.
    thread_count_reductions: ClassVar[bool] = False
    # Entries per slice where the engine streams a tensor in slices (`elementwise`), when
    # the method's per-tensor statistics are sums over chunks of that size from the start
    # (mergekit's slerp: 2²⁰); None: the engine's own slice size.
    slice_elements: ClassVar[int | None] = None
    # True when mergekit's kernel mixes a float32 tensor into its result (arcee_fusion's
    # mask, ramplus_tl's ratio), so that float16 or bfloat16 inputs give a float32 result.
    float32_result: ClassVar[bool] = False

    @abstractmethod
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        """Return the merged tensor (any float dtype; the engine casts it for output)."""

    def result_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the merged tensor for inputs in `dtype`, written as it is when the
        recipe sets no `out_dtype` (mergekit writes its kernels' results uncast)."""
        return torch.promote_types(dtype, torch.float32) if self.float32_result else dtype

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        """True when each output entry depends only on the inputs' entries at the same
        position (and on global statistics): the engine may then stream a large tensor in
        slices. Methods that rank within a tensor, or draw random masks per tensor, are not."""
        return False

    def separable(self, params: Mapping[str, Any]) -> bool:
        """True when `merge(inputs)` is `combine(inputs, prepare(inputs))`, where `prepare`
        treats each model on its own (its tensor, the base, its parameters and generator).
        An engine merging the same models again and again (an evolution's population, one
        member replaced per candidate) may then keep each model's prepared tensor."""
        return False

    def prepare(self, inputs: TensorInputs) -> list[torch.Tensor]:
        """One prepared tensor per model of `inputs` (a separable method's per-model step,
        e.g. a trimmed task vector); never modified afterwards."""
        raise NotImplementedError(f"{self.name} is not separable")

    def combine(self, inputs: TensorInputs, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        """The merge from every model's prepared tensor; `inputs.models` may be empty (the
        models were not read)."""
        raise NotImplementedError(f"{self.name} is not separable")

    def global_stats(self, num_models: int, total_numel: int, params: Mapping[str, Any],
                     model_params: Sequence[Mapping[str, Any]]) -> GlobalStats | None:
        """Statistics over all the tensors this method serves, or None (per-tensor methods).

        `params`/`model_params` are the parameters shared by every tensor served; a method
        with global statistics requires them not to vary by tensor.
        """
        return None

    def rule_for(self, name: str, shape: Sequence[int], vocabulary: bool,
                 params: Mapping[str, Any]) -> str | None:
        """Which of the method's rules serves tensor `name` (its `shape`; `vocabulary`: an
        embedding or LM head; `params`: its resolved global parameters), for `validate` and
        `--dry-run`. None: the method has one rule for every tensor."""
        return None

    @classmethod
    def rule_docs(cls) -> tuple[str, ...]:
        """The method's rules as `pcbmerge methods` lists them; empty: one rule."""
        return ()

    @classmethod
    def param_spec(cls, name: str) -> ParamSpec | None:
        return next((p for p in cls.params if p.name == name), None)

    @classmethod
    def check_params(cls, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                     tensor: str) -> None:
        """Refuse, as a RecipeError, a combination of parameters this method cannot merge.

        Each value is already inside its ParamSpec's bounds; this is for rules across
        parameters or models, checked for every tensor (`tensor` names it).
        """
        return None


# Bounds shared by every method with the parameter. |weight|, |lambda| <= 1e6 keeps their
# products with any realistic task vector far inside float32 (~3.4e38); narrower compute
# dtypes can still overflow, which the engine's output check reports. density >= 1e-6:
# DARE rescales survivors by 1/density, and below float32's range 1/density is inf (0/0
# NaN for dropped entries); a million-th of a tensor is already a handful of entries.
WEIGHT_RANGE = Range(-1e6, 1e6)
WEIGHT = ParamSpec("weight", 1.0, "scale of this model's contribution", per_model=True,
                   bounds=WEIGHT_RANGE)
DENSITY = ParamSpec("density", 1.0, "fraction of task-vector entries kept", per_model=True,
                    bounds=Range(1e-6, 1.0))
LAMBDA = ParamSpec("lambda", 1.0, "scale of the merged task vector", bounds=WEIGHT_RANGE)
SCOPE = ("tensor", "global")
