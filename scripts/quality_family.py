"""What `scripts/bench_quality.py` needs of a model family: one object per family.

A family prepares, under its own work dir (cached, resumable), everything the benchmark
merges and scores, at fixed paths:

    models/base/               the pretrained model (safetensors + config), what pcbmerge reads
    models/<task>/             one fine-tune per task, same tensor names and shapes as the base
    heads/<task>.safetensors   the task's own classifier, outside the merged model
    heads/<task>.json          {"key", "steps", "train_s", "s_per_step", "final_loss", "n_train"}
    data/select.safetensors    the validation split (what every selection reads)
    data/test.safetensors      the test split (read once per row, for the table)
    data/splits.json           {"key", "tasks": {task: {"labels", "train", "select", "test"}}}

and names a fitness module (importable from `scripts/`) with the functions of
`quality_fitness.py`: `evaluate(state, data_path) -> {task: accuracy}`,
`evaluate_timed`, `correctness(state, data_path) -> {task: bool tensor}`,
`score(state, data_path) -> float` (the searches' fitness) and `load_checkpoint(dir)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the work dir's name and the --family value
    title: str  # e.g. "all-MiniLM-L6-v2 (text encoder, 22.7M)"
    tasks: tuple[str, ...]
    task_titles: dict[str, str]
    fitness: str  # module in scripts/ (see the docstring)
    # `tensors:` rules of every merge recipe: tensors no fine-tune changes, routed to the
    # base so that whole-model statistics cover the trained tensors only.
    frozen_rules: tuple[dict[str, str], ...]
    # prepare(root, args) -> {task: training meta}; cached under root, idempotent.
    prepare: Callable[[Path, argparse.Namespace], dict[str, Any]]
    # One sentence on data and fine-tuning for the report.
    describe: Callable[[argparse.Namespace], str]
    # LiNeS's `layers:` pattern where the block names are not `layers.N.`-style
    lines_layers: str | None = None


def paths(root: Path) -> dict[str, Path]:
    return {"base": root / "models" / "base", "select": root / "data" / "select.safetensors",
            "test": root / "data" / "test.safetensors", "splits": root / "data" / "splits.json"}


def log(msg: str, prefix: str = "") -> None:
    """A progress line with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {prefix}{msg}", flush=True)


def atomic_write(path: Path, text: str) -> None:
    """`text` into `path` by a rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
