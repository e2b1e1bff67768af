"""Everything in an output besides the weights: config, tokenizer, model card, recipe.

Every engine writes these through here, so a merge and a search leave directories that
`transformers` loads the same way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergekit_pcb import __version__
from mergekit_pcb.io.reader import iter_config_files
from mergekit_pcb.io.resolve import resolve_model_path

RECIPE_FILE = "merge_recipe.yaml"
MERGEKIT_CONFIG_FILE = "mergekit_config.yml"  # the recipe under mergekit-yaml's name
CARD_FILE = "README.md"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def model_dir(ref: str) -> Path:
    """The directory holding model `ref` (its config and tokenizer files)."""
    path = resolve_model_path(ref)
    return path if path.is_dir() else path.parent


def copy_model_files(out: Path, config_root: Path, tokenizer_root: Path | None,
                     out_dtype: str | None = None,
                     overrides: Mapping[str, Any] | None = None) -> None:
    """config.json / generation_config.json (with `torch_dtype` set to `out_dtype` and
    `overrides` applied, e.g. a sliced model's layer count) and the tokenizer files."""
    for path in iter_config_files(config_root):
        if path.name == "config.json" and (out_dtype or overrides):
            config = json.loads(path.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in config and out_dtype:
                    config[key] = DTYPE_NAMES[out_dtype]
            config.update(overrides or {})
            (out / path.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(path, out / path.name)
    if tokenizer_root is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_root / name).is_file():
                shutil.copyfile(tokenizer_root / name, out / name)


def model_card(*, title: str, tags: Sequence[str], base_model: str | None, summary: str,
               sections: Sequence[tuple[str, Sequence[str]]], recipe_text: str) -> str:
    """A Hugging Face model card: front matter, a summary line, sections, the recipe."""
    front: dict[str, object] = {"library_name": "transformers",
                                "tags": ["merge", "mergekit-pcb", *tags]}
    if base_model:
        front["base_model"] = [base_model]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"{summary.rstrip('.')} (mergekit-pcb {__version__})."]
    for heading, body in sections:
        lines += ["", f"## {heading}", "", *body]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def write_card_and_recipe(out: Path, card: str, recipe_text: str) -> None:
    (out / RECIPE_FILE).write_text(recipe_text)
    (out / CARD_FILE).write_text(card)


__all__ = ["CARD_FILE", "DTYPE_NAMES", "MERGEKIT_CONFIG_FILE", "RECIPE_FILE", "TOKENIZER_FILES",
           "copy_model_files", "model_card", "model_dir", "write_card_and_recipe"]
