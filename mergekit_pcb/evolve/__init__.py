"""Evolutionary merging: a population of checkpoints mutated, crossed over and selected by a
fitness measured on the user's data (`evolver`), resumable and parallel."""

from mergekit_pcb.evolve.cli import EVOLUTION_METHODS, register, run_evolution_recipe

__all__ = ["EVOLUTION_METHODS", "register", "run_evolution_recipe"]
