"""Everything in the output besides the weights: config, tokenizer, model card, recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mergekit_pcb import __version__
from mergekit_pcb.errors import RecipeError
from mergekit_pcb.io.reader import iter_config_files
from mergekit_pcb.io.resolve import resolve_model_path

if TYPE_CHECKING:
    from mergekit_pcb.engine.plan import MergePlan

RECIPE_FILE = "merge_recipe.yaml"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def tokenizer_dir(plan: MergePlan) -> Path | None:
    """Where tokenizer files come from: `tokenizer_source` (a model or `base`), else the base."""
    source = plan.recipe.tokenizer_source
    if source in (None, "base"):
        return plan.config_source.root
    if source == "union":
        raise RecipeError("tokenizer_source: 'union' (vocabulary merging) is not supported; "
                          "name a model or 'base'")
    ckpt = plan.checkpoints.get(source)
    if ckpt is not None:
        return ckpt.root
    path = resolve_model_path(source)
    return path if path.is_dir() else path.parent


def write_artifacts(plan: MergePlan, out: Path) -> None:
    _copy_configs(plan, out)
    tok = tokenizer_dir(plan)
    if tok is not None:
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copyfile(tok / name, out / name)
    (out / RECIPE_FILE).write_text(plan.recipe_text)
    (out / "README.md").write_text(model_card(plan))


def _copy_configs(plan: MergePlan, out: Path) -> None:
    out_dtype = plan.recipe.out_dtype or plan.recipe.dtype
    for path in iter_config_files(plan.config_source.root):
        if path.name == "config.json" and out_dtype:
            config = json.loads(path.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = DTYPE_NAMES[out_dtype]
            (out / path.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(path, out / path.name)


def model_card(plan: MergePlan) -> str:
    recipe = plan.recipe
    front = {"library_name": "transformers", "tags": ["merge", "mergekit-pcb", recipe.merge_method]}
    if recipe.base_model:
        front["base_model"] = [recipe.base_model]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines.append(f"# {recipe.name or 'Merged model'}")
    lines.append("")
    lines.append(f"Merged with mergekit-pcb {__version__} using the **{recipe.merge_method}** "
                 f"method (seed {plan.seed}, compute dtype {str(plan.compute_dtype)[6:]}).")
    lines += ["", "## Inputs", "", "| role | model | parameters |", "|---|---|---|"]
    if recipe.base_model:
        lines.append(f"| base | `{recipe.base_model}` | |")
    for m in recipe.models:
        role = "base (listed)" if m.model == recipe.base_model else "merged"
        params = ", ".join(f"{k}: {v}" for k, v in m.parameters.items())
        lines.append(f"| {role} | `{m.model}` | {params} |")
    if recipe.parameters:
        lines += ["", "## Parameters", ""]
        lines += [f"- `{k}`: {v}" for k, v in recipe.parameters.items()]
    lines += ["", "## How each tensor was produced", "", "| rule | tensors | examples |",
              "|---|---|---|"]
    for route in plan.routes:
        examples = ", ".join(f"`{n}`" for n in route.tensor_names[:3])
        more = f" (+{len(route.tensor_names) - 3} more)" if len(route.tensor_names) > 3 else ""
        lines.append(f"| {route.label} | {len(route.tensor_names)} | {examples}{more} |")
    lines += ["", "## Recipe", "", "```yaml", plan.recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)
