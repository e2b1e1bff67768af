"""The coefficient-search kind: a derivative-free optimizer (nevergrad) tunes an inner
merge's numbers (`weight`, `lambda`, ...) against a fitness, each candidate scored on a
merge built from parts cached once; the result is the merge engine's output of the best
recipe (`mergekit_pcb.evolve.coefsearch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_pcb.evolve.coefsearch.config import (
    METHOD,
    OPTIMIZERS,
    SearchParameters,
    parse_search_recipe,
)
from mergekit_pcb.evolve.coefsearch.run import (
    Loaded,
    describe_plan,
    plan_search,
    run_search,
)
from mergekit_pcb.kinds.base import RAY_FLAGS, MethodInfo, RecipeKind, RunOptions


class CoefficientSearchKind(RecipeKind):
    # Its own kind name: `pcbmerge evolve` takes only population searches ("search").
    name = "coefficient-search"
    flags = frozenset({"--device", "--shard-size", "--threads", "--allow-pickle", "--workers",
                       "--resume", "--trust-code", *RAY_FLAGS})

    def methods(self) -> list[MethodInfo]:
        params: list[dict[str, Any]] = []
        for field, info in SearchParameters.model_fields.items():
            params.append({"name": field, "default": info.get_default(call_default_factory=True),
                           "type": str(info.annotation).replace("typing.", ""),
                           "where": "parameters",
                           "choices": list(OPTIMIZERS) if field == "optimizer" else [],
                           "doc": _DOCS[field]})
        params.append({"name": "search", "default": None, "type": "dict[str, [low, high] | null]",
                       "where": "search", "choices": [],
                       "doc": "numeric parameters of the inner merge to search, with bounds "
                              "[low, high], or null for the parameter's own search range "
                              "(`pcbmerge methods` says it: e.g. alpha [0, 3] of tsv_m, iso_c, "
                              "iso_cts); per-model ones get one variable per model"})
        return [MethodInfo(METHOD, self.name, "search an inner merge's coefficients with an "
                           "evolution strategy (PCB + ES)", params)]

    def load(self, data: Any, text: str, source: Path) -> Loaded:
        recipe, space = parse_search_recipe(data, str(source))
        return recipe, space, text

    def plan(self, recipe: Loaded, source: Path, options: RunOptions) -> dict[str, Any]:
        return plan_search(recipe, source, output=options.output, seed=options.seed,
                           allow_pickle=options.allow_pickle, workers=options.workers or 1)

    def describe(self, plan: dict[str, Any]) -> list[str]:
        return describe_plan(plan)

    def run(self, recipe: Loaded, source: Path, options: RunOptions) -> dict[str, Any]:
        assert options.output is not None
        return run_search(recipe, source, options.output, force=options.force,
                          seed=options.seed, quiet=options.quiet, workers=options.workers,
                          resume=options.resume, threads=options.threads or 1,
                          shard_size=options.shard_size, allow_pickle=options.allow_pickle,
                          trust_code=options.trust_code, ray=options.ray,
                          device=options.device)


_DOCS = {
    "optimizer": "nevergrad optimizer",
    "budget": "candidates the optimizer proposes (the default merge and grid are extra)",
    "layer_groups": "per-model parameters: points of a gradient over the layers",
    "grid": "values per searched parameter; their product is scored for the closing table",
    "patience": "with a guard: stop after this many new bests on select without a guard gain",
}
