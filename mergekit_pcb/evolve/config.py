"""Evolution recipes: the YAML schema (pydantic, extra keys forbidden) and its checks.

An evolution recipe shares mergekit's top-level keys (`merge_method`, `base_model`,
`models`, `parameters`, `dtype`, `tokenizer_source`, `seed`, `name`) and adds `merge:`
(the inner merge, any registered method) and `fitness:` (what is measured, on which data).
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model

from mergekit_pcb.errors import RecipeError, unknown_method, warn
from mergekit_pcb.evolve.strategies import SearchStrategy, get_strategy
from mergekit_pcb.methods import REGISTRY
from mergekit_pcb.recipe.params import check_parameter_keys
from mergekit_pcb.recipe.schema import (
    AdapterModels,
    DTypeName,
    ModelEntry,
    ModelRef,
    ParameterValue,
    PostStep,
    StrictModel,
    TensorRule,
    read_yaml,
    validate_mapping,
)
from mergekit_pcb.usercode import check_plain_data

FITNESS_TYPES = ("callable", "torch", "hf-classification", "causal-lm")
# The metrics each fitness type offers; the first is the default.
METRICS: dict[str, tuple[str, ...]] = {
    "callable": ("value",),
    "torch": ("accuracy", "loss"),
    "hf-classification": ("accuracy", "macro_f1", "loss"),
    "causal-lm": ("loss", "perplexity"),
}
LOWER_IS_BETTER = {"loss", "perplexity"}


class InnerMerge(StrictModel):
    """The merge of the population: any merge method, its parameters and `tensors:` rules
    (`take: base` or another method), run by the merge engine exactly as `pcbmerge run`."""

    merge_method: str
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    tensors: list[TensorRule] = Field(default_factory=list)
    # steps on each merge's update (merged − base), as a merge recipe's `postprocess:`
    postprocess: list[PostStep] = Field(default_factory=list)


class FitnessSpec(StrictModel):
    """What a candidate is scored by; `select` is what the search sees, `report` is not.

    A guard (`guard:` data of its own, or `guard_fraction:` of the select rows split off
    once, seeded by `guard_seed`, stratified by label where there are labels) chooses the
    result among the starting points and each generation's best; trials never see it.
    """

    type: Literal["callable", "torch", "hf-classification", "causal-lm"]
    select: str | None = None
    report: str | None = None
    guard: str | None = None
    guard_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    guard_seed: int = Field(0, ge=0)
    # the result replaces the best start only if a one-sided paired test over the guard's
    # examples passes at this level (None: 0.95; kept out of the identity when unset, so
    # the run states of earlier versions resume)
    guard_level: float | None = Field(None, gt=0.5, lt=1.0)
    metric: str | None = None
    minimize: bool = False
    function: str | None = None  # callable: package.module:function
    arch: str | None = None  # torch: package.module:factory
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    reset: str | None = None  # torch: package.module:function, called before each batch
    model: str | None = None  # hf types: config/tokenizer source (default: base or first model)
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(128, ge=1)
    limit: int | None = Field(None, ge=1)  # score on the first N examples only
    text_field: str = "text"
    label_field: str = "label"
    inputs_key: str = "inputs"
    labels_key: str = "labels"

    @property
    def metric_name(self) -> str:
        return self.metric or METRICS[self.type][0]

    @property
    def guarded(self) -> bool:
        """Whether the result is chosen on a guard split."""
        return self.guard is not None or self.guard_fraction is not None

    @property
    def guard_confidence(self) -> float:
        """The level of the paired test the result must pass against the best start."""
        return 0.95 if self.guard_level is None else self.guard_level

    @property
    def per_example(self) -> bool:
        """Whether the metric is the mean of scores per example (what a paired test needs):
        torch and hf-classification with accuracy or loss."""
        return self.type in ("torch", "hf-classification") and \
            self.metric_name in ("accuracy", "loss")

    @property
    def maximize(self) -> bool:
        if self.type == "callable":
            return not self.minimize
        return self.metric_name not in LOWER_IS_BETTER


class AncestorGlob(StrictModel):
    """`ancestors: {glob: runs/epoch-*, last: 8}`: the last N matches in natural order."""

    glob: str
    last: int | None = Field(None, ge=1)


def natural_key(text: str) -> list[Any]:
    """Sort key that orders digit runs as numbers: epoch-2 before epoch-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", text) if part]


def expand_ancestors(spec: str | list[str] | AncestorGlob, where: str = "ancestors"
                     ) -> list[str]:
    """Checkpoints named by a glob or a list (entries may be globs), in natural order per
    pattern; relative patterns are read from the working directory, as models are."""
    patterns = [spec.glob] if isinstance(spec, AncestorGlob) else \
        [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern), key=natural_key)
            if not found:
                raise RecipeError(f"{where}: '{pattern}' matches no checkpoint")
            out += found
        else:
            out.append(pattern)
    if isinstance(spec, AncestorGlob) and spec.last is not None:
        out = out[-spec.last:]
    return out


class EvolutionRecipe(AdapterModels):
    merge_method: str
    base_model: ModelRef | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    # one run's checkpoints (de-ancestor): a glob, a list, or {glob, last}; instead of models
    ancestors: str | list[str] | AncestorGlob | None = None
    # validated by the strategy's own schema (`SearchStrategy.parameters_model`)
    parameters: dict[str, Any] = Field(default_factory=dict)
    merge: InnerMerge | None = None
    fitness: FitnessSpec
    dtype: DTypeName | None = None
    tokenizer_source: ModelRef | None = None
    seed: int | None = None
    name: str | None = None

    def population_refs(self) -> list[str]:
        """The input models the population starts from (the base is never a member)."""
        if self.ancestors is not None:
            return expand_ancestors(self.ancestors)
        return [m.model for m in self.models if m.model != self.base_model]


def parse_evolution_recipe(data: Any, source: str) -> EvolutionRecipe:
    recipe = validate_mapping(EvolutionRecipe, data, source)
    check_recipe(recipe, source)
    return recipe


def strategy_of(recipe: EvolutionRecipe, source: str) -> SearchStrategy:
    """The recipe's search strategy with its validated `parameters:`."""
    cls = get_strategy(recipe.merge_method, f"{source}: merge_method")
    # Validated under a `parameters` key, so that errors name `parameters.KEY`.
    wrapper = create_model(f"{cls.name}_parameters", __base__=StrictModel,
                           parameters=(cls.parameters_model, ...))
    checked = validate_mapping(wrapper, {"parameters": recipe.parameters}, source)
    return cls(checked.parameters)  # type: ignore[attr-defined]


def parse_fitness(data: Any, source: str, prefix: str = "") -> FitnessSpec:
    spec = validate_mapping(FitnessSpec, data, source, f"{prefix or 'fitness'} must be a mapping")
    check_fitness(spec, source, prefix)
    return spec


def load_evolution_recipe(path: Path) -> tuple[EvolutionRecipe, str]:
    data = read_yaml(path)
    recipe = parse_evolution_recipe(data, str(path))
    return recipe, path.read_text()


def check_recipe(recipe: EvolutionRecipe, source: str) -> None:
    strategy = strategy_of(recipe, source)
    name = recipe.merge_method
    if recipe.ancestors is not None and recipe.models:
        raise RecipeError(f"{source}: ancestors: give the population as models or as "
                          "ancestors, not both")
    try:
        refs = recipe.population_refs()
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    if len(refs) < 2:
        key = "ancestors" if recipe.ancestors is not None else "models"
        raise RecipeError(f"{source}: {key}: {name} needs at least two models besides the base")
    for i, m in enumerate(recipe.models):
        if m.parameters:
            key = next(iter(m.parameters))
            raise RecipeError(f"{source}: models[{i}].parameters.{key}: {name} members take no "
                              "parameters; put the inner merge's under merge.parameters")
    strategy.check(recipe.merge is not None, f"{source}: ")
    if strategy.params.patience is not None and not recipe.fitness.guarded:
        raise RecipeError(f"{source}: parameters.patience: early stopping watches the guard; "
                          "add fitness.guard or fitness.guard_fraction")
    if strategy.params.accept == "paired" and not recipe.fitness.per_example:
        raise RecipeError(f"{source}: parameters.accept: paired needs scores per example, which "
                          f"fitness type {recipe.fitness.type} with metric "
                          f"'{recipe.fitness.metric_name}' has not (torch or hf-classification "
                          "with accuracy or loss); use margin instead")
    strategy.check_fitness(recipe.fitness.type, f"{source}: ")
    if recipe.merge is not None:
        cls = REGISTRY.get(recipe.merge.merge_method)
        if cls is None:
            raise unknown_method(f"{source}: merge.merge_method", recipe.merge.merge_method,
                                 REGISTRY)
        try:
            ignored = check_parameter_keys(cls, recipe.merge.parameters, [], prefix="merge.")
        except RecipeError as e:
            raise RecipeError(f"{source}: {e}") from None
        for line in ignored:
            warn(f"{source}: {line}")
        if cls.requires_base and recipe.base_model is None:
            raise RecipeError(f"{source}: base_model: required by the inner merge "
                              f"{cls.name} (merge.merge_method)")
        for i, rule in enumerate(recipe.merge.tensors):
            where = f"{source}: merge.tensors[{i}]"
            if rule.take is not None and rule.take != "base":
                raise RecipeError(f"{where}.take: only 'base' (members have no names to take "
                                  "from)")
            if rule.take == "base" and recipe.base_model is None:
                raise RecipeError(f"{where}.take: 'base' but the recipe has no base_model")
            if rule.method is not None:
                sub = REGISTRY.get(rule.method)
                if sub is None:
                    raise unknown_method(f"{where}.method", rule.method, REGISTRY)
                try:
                    ignored = check_parameter_keys(sub, rule.parameters, [],
                                                   prefix=f"merge.tensors[{i}].")
                except RecipeError as e:
                    raise RecipeError(f"{source}: {e}") from None
                for line in ignored:
                    warn(f"{source}: {line}")
                if sub.requires_base and recipe.base_model is None:
                    raise RecipeError(f"{where}.method: {sub.name} needs a base_model")
    check_fitness(recipe.fitness, source, "fitness")


def check_fitness(spec: FitnessSpec, source: str, prefix: str) -> None:
    p = f"{prefix}." if prefix else ""
    metrics = METRICS[spec.type]
    if spec.type != "callable" and spec.metric is not None and spec.metric not in metrics:
        raise RecipeError(f"{source}: {p}metric: '{spec.metric}' is not a metric of type "
                          f"{spec.type} (known: {', '.join(metrics)})")
    if spec.minimize and spec.type != "callable":
        raise RecipeError(f"{source}: {p}minimize: only for type callable (the metric "
                          f"'{spec.metric_name}' knows its direction)")
    required = {"callable": "function", "torch": "arch"}.get(spec.type)
    if required and getattr(spec, required) is None:
        raise RecipeError(f"{source}: {p}{required}: required by fitness type {spec.type}")
    if spec.type != "callable" and spec.select is None:
        raise RecipeError(f"{source}: {p}select: required (the data the search selects on)")
    if spec.guard is not None and spec.guard_fraction is not None:
        raise RecipeError(f"{source}: {p}guard_fraction: give guard data (guard) or a "
                          "fraction of the select data (guard_fraction), not both")
    if spec.guard_level is not None and not spec.guarded:
        raise RecipeError(f"{source}: {p}guard_level: the level of the test against the best "
                          "start on the guard; add fitness.guard or fitness.guard_fraction")
    if spec.guard_fraction is not None and spec.type == "callable":
        raise RecipeError(f"{source}: {p}guard_fraction: a callable fitness reads its data "
                          "file itself and cannot be split; name guard data (guard) instead")
    check_plain_data(spec.arch_kwargs, f"{p}arch_kwargs")  # before any code sees them
    for key in ("function", "arch", "reset"):
        value = getattr(spec, key)
        if value is not None and (":" not in value or value.startswith(":")
                                  or value.endswith(":")):
            raise RecipeError(f"{source}: {p}{key}: '{value}' is not package.module:attribute")


@dataclass(frozen=True)
class Settings:
    """The effective run settings: recipe values with the command line's overrides."""

    pop: int
    generations: int
    seed: int
    strategy: SearchStrategy

    @property
    def merged(self) -> bool:
        return self.strategy.merged

    def identity(self) -> dict[str, Any]:
        """What a resumed run must agree on (generations may grow: the run goes on)."""
        params = self.strategy.params  # margin and accept recorded when set: older states
        margin = params.margin  # resume
        paired = {"accept": "paired", "accept_level": params.accept_level} \
            if params.accept == "paired" else {}
        return {"pop": self.pop, "seed": self.seed, **self.strategy.identity(),
                **({"margin": margin} if margin else {}), **paired}


def make_settings(recipe: EvolutionRecipe, *, pop: int | None = None,
                  generations: int | None = None, seed: int | None = None) -> Settings:
    strategy = strategy_of(recipe, "recipe")
    params = strategy.params
    n = len(recipe.population_refs())
    size = pop if pop is not None else (params.pop if params.pop is not None else n)
    where = "--pop" if pop is not None else "parameters.pop"
    if size < n:
        raise RecipeError(f"{where}: {size} is smaller than the {n} input models")
    if size < strategy.min_population():
        raise RecipeError(f"{where}: {strategy.name} with these parameters needs a population "
                          f"of at least {strategy.min_population()}")
    gens = generations if generations is not None else params.generations
    if gens < 0:
        raise RecipeError(f"--generations must be at least 0, got {gens}")
    return Settings(
        pop=size, generations=gens,
        seed=seed if seed is not None else (recipe.seed if recipe.seed is not None else 0),
        strategy=strategy,
    )


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = ["FITNESS_TYPES", "METRICS", "EvolutionRecipe", "FitnessSpec", "InnerMerge",
           "Settings", "load_evolution_recipe", "make_settings", "parse_evolution_recipe",
           "parse_fitness"]
