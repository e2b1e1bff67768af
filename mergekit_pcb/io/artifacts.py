"""Everything in an output besides the weights: config, tokenizer, model card, recipe.

Every engine writes these through here, so a merge and a search leave directories that
`transformers` loads the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergekit_pcb import __version__
from mergekit_pcb.io.reader import inside_model_dir, iter_config_files
from mergekit_pcb.io.resolve import hub_repo_id, resolve_model_path
from mergekit_pcb.io.tokenizer import clean_tokenizer_config

RECIPE_FILE = "merge_recipe.yaml"
MERGEKIT_CONFIG_FILE = "mergekit_config.yml"  # the recipe under mergekit-yaml's name
CARD_FILE = "README.md"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)
# transformers keeps a tokenizer's extra named chat templates in this sub-directory.
TOKENIZER_DIRS = ("additional_chat_templates",)
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}

# Weights in any format, and their indexes: an output holds the merged weights and nothing
# else of the kind (the base's ONNX export or TF weights would pass for the merge's).
WEIGHT_SUFFIXES = frozenset({
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data",
    ".ot", ".gguf", ".tflite", ".keras", ".pb", ".npz", ".npy", ".pkl", ".pickle", ".joblib",
})
# What says how an input was made rather than what the output is: its model card, its own
# merge recipe (ours, mergekit's), the records a pcbmerge search leaves beside its weights
# (evolve/output.py, evolve/coefsearch/run.py), a trainer's state. The output gets its own.
PROVENANCE_FILES = frozenset({
    "readme.md", "readme", RECIPE_FILE, MERGEKIT_CONFIG_FILE, "evolution.json",
    "fitness.png", "search.json", "search.png", "best_recipe.yaml", "trainer_state.json",
})


def model_dir(ref: str) -> Path:
    """The directory holding model `ref` (its config and tokenizer files)."""
    path = resolve_model_path(ref)
    return path if path.is_dir() else path.parent


def is_weight_file(name: str) -> bool:
    """Weights (by extension) or a weight index (`model.safetensors.index.json`, ...)."""
    lower = name.lower()
    return Path(lower).suffix in WEIGHT_SUFFIXES or lower.endswith(".index.json")


def is_tokenizer_file(name: str) -> bool:
    """A file that belongs to a tokenizer: written, or copied, with the output's tokenizer
    (from `tokenizer_source` where the recipe names one), never with the other files."""
    return (name in TOKENIZER_FILES or name.startswith("tokenizer")
            or name.endswith((".model", ".spm", ".tiktoken")))


def _holds_weights(folder: Path) -> str | None:
    """The first weight file below `folder` (as a path relative to it), or None."""
    for here, dirs, files in os.walk(folder):  # symlinked directories are not entered
        dirs.sort()
        for name in sorted(files):
            if is_weight_file(name):
                return str((Path(here) / name).relative_to(folder))
    return None


def _copy_file(root: Path, src: Path, dst: Path, shown: str, notes: list[str]) -> None:
    """Copy `src` unless it leads outside model directory `root` or is not a regular file
    (a FIFO would block the copy; a link out could ship any file of this machine)."""
    if not inside_model_dir(root, src):
        notes.append(f"`{shown}`: a symlink leading outside the model directory")
        return
    if not src.is_file():
        notes.append(f"`{shown}`: not a regular file")
        return
    shutil.copyfile(src, dst)


def _copy_folder(root: Path, src: Path, dst: Path, shown: str, notes: list[str]) -> None:
    dst.mkdir(exist_ok=True)
    for entry in sorted(src.iterdir()):
        name = f"{shown}{entry.name}"
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            _copy_folder(root, entry, dst / entry.name, f"{name}/", notes)
        else:
            _copy_file(root, entry, dst / entry.name, name, notes)


def carry_over(root: Path, out: Path, skip: Callable[[str], bool]) -> list[str]:
    """Copy into `out` what model directory `root` holds besides weights, tokenizer files
    (`is_tokenizer_file`), its card and its records (PROVENANCE_FILES), hidden files and the
    names `skip` claims: generation and processor configs, a sentence-transformers model's
    `modules.json` and module folders (`1_Pooling/`, `2_Normalize/`), and the like.

    A sub-directory holding weights (a sentence-transformers `2_Dense/`, an `onnx/` export)
    is left out whole: this merge does not produce its weights. Returns one line per thing
    left out for a reason the user should know (the model card lists them)."""
    notes: list[str] = []
    for entry in sorted(root.iterdir()):
        name = entry.name
        if (name.startswith(".") or is_weight_file(name) or is_tokenizer_file(name)
                or name.lower() in PROVENANCE_FILES or name in TOKENIZER_DIRS or skip(name)):
            continue
        if entry.is_symlink() and entry.is_dir():
            notes.append(f"`{name}/`: a symlinked directory")
        elif entry.is_dir():
            weights = _holds_weights(entry)
            if weights is not None:
                notes.append(f"`{name}/`: it holds weights (`{name}/{weights}`) that this "
                             "merge does not produce")
            else:
                _copy_folder(root, entry, out / name, f"{name}/", notes)
        else:
            _copy_file(root, entry, out / name, name, notes)
    return notes


def copy_tokenizer_files(tokenizer_root: Path, out: Path) -> list[str]:
    """The tokenizer files of `tokenizer_root` (`is_tokenizer_file`, `TOKENIZER_DIRS`) into
    `out`, with a clean `tokenizer_config.json` (`clean_tokenizer_config`); returns what was
    left out and why (a link out of the directory, a FIFO), as `carry_over` does."""
    notes: list[str] = []
    for entry in sorted(tokenizer_root.iterdir()):
        if entry.name in TOKENIZER_DIRS and entry.is_dir() and not entry.is_symlink():
            _copy_folder(tokenizer_root, entry, out / entry.name, f"{entry.name}/", notes)
        elif is_tokenizer_file(entry.name) and not entry.is_dir():
            _copy_file(tokenizer_root, entry, out / entry.name, entry.name, notes)
    clean_tokenizer_config(out)
    return notes


def copy_model_files(out: Path, config_root: Path, tokenizer_root: Path | None,
                     out_dtype: str | None = None,
                     overrides: Mapping[str, Any] | None = None, *,
                     carry: bool = False) -> list[str]:
    """config.json / generation_config.json (with `torch_dtype` set to `out_dtype` and
    `overrides` applied, e.g. a sliced model's layer count) and the tokenizer files; with
    `carry` (`config_root` is the model's own directory, not a single weight file's folder)
    every other non-weight file of `config_root` too (`carry_over`). Returns what was left
    out and why."""
    written = set()
    for path in iter_config_files(config_root):
        written.add(path.name)
        if path.name == "config.json" and (out_dtype or overrides):
            config = json.loads(path.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in config and out_dtype:
                    config[key] = DTYPE_NAMES[out_dtype]
            config.update(overrides or {})
            (out / path.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(path, out / path.name)
    notes = carry_over(config_root, out, lambda name: name in written) if carry else []
    if tokenizer_root is not None:
        notes += copy_tokenizer_files(tokenizer_root, out)
    return notes


def model_card(*, title: str, tags: Sequence[str], base_model: str | None, summary: str,
               sections: Sequence[tuple[str, Sequence[str]]], recipe_text: str,
               library_name: str = "transformers") -> str:
    """A Hugging Face model card: front matter, a summary line, sections, the recipe.

    The front matter's `base_model` holds a hub repo id only: the Hub refuses a card whose
    `base_model` is not one, so a local base is named in the body alone."""
    front: dict[str, object] = {"library_name": library_name,
                                "tags": list(dict.fromkeys(["merge", "mergekit-pcb", *tags]))}
    repo_id = hub_repo_id(base_model) if base_model else None
    if repo_id:
        front["base_model"] = [repo_id]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"{summary.rstrip('.')} (mergekit-pcb {__version__})."]
    for heading, body in sections:
        lines += ["", f"## {heading}", "", *body]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def library_of(out: Path) -> str:
    """The library an output directory loads with: sentence-transformers where it holds a
    `modules.json`, else transformers (the Hub's `library_name`)."""
    return "sentence-transformers" if (out / "modules.json").is_file() else "transformers"


def write_card_and_recipe(out: Path, card: str, recipe_text: str) -> None:
    (out / RECIPE_FILE).write_text(recipe_text)
    (out / CARD_FILE).write_text(card)


__all__ = ["CARD_FILE", "DTYPE_NAMES", "MERGEKIT_CONFIG_FILE", "PROVENANCE_FILES", "RECIPE_FILE",
           "TOKENIZER_DIRS", "TOKENIZER_FILES", "WEIGHT_SUFFIXES", "carry_over",
           "copy_model_files", "copy_tokenizer_files", "is_tokenizer_file", "is_weight_file",
           "library_of", "model_card", "model_dir", "write_card_and_recipe"]
