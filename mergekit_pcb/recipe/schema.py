"""The merge recipe: YAML validated into typed config.

mergekit's keys mean what they mean in mergekit (`merge_method`, `base_model`,
`models[].model`, `models[].parameters`, `parameters`, `dtype`, `out_dtype`,
`tokenizer_source`), so a mergekit recipe for the methods we share runs unchanged.
Our additions: `seed`, `tensors` (routing rules) and `name`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergekit_pcb.errors import RecipeError

Scalar = Union[float, int, bool, str]  # noqa: UP007 - pydantic needs the runtime union


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ModelT = TypeVar("ModelT", bound=BaseModel)


class FilteredValue(StrictModel):
    """One item of a filtered parameter: applies to tensors whose name contains `filter`."""

    filter: str | None = None
    value: Scalar | list[Scalar]


# A parameter: a scalar, a gradient (list of numbers interpolated over the layers), or a
# list of {filter, value} items matched on tensor names (first match wins).
ParameterValue = Union[Scalar, list[FilteredValue], list[Scalar]]  # noqa: UP007


class ModelEntry(StrictModel):
    model: str
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


DTypeName = Literal["float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"]


class TensorRule(StrictModel):
    """Route the tensors whose names contain `filter` elsewhere.

    Exactly one of: `take` (copy the tensor from that model; `base` means the base model)
    or `method` (merge those tensors with another method and its own `parameters`).
    """

    filter: str
    take: str | None = None
    method: str | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_action(self) -> TensorRule:
        if (self.take is None) == (self.method is None):
            raise ValueError("a tensors rule needs exactly one of 'take' or 'method'")
        if self.take is not None and self.parameters:
            raise ValueError("'parameters' only goes with 'method', not with 'take'")
        return self


class MergeRecipe(StrictModel):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None
    seed: int | None = None
    tensors: list[TensorRule] = Field(default_factory=list)
    name: str | None = None

    def model_refs(self) -> list[str]:
        """Every model the recipe reads, base first, without repeats."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models]
        refs += [r.take for r in self.tensors if r.take and r.take != "base"]
        return list(dict.fromkeys(refs))


def format_loc(loc: tuple[int | str, ...]) -> str:
    """('models', 1, 'parameters', 'weight') -> 'models[1].parameters.weight'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "list[", "union[", "literal[")) or "[" in part:
            continue  # pydantic's names for union branches, not keys of the file
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


NOT_A_MAPPING = "a recipe is a YAML mapping of keys to values"


def validate_mapping(model: type[ModelT], data: Any, source: str,
                     not_a_mapping: str = NOT_A_MAPPING) -> ModelT:
    """`data` as a `model`, or a RecipeError of one line naming `source` and the key at fault."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {not_a_mapping}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {first_error(e)}") from None


def parse_recipe(data: Any, source: str) -> MergeRecipe:
    return validate_mapping(MergeRecipe, data, source)


def first_error(e: ValidationError) -> str:
    """One line naming the recipe key at fault (the most specific of pydantic's errors)."""
    errors = e.errors()
    # Prefer the most specific location: unions report one error per branch.
    err = max(errors, key=lambda x: len([p for p in x["loc"] if not _is_branch(p)]))
    where = format_loc(tuple(err["loc"]))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{where}'"
    if kind == "missing":
        return f"missing required key '{where}'"
    return f"'{where}': {err['msg']}"


def _is_branch(part: int | str) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def read_yaml(p: Path, what: str = "recipe") -> Any:
    try:
        text = p.read_text()
    except OSError as e:
        raise RecipeError(f"cannot read {what} {p}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None


def read_merge_method(path: str | Path) -> str | None:
    """The recipe's `merge_method`, read before choosing which schema validates it."""
    data = read_yaml(Path(path))
    method = data.get("merge_method") if isinstance(data, dict) else None
    return method if isinstance(method, str) else None


def load_recipe(path: str | Path) -> MergeRecipe:
    p = Path(path)
    return parse_recipe(read_yaml(p), str(p))
