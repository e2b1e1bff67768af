"""The search-strategy registry: name -> SearchStrategy class."""

from __future__ import annotations

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.evolve.strategies.base import SearchParameters, SearchStrategy, Step
from mergekit_pcb.evolve.strategies.cade import CADE
from mergekit_pcb.evolve.strategies.de_ancestor import DEAncestor
from mergekit_pcb.evolve.strategies.evolver import Evolver

STRATEGIES: dict[str, type[SearchStrategy]] = {s.name: s for s in (Evolver, DEAncestor, CADE)}


def get_strategy(name: str, where: str = "merge_method") -> type[SearchStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise RecipeError(f"{where}: '{name}' is not a search method (known: {known})") from None


__all__ = ["STRATEGIES", "SearchParameters", "SearchStrategy", "Step", "get_strategy"]
