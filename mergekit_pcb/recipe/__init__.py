"""Recipes: the YAML schema and the evaluation of parameters per tensor."""

from mergekit_pcb.recipe.schema import MergeRecipe, load_recipe, parse_recipe

__all__ = ["MergeRecipe", "load_recipe", "parse_recipe"]
