"""What a merge leaves beside its weights: config and tokenizer from the right inputs, and a
model card saying how each tensor was produced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergekit_pcb.engine.plan import MergePlan
from mergekit_pcb.io.artifacts import (
    MERGEKIT_CONFIG_FILE,
    RECIPE_FILE,
    copy_model_files,
    model_card,
    write_card_and_recipe,
)
from mergekit_pcb.io.tokenizer import load_tokenizer, save_tokenizer


@dataclass(frozen=True)
class OutputFiles:
    """Which files beside the weights a merge writes (mergekit-yaml's --no-copy-tokenizer
    and --no-write-model-card turn the first two off)."""

    copy_tokenizer: bool = True  # the inputs' tokenizer files (a built one is always saved)
    model_card: bool = True  # README.md and mergekit_config.yml, as mergekit pairs them


def write_artifacts(plan: MergePlan, out: Path, files: OutputFiles | None = None) -> None:
    """Config and tokenizer: a built tokenizer (`plan.vocab`) is saved, with the config's
    `vocab_size` set to the merged embedding's rows; otherwise the files are copied, or
    saved again with the recipe's `chat_template` (as mergekit does; like mergekit, neither
    with `copy_tokenizer` off). The card, the recipe, and the recipe again as mergekit names
    it (`mergekit_config.yml`: the recipe's text, as mergekit-yaml writes it)."""
    files = files or OutputFiles()
    copied = plan.vocab is None and plan.chat_template is None and files.copy_tokenizer
    copy_model_files(out, plan.config_source.root, plan.tokenizer_root() if copied else None,
                     plan.recipe.out_dtype or plan.recipe.dtype, plan.config_overrides)
    if plan.vocab is not None:
        save_tokenizer(plan.vocab.tokenizer, out, plan.chat_template)
    elif plan.chat_template is not None and files.copy_tokenizer:
        tok = load_tokenizer(plan.tokenizer_root(), "chat_template")
        save_tokenizer(tok, out, plan.chat_template)
    if files.model_card:
        write_card_and_recipe(out, merge_card(plan), plan.recipe_text)
        (out / MERGEKIT_CONFIG_FILE).write_text(plan.recipe_text, encoding="utf-8")
    else:  # our recipe file stays: the output says how it was made
        (out / RECIPE_FILE).write_text(plan.recipe_text)


def _dtype_name(plan: MergePlan) -> str:
    if plan.compute_dtype is not None:
        return str(plan.compute_dtype).removeprefix("torch.")
    used = sorted({str(t.compute_dtype).removeprefix("torch.") for t in plan.tasks
                   if t.route.kind in ("merge", "average")})
    return ", ".join(used) + " (no `dtype` in the recipe: mergekit's methods compute in the "\
        "inputs' dtype, the others in float32)"


def merge_card(plan: MergePlan) -> str:
    recipe = plan.recipe
    inputs = ["| role | model | parameters |", "|---|---|---|"]
    if recipe.base_model:
        inputs.append(f"| base | `{recipe.base_model}` | |")
    for m in recipe.models:
        role = "base (listed)" if m.model == recipe.base_model else "merged"
        params = ", ".join(f"{k}: {v}" for k, v in m.parameters.items())
        inputs.append(f"| {role} | `{m.model}` | {params} |")
    for i, sl in enumerate(recipe.slices):
        for s in sl.sources:
            params = ", ".join(f"{k}: {v}" for k, v in s.parameters.items())
            inputs.append(f"| slices[{i}] layers {s.layer_range[0]}–{s.layer_range[1] - 1} "
                          f"| `{s.model}` | {params} |")
    sections: list[tuple[str, list[str]]] = [("Inputs", inputs)]
    if recipe.parameters:
        sections.append(("Parameters", [f"- `{k}`: {v}" for k, v in recipe.parameters.items()]))
    routes = ["| rule | tensors | examples |", "|---|---|---|"]
    for route in plan.routes:
        examples = ", ".join(f"`{n}`" for n in route.tensor_names[:3])
        more = f" (+{len(route.tensor_names) - 3} more)" if len(route.tensor_names) > 3 else ""
        routes.append(f"| {route.label} | {len(route.tensor_names)} | {examples}{more} |")
    sections.append(("How each tensor was produced", routes))
    return model_card(
        title=recipe.name or "Merged model", tags=[recipe.merge_method],
        base_model=recipe.base_model,
        summary=f"Merged using the **{recipe.merge_method}** method (seed {plan.seed}, "
                f"compute dtype {_dtype_name(plan)})",
        sections=sections, recipe_text=plan.recipe_text)
