"""End to end on a real small task: scikit-learn's digits as three tasks (plain, mirrored,
transposed), a small MLP fine-tuned per task from a shared base, evolved with `ties` inside.

Selection sees the validation images only; the test images are the report data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

DIGIT_NET = '''
import torch


def build(hidden=48):
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))
'''

TASKS = {
    "plain": lambda im: im,
    "mirror": lambda im: im[:, :, ::-1],
    "transpose": lambda im: im.transpose(0, 2, 1),
}


def _train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
           seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()


def build_digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    (root / "digitnet.py").write_text(DIGIT_NET)
    namespace: dict[str, object] = {}
    exec(DIGIT_NET, namespace)
    build = namespace["build"]
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(0).permutation(len(images))
    train, val, test = order[:1000], order[1000:1400], order[1400:]
    data = {t: torch.from_numpy(np.ascontiguousarray(f(images)).reshape(len(images), 64))
            for t, f in TASKS.items()}
    torch.manual_seed(0)
    base = build()  # type: ignore[operator]
    # a brief pre-training on a little of every task, then one fine-tune per task
    mix = np.concatenate([train[:60]] * 1)
    _train(base, torch.cat([data[t][mix] for t in TASKS]),
           torch.cat([labels[mix]] * len(TASKS)), steps=60, seed=1)
    save = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    (root / "base").mkdir()
    save_file(save, str(root / "base" / "model.safetensors"))
    for i, t in enumerate(TASKS):
        net = build()  # type: ignore[operator]
        net.load_state_dict(save)
        _train(net, data[t][train], labels[train], steps=150, seed=10 + i)
        (root / t).mkdir()
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
                  str(root / t / "model.safetensors"))
    for name, idx in (("select", val), ("report", test)):
        np.savez(root / f"{name}.npz",
                 inputs=torch.cat([data[t][idx] for t in TASKS]).numpy(),
                 labels=torch.cat([labels[idx]] * len(TASKS)).numpy())


INNER_MERGES = {
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5, "normalize": True}},
    "ties-global": {"merge_method": "ties",
                    "parameters": {"density": 0.5, "normalize": True, "scope": "global"}},
    "pcb": {"merge_method": "pcb", "parameters": {"lambda": 1.25}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.5}},
}


@pytest.mark.parametrize("inner", list(INNER_MERGES))
def test_evolver_on_digits(tmp_path: Path, inner: str) -> None:
    """Evolver with each kind of inner merge (per-tensor, whole-model statistics, random
    masks) runs on the demo's digits models and prints its closing table."""
    from mergekit_pcb.cli import app

    root = tmp_path / "digits"
    build_digits(root)
    recipe = {
        "merge_method": "evolver",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / t)} for t in TASKS],
        "parameters": {"generations": 4 if inner == "ties" else 2, "F": 0.5, "CR": 0.5,
                       "mode": "merged", "mutation": "current-to-rand"},
        "merge": INNER_MERGES[inner],
        "fitness": {"type": "torch", "arch": "digitnet:build", "select": "select.npz",
                    "report": "report.npz", "metric": "accuracy", "batch_size": 400},
        "seed": 0,
    }
    path = root / "evolver.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "evolved"
    res = CliRunner().invoke(app, ["evolve", str(path), "-o", str(out), "--trust-code"])
    print(res.output)  # the closing table: select and report accuracy of every model
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "evolution.json").read_text())
    rows = {r["label"]: r for r in doc["scores"]}
    initial_merge = rows[f"plain merge ({INNER_MERGES[inner]['merge_method']})"]
    result = rows["result (evolver, merged)"]
    assert result["select"] >= initial_merge["select"]
    assert result["select"] == doc["history"][-1]["objective"]
    assert 0.0 <= result["report"] <= 1.0 and "report accuracy" in res.output
    # each task model is far better on its own task than chance, so the merge is a real test
    assert all(rows[f"input {t}"]["select"] > 0.3 for t in TASKS)
