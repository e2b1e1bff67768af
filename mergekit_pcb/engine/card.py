"""What a merge leaves beside its weights: config, tokenizer and the base's other files from
the right inputs, and a model card saying how each tensor was produced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from mergekit_pcb.engine.plan import MergePlan
from mergekit_pcb.io.artifacts import (
    MERGEKIT_CONFIG_FILE,
    RECIPE_FILE,
    copy_model_files,
    library_of,
    model_card,
    write_card_and_recipe,
)
from mergekit_pcb.io.tokenizer import load_tokenizer, save_tokenizer
from mergekit_pcb.machine import numeric_environment


@dataclass(frozen=True)
class OutputFiles:
    """Which files beside the weights a merge writes (mergekit-yaml's --no-copy-tokenizer
    and --no-write-model-card turn the first two off)."""

    copy_tokenizer: bool = True  # the inputs' tokenizer files (a built one is always saved)
    model_card: bool = True  # README.md and mergekit_config.yml, as mergekit pairs them


def write_artifacts(plan: MergePlan, out: Path, files: OutputFiles | None = None,
                    device: str = "cpu") -> list[str]:
    """Config and tokenizer: a built tokenizer (`plan.vocab`) is saved, with the config's
    `vocab_size` set to the merged embedding's rows; otherwise the files are copied, or
    saved again with the recipe's `chat_template` (as mergekit does; like mergekit, neither
    with `copy_tokenizer` off). Every other non-weight file comes from the base (or first
    model), as mergekit takes its donor's: generation and processor configs,
    sentence-transformers modules (`io.artifacts.carry_over`). Then the card, the recipe,
    and the recipe again as mergekit names it (`mergekit_config.yml`: the recipe's text, as
    mergekit-yaml writes it). Returns what was left out and why (the card lists it too)."""
    files = files or OutputFiles()
    copied = plan.vocab is None and plan.chat_template is None and files.copy_tokenizer
    source = plan.config_source
    notes = copy_model_files(out, source.root, plan.tokenizer_root() if copied else None,
                             plan.recipe.out_dtype or plan.recipe.dtype, plan.config_overrides,
                             carry=source.own_directory)
    if plan.vocab is not None:
        save_tokenizer(plan.vocab.tokenizer, out, plan.chat_template)
    elif plan.chat_template is not None and files.copy_tokenizer:
        tok = load_tokenizer(plan.tokenizer_root(), "chat_template")
        save_tokenizer(tok, out, plan.chat_template)
    if files.model_card:
        write_card_and_recipe(out, merge_card(plan, notes, library_of(out), device),
                              plan.recipe_text)
        (out / MERGEKIT_CONFIG_FILE).write_text(plan.recipe_text, encoding="utf-8")
    else:  # our recipe file stays: the output says how it was made
        (out / RECIPE_FILE).write_text(plan.recipe_text)
    return notes


def _dtype_name(plan: MergePlan) -> str:
    if plan.compute_dtype is not None:
        return str(plan.compute_dtype).removeprefix("torch.")
    used = sorted({str(t.compute_dtype).removeprefix("torch.") for t in plan.tasks
                   if t.route.kind in ("merge", "average")})
    return ", ".join(used) + " (no `dtype` in the recipe: mergekit's methods compute in the "\
        "inputs' dtype, the others in float32)"


def _plain(value: Any) -> Any:
    """`value` as YAML data: a filtered item as mergekit writes it ({filter, value}, no
    null filter)."""
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value.model_dump(exclude_none=True).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def value_text(value: Any) -> str:
    """A parameter's value in YAML flow style, as a recipe gives it: `0.5`, `[0.2, 0.8]`,
    `[{filter: mlp, value: 0.5}, {value: 0.7}]`."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False,
                          width=1 << 30).strip()
    return text.removesuffix("...").strip()  # a plain scalar's end-of-document marker


def parameter_text(params: Mapping[str, Any]) -> str:
    """Parameters for a table cell (`|` escaped): `weight: 0.5, density: [...]`."""
    return ", ".join(f"{k}: {value_text(v)}" for k, v in params.items()).replace("|", "\\|")


def _inputs_table(plan: MergePlan) -> list[str]:
    """One row per input: the base once (with its parameters where it is also listed among
    the models), then the merged models, then each slice's sources."""
    recipe = plan.recipe
    rows = ["| role | model | parameters |", "|---|---|---|"]
    listed = {m.model: m for m in recipe.models}
    if recipe.base_model:
        entry = listed.get(recipe.base_model)
        role = "base (also listed in models)" if entry is not None else "base"
        params = parameter_text(entry.parameters) if entry is not None else ""
        rows.append(f"| {role} | `{recipe.base_model}` | {params} |")
    for m in recipe.models:
        if m.model != recipe.base_model:
            rows.append(f"| merged | `{m.model}` | {parameter_text(m.parameters)} |")
    for i, sl in enumerate(recipe.slices):
        for s in sl.sources:
            rows.append(f"| slices[{i}] layers {s.layer_range[0]}–{s.layer_range[1] - 1} "
                        f"| `{s.model}` | {parameter_text(s.parameters)} |")
    return rows


def _routes_table(plan: MergePlan) -> list[str]:
    """Each output tensor once, under the rule that produced it; the vocabulary alignment
    (a step before the merge, on tensors that a rule below then produces) as a line above."""
    lines: list[str] = []
    for route in plan.routes:
        if route.kind == "align":
            names = ", ".join(f"`{n}`" for n in route.tensor_names)
            label = route.label[0].upper() + route.label[1:]
            lines += [f"{label}. Vocabulary tensors: {names} (counted below under the rule "
                      "that merges them).", ""]
    lines += ["| rule | tensors | examples |", "|---|---|---|"]
    for route in plan.routes:
        if route.kind == "align":
            continue
        examples = ", ".join(f"`{n}`" for n in route.tensor_names[:3])
        more = f" (+{len(route.tensor_names) - 3} more)" if len(route.tensor_names) > 3 else ""
        lines.append(f"| {route.label} | {len(route.tensor_names)} | {examples}{more} |")
    lines.append(f"| total | {len(plan.tasks)} | |")
    return lines


def merge_card(plan: MergePlan, left_out: Sequence[str] = (),
               library_name: str = "transformers", device: str = "cpu") -> str:
    recipe = plan.recipe
    sections: list[tuple[str, list[str]]] = [("Inputs", _inputs_table(plan))]
    if recipe.parameters:
        sections.append(("Parameters", [f"- `{k}`: {value_text(v)}"
                                        for k, v in recipe.parameters.items()]))
    sections.append(("How each tensor was produced", _routes_table(plan)))
    # An SVD's bits follow the LAPACK build and the device: say which made these.
    sections.append(("Numeric environment", [f"- {k}: {v}" for k, v in
                                             numeric_environment(device).items()]))
    if left_out:
        sections.append(("Not carried over from the inputs", [f"- {n}" for n in left_out]))
    return model_card(
        title=recipe.name or "Merged model", tags=[recipe.merge_method],
        base_model=recipe.base_model, library_name=library_name,
        summary=f"Merged using the **{recipe.merge_method}** method (seed {plan.seed}, "
                f"compute dtype {_dtype_name(plan)})",
        sections=sections, recipe_text=plan.recipe_text)
