"""Quick-start demo for ``pcbmerge``: train tiny digit classifiers, merge them, compare.

The demo is fully offline and runs in well under a minute on two CPU cores:

1. Four tasks are derived from scikit-learn's bundled 8x8 ``load_digits`` images:
   ``orig`` (plain), ``flip`` (mirrored left-right), ``transpose`` (mirrored along the
   diagonal) and ``rot90`` (rotated by 90 degrees). They share the 64-pixel input space
   and the ten digit classes; every task uses the same 60/20/20 train/val/test split.
2. A small MLP (64 -> 256 -> BatchNorm -> 256 -> 10) is pre-trained briefly on a small
   mix of all tasks (the "base"), then a copy is fine-tuned on each task.
3. Every model is saved as ``<workdir>/checkpoints/<name>/model.safetensors``.
4. The checkpoints are merged with the example recipes in ``recipes/*.yaml`` by calling
   ``python -m mergekit_pcb run RECIPE -o OUT --force --quiet``.
5. Each merged model is loaded back and evaluated on every task's test split.

Usage::

    python scripts/demo.py                      # writes ./pcbmerge-demo
    python scripts/demo.py --workdir /tmp/demo --seed 1

The recipes refer to the checkpoints as ``pcbmerge-demo/checkpoints/<name>`` relative to
the current directory; with another ``--workdir`` the demo writes rewritten copies of the
recipes into ``<workdir>/recipes``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

TASKS: tuple[str, ...] = ("orig", "flip", "transpose", "rot90")
METHODS: tuple[str, ...] = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "pcb",
)
REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO_ROOT / "recipes"
DEFAULT_WORKDIR = Path("pcbmerge-demo")
RECIPE_PATH_PREFIX = "pcbmerge-demo/checkpoints/"

# Training hyper-parameters (chosen on the validation splits).
HIDDEN = 256
BATCH_SIZE = 64
PRETRAIN_EPOCHS = 5
PRETRAIN_FRACTION = 0.1
PRETRAIN_LR = 1e-3
FINETUNE_EPOCHS = 10
FINETUNE_LR = 1e-4


@dataclass(frozen=True)
class Split:
    """Inputs (float32, scaled to [0, 1]) and integer labels of one data split."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class TaskData:
    """Train/validation/test splits of one task."""

    train: Split
    val: Split
    test: Split


# --------------------------------------------------------------------------- data


def transform(images: np.ndarray, task: str) -> np.ndarray:
    """Apply the task's pixel transformation to ``(n, 8, 8)`` images with values 0..16."""
    if task == "orig":
        return images
    if task == "flip":
        return images[:, :, ::-1]
    if task == "transpose":
        return images.transpose(0, 2, 1)
    if task == "rot90":
        return np.rot90(images, k=1, axes=(1, 2))
    raise ValueError(f"unknown task {task!r}")


def split_indices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it 60/20/20 into train/val/test."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(0.6 * n), int(0.2 * n)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def make_tasks(seed: int) -> dict[str, TaskData]:
    """Build every task from ``load_digits``; all tasks share one image split."""
    from sklearn.datasets import load_digits  # imported here: the tests need no sklearn

    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, val_idx, test_idx = split_indices(len(images), seed)
    tasks: dict[str, TaskData] = {}
    for task in TASKS:
        flat = np.ascontiguousarray(transform(images, task)).reshape(len(images), -1)
        x = torch.as_tensor(flat / 16.0, dtype=torch.float32)

        def pick(idx: np.ndarray, x: torch.Tensor = x) -> Split:
            index = torch.as_tensor(idx)
            return Split(x[index], labels[index])

        tasks[task] = TaskData(pick(train_idx), pick(val_idx), pick(test_idx))
    return tasks


def pretraining_mix(tasks: dict[str, TaskData], seed: int) -> Split:
    """A small pre-training set: a random ``PRETRAIN_FRACTION`` of every task's train split."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for data in tasks.values():
        n = len(data.train.y)
        keep = torch.randperm(n, generator=gen)[: int(PRETRAIN_FRACTION * n)]
        xs.append(data.train.x[keep])
        ys.append(data.train.y[keep])
    return Split(torch.cat(xs), torch.cat(ys))


# -------------------------------------------------------------------------- model


class MLP(nn.Module):
    """64 -> hidden -> BatchNorm -> ReLU -> hidden -> ReLU -> 10 digit classifier."""

    def __init__(self, hidden: int | None = None) -> None:
        super().__init__()
        hidden = HIDDEN if hidden is None else hidden
        self.fc1 = nn.Linear(64, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.fc2(x))
        return self.head(x)


def build_model(seed: int | None = None, hidden: int | None = None) -> MLP:
    """Create a freshly initialised :class:`MLP` (deterministic if ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    return MLP(hidden)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def train(model: nn.Module, data: Split, *, epochs: int, lr: float, seed: int) -> nn.Module:
    """Train ``model`` in place with Adam and mini-batches shuffled by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    n = len(data.y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            if len(batch) < 2:  # BatchNorm needs more than one sample
                continue
            optimizer.zero_grad()
            loss_fn(model(data.x[batch]), data.y[batch]).backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``split``."""
    model.eval()
    return (model(split.x).argmax(dim=1) == split.y).float().mean().item()


def clone_model(model: MLP) -> MLP:
    """Deep copy of ``model`` (same architecture, copied weights and buffers)."""
    copy = MLP(model.fc1.out_features)
    copy.load_state_dict(model.state_dict())
    return copy


# -------------------------------------------------------------------- checkpoints


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """Save ``model``'s state dict as ``path/model.safetensors``."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a (possibly sharded) safetensors checkpoint directory into one state dict."""
    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(path / shard)))
        return state
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors files in {path}")
    state = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    return state


def load_model(path: Path) -> MLP:
    """Load a checkpoint directory into an :class:`MLP`, casting to the model's dtypes."""
    state = load_state(path)
    model = MLP(hidden=state["fc1.weight"].shape[0])
    reference = model.state_dict()
    model.load_state_dict({k: state[k].to(reference[k].dtype) for k in reference})
    return model.eval()


# ------------------------------------------------------------------------ merging


def mergekit_cmd(*args: str) -> list[str]:
    """Command line that runs the ``mergekit_pcb`` CLI with this interpreter."""
    return [sys.executable, "-m", "mergekit_pcb", *args]


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses; makes the repository's package importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only add start-up cost
    return env


def available_methods() -> set[str]:
    """Method names listed by ``pcbmerge methods`` (empty if the CLI is unavailable)."""
    try:
        result = subprocess.run(
            mergekit_cmd("methods", "--json"),
            capture_output=True,
            text=True,
            env=cli_env(),
            check=False,
        )
    except OSError:
        return set()
    if result.returncode != 0:
        return set()
    try:
        return set(json.loads(result.stdout))
    except ValueError:  # not JSON: fall back to the words of the plain listing
        return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", result.stdout))


def recipe_file(method: str) -> Path | None:
    """The example recipe for ``method`` (``recipes/<method>.yaml`` or ``recipes/pcb*.yaml``)."""
    exact = RECIPE_DIR / f"{method}.yaml"
    if exact.is_file():
        return exact
    if method == "pcb":
        matches = sorted(RECIPE_DIR.glob("pcb*.yaml"))
        return matches[0] if matches else None
    return None


def rewrite_paths(node: Any, checkpoints: Path) -> Any:
    """Recursively replace ``pcbmerge-demo/checkpoints/<name>`` strings with real paths."""
    if isinstance(node, dict):
        return {key: rewrite_paths(value, checkpoints) for key, value in node.items()}
    if isinstance(node, list):
        return [rewrite_paths(value, checkpoints) for value in node]
    if isinstance(node, str) and node.startswith(RECIPE_PATH_PREFIX):
        return str(checkpoints / node[len(RECIPE_PATH_PREFIX) :])
    return node


def recipe_for_workdir(recipe: Path, workdir: Path) -> Path:
    """Use ``recipe`` as is for the default workdir, else write a path-rewritten copy."""
    if workdir.resolve() == (Path.cwd() / DEFAULT_WORKDIR).resolve():
        return recipe
    config = rewrite_paths(yaml.safe_load(recipe.read_text()), (workdir / "checkpoints").resolve())
    target = workdir / "recipes" / recipe.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def run_merge(recipe: Path, out: Path) -> None:
    """Run ``pcbmerge run RECIPE -o OUT --force --quiet``; raise with its output on failure."""
    cmd = mergekit_cmd("run", str(recipe), "-o", str(out), "--force", "--quiet")
    result = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


# ----------------------------------------------------------------------- reporting


def evaluate(model: nn.Module, tasks: dict[str, TaskData], split: str = "test") -> list[float]:
    """Accuracy on every task's ``split`` (``test`` or ``val``) followed by their average."""
    scores = [accuracy(model, getattr(data, split)) for data in tasks.values()]
    return [*scores, sum(scores) / len(scores)]


def print_table(rows: dict[str, list[float]], tasks: list[str], split: str = "test") -> None:
    """Print accuracies (percent) with rich if installed, else as plain text."""
    headers = ["model", *tasks, "avg"]
    cells = {name: [f"{100 * v:.1f}" for v in values] for name, values in rows.items()}
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"{split} accuracy (%) per task")
        width = max(len(name) for name in rows) + 2
        print("".join([headers[0].ljust(width), *(h.rjust(10) for h in headers[1:])]))
        for name, values in cells.items():
            print("".join([name.ljust(width), *(v.rjust(10) for v in values)]))
        return
    table = Table(title=f"{split} accuracy (%) per task")
    table.add_column(headers[0])
    for header in headers[1:]:
        table.add_column(header, justify="right")
    for name, values in cells.items():
        table.add_row(name, *values)
    Console().print(table)


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for data split and training")
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="split to report; tune recipe parameters on 'val', never on 'test'",
    )
    return parser.parse_args(argv)


def train_checkpoints(tasks: dict[str, TaskData], seed: int) -> dict[str, nn.Module]:
    """Pre-train the base model on the mix, then fine-tune one copy per task."""
    base = build_model(seed)
    train(base, pretraining_mix(tasks, seed), epochs=PRETRAIN_EPOCHS, lr=PRETRAIN_LR, seed=seed)
    models: dict[str, nn.Module] = {"base": base}
    for i, (task, data) in enumerate(tasks.items(), start=1):
        models[task] = train(
            clone_model(base), data.train, epochs=FINETUNE_EPOCHS, lr=FINETUNE_LR, seed=seed + i
        )
    return models


def save_selection_data(tasks: dict[str, TaskData], directory: Path) -> None:
    """Every task's validation split as `select.npz` and test split as `report.npz`, for
    evolution recipes (recipes/evolver.yaml): the search selects on val, reports on test."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, split in (("select", "val"), ("report", "test")):
        parts = [getattr(data, split) for data in tasks.values()]
        np.savez(directory / f"{name}.npz",
                 inputs=torch.cat([p.x for p in parts]).numpy(),
                 labels=torch.cat([p.y for p in parts]).numpy())


def merge_all(workdir: Path) -> dict[str, MLP]:
    """Merge the checkpoints with every available example recipe; return merged models."""
    listed = available_methods()
    if not listed:
        print("warning: `python -m mergekit_pcb methods` failed; is mergekit_pcb installed?")
    merged: dict[str, MLP] = {}
    for method in METHODS:
        recipe = recipe_file(method)
        if recipe is None or method not in listed:
            why = "no recipe in recipes/" if recipe is None else "`pcbmerge methods` lacks it"
            print(f"skipping {method}: {why}")
            continue
        out = workdir / "merged" / method
        run_merge(recipe_for_workdir(recipe, workdir), out)
        merged[f"merge:{method}"] = load_model(out)
    return merged


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(1)  # the model is tiny: extra threads only add overhead
    seed_everything(args.seed)

    tasks = make_tasks(args.seed)
    models = train_checkpoints(tasks, args.seed)
    for name, model in models.items():
        save_checkpoint(model, args.workdir / "checkpoints" / name)
    save_selection_data(tasks, args.workdir / "data")
    print(f"trained and saved {len(models)} checkpoints in {time.perf_counter() - start:.1f}s")

    models.update(merge_all(args.workdir))
    rows = {name: evaluate(model, tasks, args.split) for name, model in models.items()}
    print_table(rows, list(tasks), args.split)
    print(f"total wall time: {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
