"""The coefficient-search recipe: schema (pydantic, extra keys forbidden), its checks, the
search space it declares, and the plain merge recipe of any point in that space."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from mergekit_pcb.errors import RecipeError, unknown_method, warn
from mergekit_pcb.evolve.config import FitnessSpec, InnerMerge, parse_fitness
from mergekit_pcb.methods import REGISTRY
from mergekit_pcb.methods.base import MergeMethod, ParamSpec
from mergekit_pcb.methods.postprocess import STEP_PARAMS
from mergekit_pcb.recipe.params import check_parameter_keys
from mergekit_pcb.recipe.schema import (
    AdapterModels,
    DTypeName,
    MergeRecipe,
    ModelEntry,
    ModelRef,
    PostStep,
    StrictModel,
    parse_recipe,
    validate_mapping,
)

METHOD = "coefficient-search"
OPTIMIZERS = ("NGOpt", "CMA", "DE", "TwoPointsDE", "PSO", "RandomSearch")
# Parameters whose values enter a merge only through a weighted sum of parts that do not
# depend on them (see fastpath): searching only these costs one weighted sum per tensor.
COEFFICIENTS = frozenset({"weight", "lambda"})
MAX_GRID_POINTS = 1000
MAX_VARIABLES = 10_000


class SearchParameters(StrictModel):
    """How the search runs (`parameters:` of the recipe)."""

    optimizer: Literal["NGOpt", "CMA", "DE", "TwoPointsDE", "PSO", "RandomSearch"] = "NGOpt"
    budget: int = Field(100, ge=1, le=100_000)
    # per-model parameters get one variable per model and per group of layers: a gradient
    # of `layer_groups` points over the depth, as `pcbmerge run` reads one
    layer_groups: int = Field(1, ge=1, le=64)
    # points scored besides the search, for the closing table (each a list of values;
    # per-model parameters take one value for every model); the product of the lists
    grid: dict[str, list[float]] = Field(default_factory=dict)
    # with a guard (fitness.guard or guard_fraction): stop after this many new bests on
    # select that do not raise the best guard score
    patience: int | None = Field(None, ge=1)


class CoefficientSearchRecipe(AdapterModels):
    merge_method: Literal["coefficient-search"]
    base_model: ModelRef | None = None
    models: list[ModelEntry] = Field(default_factory=list)  # inner merge's per-model values
    merge: InnerMerge
    # parameter -> [low, high]; null: the parameter's own search range (ParamSpec.search_range)
    search: dict[str, tuple[float, float] | None]
    parameters: SearchParameters = Field(default_factory=SearchParameters)
    fitness: FitnessSpec
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: ModelRef | None = None
    seed: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class Variable:
    """One searched number: `param` of model `member` (None: a global parameter), point
    `group` of its gradient over the layers (None: one value)."""

    label: str
    param: str
    member: int | None
    group: int | None
    low: float
    high: float
    default: float


@dataclass(frozen=True)
class SearchSpace:
    recipe: CoefficientSearchRecipe
    method: type[MergeMethod]
    variables: tuple[Variable, ...]
    members: tuple[int, ...]  # positions in `models` of the models the inner merge combines
    # parameter -> (low, high) searched: the recipe's bounds, or the parameter's own range
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def fast(self) -> bool:
        """True when only coefficients are searched (one weighted sum per candidate) and no
        post-processing step follows the merge (the fast path has none)."""
        return {v.param for v in self.variables} <= COEFFICIENTS \
            and not self.recipe.merge.postprocess

    def defaults(self) -> list[float]:
        return [v.default for v in self.variables]

    def bounds(self) -> tuple[list[float], list[float]]:
        return [v.low for v in self.variables], [v.high for v in self.variables]

    def point(self, x: list[float]) -> dict[str, float]:
        return {v.label: float(value) for v, value in zip(self.variables, x, strict=True)}

    def grid_points(self) -> list[list[float]]:
        """The grid's points: each grid parameter set (for every model, if per-model) to one
        of its values, everything else at the recipe's value."""
        grid = self.recipe.parameters.grid
        names = list(grid)
        points = []
        for combo in product(*(grid[n] for n in names)):
            values = dict(zip(names, combo, strict=True))
            points.append([values.get(v.param, v.default) for v in self.variables])
        return points

    def merge_data(self, x: list[float] | None, *, absolute: bool = False) -> dict[str, Any]:
        """The plain merge recipe (as YAML data) of point `x` (None: the recipe's values).

        `absolute` writes local model paths absolute, so the recipe runs from any folder.
        """
        r = self.recipe
        ref = _absolute if absolute else (lambda s: s)
        models = [{"model": ref(m.model), "parameters": dict(m.parameters)} for m in r.models]
        params = dict(r.merge.parameters)
        post = [s.model_dump(exclude_none=True) for s in r.merge.postprocess]
        if x is not None:
            groups: dict[tuple[str, int], list[float]] = {}
            for v, value in zip(self.variables, x, strict=True):
                if v.param in STEP_PARAMS:  # a post-processing step's number: kind.key
                    kind, key = v.param.split(".")
                    next(s for s in post if kind in s)[kind][key] = float(value)
                elif v.member is None:
                    params[v.param] = float(value)
                elif v.group is None:
                    models[self.members[v.member]]["parameters"][v.param] = float(value)
                else:
                    groups.setdefault((v.param, v.member), []).append(float(value))
            for (param, member), values in groups.items():
                models[self.members[member]]["parameters"][param] = values
        data: dict[str, Any] = {"merge_method": r.merge.merge_method}
        if r.base_model is not None:
            data["base_model"] = ref(r.base_model)
        data["models"] = [{"model": m["model"], **({"parameters": m["parameters"]}
                                                   if m["parameters"] else {})} for m in models]
        if params:
            data["parameters"] = params
        if post:
            data["postprocess"] = post
        if r.merge.tensors:
            data["tensors"] = [
                {k: (ref(v) if k == "take" and v != "base" else v)
                 for k, v in t.model_dump(exclude_none=True).items()
                 if not (k == "parameters" and not v)}
                for t in r.merge.tensors]
        for key in ("dtype", "out_dtype", "name"):
            if getattr(r, key) is not None:
                data[key] = getattr(r, key)
        if r.tokenizer_source is not None:
            data["tokenizer_source"] = (r.tokenizer_source if r.tokenizer_source in
                                        ("base", "union") else ref(r.tokenizer_source))
        return data

    def merge_recipe(self, x: list[float] | None, seed: int) -> MergeRecipe:
        return parse_recipe({**self.merge_data(x), "seed": seed}, "candidate")


def _absolute(ref: str) -> str:
    """A local path made absolute; a hub id as it is."""
    p = Path(ref).expanduser()
    try:
        return str(p.resolve()) if p.exists() else ref
    except OSError:
        return ref


def recipe_text(data: dict[str, Any], header: str) -> str:
    """YAML of a merge recipe; floats are written as Python's repr, which reads back to the
    same double, so the recipe merges to the same bits."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)


def parse_search_recipe(data: Any, source: str) -> tuple[CoefficientSearchRecipe, SearchSpace]:
    recipe = validate_mapping(CoefficientSearchRecipe, data, source)
    parse_fitness(data["fitness"], source, "fitness")  # the evolution recipes' own checks
    if recipe.parameters.patience is not None and not recipe.fitness.guarded:
        raise RecipeError(f"{source}: parameters.patience: early stopping watches the guard; "
                          "add fitness.guard or fitness.guard_fraction")
    return recipe, search_space(recipe, source)


def search_space(recipe: CoefficientSearchRecipe, source: str) -> SearchSpace:
    merge = recipe.merge
    cls = REGISTRY.get(merge.merge_method)
    if cls is None:
        raise unknown_method(f"{source}: merge.merge_method", merge.merge_method, REGISTRY)
    try:
        ignored = check_parameter_keys(cls, merge.parameters,
                                       [m.parameters for m in recipe.models], prefix="merge.")
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    for line in ignored:
        warn(f"{source}: {line}")
    if cls.requires_base and recipe.base_model is None:
        raise RecipeError(f"{source}: base_model: required by the inner merge {cls.name} "
                          "(merge.merge_method)")
    members = tuple(i for i, m in enumerate(recipe.models)
                    if not (cls.requires_base and m.model == recipe.base_model))
    if not members:
        raise RecipeError(f"{source}: models: {cls.name} needs at least one model besides "
                          "the base")
    if not recipe.search:
        raise RecipeError(f"{source}: search: name at least one parameter to search, "
                          "e.g. weight: [0.5, 1.5]")
    groups = recipe.parameters.layer_groups
    variables: list[Variable] = []
    ranges: dict[str, tuple[float, float]] = {}
    for name, given in recipe.search.items():
        spec = _numeric_spec(cls, name, f"{source}: search.{name}")
        where = f"{source}: search.{name}"
        if given is None:
            if spec.search_range is None:
                raise RecipeError(f"{where}: {cls.name}'s {name} has no search range of its "
                                  "own; give [low, high]")
            given = (spec.search_range.low, spec.search_range.high)
        low, high = ranges[name] = given
        for end in (low, high):
            if not math.isfinite(end) or spec.bounds is None or end not in spec.bounds:
                raise RecipeError(f"{where}: bounds must lie in {spec.bounds}, got "
                                  f"[{low}, {high}]")
        if not low < high:
            raise RecipeError(f"{where}: [low, high] needs low < high, got [{low}, {high}]")
        if name in STEP_PARAMS:
            default = _step_start(merge.postprocess, name, where)
            variables.append(Variable(name, name, None, None, low, high, default))
            continue
        if not spec.per_model:
            default = _start(spec, merge.parameters.get(name), f"merge.parameters.{name}",
                             source)
            variables.append(Variable(name, name, None, None, low, high, default))
            continue
        for j, pos in enumerate(members):
            entry = recipe.models[pos]
            key = f"models[{pos}].parameters.{name}"
            setting = entry.parameters.get(name, merge.parameters.get(name))
            if name not in entry.parameters:
                key = f"merge.parameters.{name}"
            default = _start(spec, setting, key, source)
            label = f"{name}[{j}]"
            if groups == 1:
                variables.append(Variable(label, name, j, None, low, high, default))
            else:
                variables += [Variable(f"{label}@{g}", name, j, g, low, high, default)
                              for g in range(groups)]
    if len(variables) > MAX_VARIABLES:
        raise RecipeError(f"{source}: search: {len(variables)} variables; at most "
                          f"{MAX_VARIABLES}")
    if groups > 1 and not any(v.group is not None for v in variables):
        raise RecipeError(f"{source}: parameters.layer_groups: only per-model parameters "
                          "(weight, density) vary by layer; none is searched")
    grid = recipe.parameters.grid
    size = 1
    for name, values in grid.items():
        if name not in recipe.search:
            raise RecipeError(f"{source}: parameters.grid.{name}: not a searched parameter "
                              f"(searched: {', '.join(recipe.search)})")
        if not values:
            raise RecipeError(f"{source}: parameters.grid.{name}: an empty list gives no point")
        spec = _numeric_spec(cls, name, f"{source}: parameters.grid.{name}")
        for i, value in enumerate(values):
            if not math.isfinite(value) or spec.bounds is None or value not in spec.bounds:
                raise RecipeError(f"{source}: parameters.grid.{name}[{i}]: must be a number "
                                  f"in {spec.bounds}, got {value}")
        size *= len(values)
    if size > MAX_GRID_POINTS:
        raise RecipeError(f"{source}: parameters.grid: {size} points; at most "
                          f"{MAX_GRID_POINTS}")
    return SearchSpace(recipe, cls, tuple(variables), members, ranges)


def _numeric_spec(cls: type[MergeMethod], name: str, where: str) -> ParamSpec:
    spec = STEP_PARAMS.get(name) or cls.param_spec(name)
    numeric = [p.name for p in cls.params if p.kind in (float, int)]
    if spec is None or spec.kind not in (float, int):
        raise RecipeError(f"{where}: not a numeric parameter of {cls.name} (numeric: "
                          f"{', '.join(numeric) or 'none'}; of merge.postprocess's steps: "
                          f"{', '.join(STEP_PARAMS)})")
    if spec.kind is int:
        raise RecipeError(f"{where}: an integer parameter cannot be searched")
    return spec


def _step_start(steps: list[PostStep], name: str, where: str) -> float:
    """The recipe's value of a searched step number (`lines.b`): the default merge's."""
    kind, key = name.split(".")
    step = next((getattr(s, kind) for s in steps if s.kind == kind), None)
    if step is None:
        raise RecipeError(f"{where}: merge.postprocess has no {kind} step to search")
    value = getattr(step, key)
    if value is None:
        raise RecipeError(f"{where}: the {kind} step computes its {key} from the model; give "
                          f"merge.postprocess's {kind}.{key} a value to start the search from")
    return float(value)


def _start(spec: ParamSpec, setting: Any, key: str, source: str) -> float:
    """The recipe's value of a searched parameter (the default merge's), a plain number."""
    if setting is None:
        assert isinstance(spec.default, (int, float))
        return float(spec.default)
    if isinstance(setting, bool) or not isinstance(setting, (int, float)):
        raise RecipeError(f"{source}: {key}: a searched parameter's recipe value must be one "
                          f"number (it is the default merge's), got {setting!r}")
    return float(setting)


__all__ = ["COEFFICIENTS", "METHOD", "OPTIMIZERS", "CoefficientSearchRecipe", "SearchSpace",
           "Variable", "parse_search_recipe", "recipe_text", "search_space"]
