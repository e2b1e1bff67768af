"""The search kind: a population search (a strategy of `mergekit_pcb.evolve.strategies`)
run by the evolution engine, with the merge engine merging the population."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_pcb.evolve.config import EvolutionRecipe, parse_evolution_recipe
from mergekit_pcb.evolve.run import EvolveSummary, describe_plan, evolve, plan_evolution
from mergekit_pcb.evolve.strategies import STRATEGIES
from mergekit_pcb.kinds.base import RAY_FLAGS, MethodInfo, RecipeKind, RunOptions


class SearchKind(RecipeKind):
    name = "search"
    flags = frozenset({"--device", "--shard-size", "--threads", "--allow-pickle", "--workers",
                       "--resume", "--trust-code", *RAY_FLAGS})

    def methods(self) -> list[MethodInfo]:
        out = []
        for name, cls in STRATEGIES.items():
            params = []
            for field, info in cls.parameters_model.model_fields.items():
                params.append({
                    "name": field, "default": info.get_default(call_default_factory=True),
                    "type": _type_name(info.annotation), "where": "parameters",
                    "choices": list(getattr(info.annotation, "__args__", ()))
                    if "Literal" in str(info.annotation) else [],
                    "doc": info.description or ""})
            out.append(MethodInfo(name, self.name, cls.summary, params))
        return out

    def load(self, data: Any, text: str, source: Path) -> tuple[EvolutionRecipe, str]:
        return parse_evolution_recipe(data, str(source)), text

    def plan(self, recipe: tuple[EvolutionRecipe, str], source: Path, options: RunOptions
             ) -> dict[str, Any]:
        parsed, text = recipe
        return plan_evolution(parsed, text, source, output=options.output, seed=options.seed,
                              allow_pickle=options.allow_pickle)

    def describe(self, plan: dict[str, Any]) -> list[str]:
        return describe_plan(plan)

    def run(self, recipe: tuple[EvolutionRecipe, str], source: Path, options: RunOptions
            ) -> dict[str, Any]:
        summary = evolve(source, options.output, force=options.force, seed=options.seed,
                         quiet=options.quiet, workers=options.workers, resume=options.resume,
                         threads=options.threads or 1, shard_size=options.shard_size,
                         allow_pickle=options.allow_pickle, trust_code=options.trust_code,
                         loaded=recipe, ray=options.ray, device=options.device)
        return search_summary(summary, recipe[0].merge_method)


def search_summary(summary: EvolveSummary, method: str) -> dict[str, Any]:
    """What `--json` prints for a finished search (`pcbmerge run` and `pcbmerge evolve`)."""
    history = summary.history
    return {
        "kind": SearchKind.name, "output": str(summary.output), "method": method,
        "run_dir": str(summary.run_dir), "generations": len(history) - 1,
        "objective": history[-1]["objective"] if history else None,
        "scores": [{"label": r.label, "select": r.select, "report": r.report}
                   for r in summary.scores],
        "seconds": round(summary.seconds, 3),
        "fitness_seconds": round(summary.fitness_seconds, 3),
    }


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", text) if isinstance(annotation, type) else text
