"""`de-ancestor` on a real training run: a small CNN with batch norm trained on scikit-learn's
digits for 10 epochs, one checkpoint an epoch; the last 7 are the ancestors. Fitness is the
cross-entropy on a fresh mini-batch of the select split each generation; the result is the
member best on the whole select split; the report split is scored only at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_evolve_engine import _kill_when, _resume_matches, _start, same_tensors, search_record
from typer.testing import CliRunner

from mergekit_pcb.evolve.config import parse_fitness
from mergekit_pcb.evolve.fitness import build_evaluator
from mergekit_pcb.evolve.run import evolve
from mergekit_pcb.threads import torch_threads

CNN = '''
import os
import time

import torch


class Net(torch.nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(width)
        self.fc = torch.nn.Linear(width * 16, 10)

    def forward(self, x):
        time.sleep(float(os.environ.get("EVOLVE_TEST_SLEEP", "0")))  # for the SIGKILL test
        x = x.reshape(-1, 1, 8, 8)
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def build(width=6):
    return Net(width)
'''

EPOCHS, LAST = 10, 7


def digits_splits(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Train rows; select (400) and report (the rest) written as .npz."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    train, select, report = order[:1000], order[1000:1400], order[1400:]
    for name, idx in (("select", select), ("report", report)):
        np.savez(root / f"{name}.npz", inputs=x[idx].numpy(), labels=y[idx].numpy())
    return x[train], y[train]


@pytest.fixture(scope="module")
def training_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One back-propagation run, a checkpoint (model directory) after every epoch."""
    root = tmp_path_factory.mktemp("de-ancestor")
    (root / "digitcnn.py").write_text(CNN)
    namespace: dict[str, Any] = {}
    exec(CNN, namespace)
    x, y = digits_splits(root)
    torch.manual_seed(0)
    net = namespace["build"]()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for epoch in range(1, EPOCHS + 1):
        net.train()
        perm = torch.randperm(len(y), generator=g)
        with torch_threads(1):  # a tiny network: more threads only contend
            for s in range(0, len(y), 32):
                idx = perm[s:s + 32]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        out = root / "run" / f"epoch-{epoch}"
        out.mkdir(parents=True)
        save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
                  str(out / "model.safetensors"))
    return root


FITNESS = {"type": "torch", "arch": "digitcnn:build", "select": "select.npz",
           "report": "report.npz", "metric": "loss", "batch_size": 512}


def recipe(root: Path, name: str, **params: Any) -> Path:
    data = {
        "merge_method": "de-ancestor",
        "ancestors": {"glob": str(root / "run" / "epoch-*"), "last": LAST},
        "parameters": {"generations": 5, "batch_size": 128, "adaptation": "sade", "F": 0.1,
                       "CR": 0.1, **params},
        "fitness": FITNESS,
        "seed": 0,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_de_ancestor_beats_every_ancestor_on_select(training_run: Path,
                                                    tmp_path: Path) -> None:
    from mergekit_pcb.cli import app

    root = training_run
    out = tmp_path / "evolved"
    res = CliRunner().invoke(app, ["evolve", str(recipe(root, "main")), "-o", str(out),
                                   "--trust-code"])
    assert res.exit_code == 0, res.output
    for name in ("model.safetensors", "evolution.json", "fitness.png", "README.md"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "evolution.json").read_text())
    rows = doc["scores"]
    # every ancestor in natural order (epoch-4 ... epoch-10), their average, the result
    assert [r["label"] for r in rows] == [f"input epoch-{e}" for e in
                                          range(EPOCHS - LAST + 1, EPOCHS + 1)] + \
        ["uniform average (linear)", "result (de-ancestor)"]
    ancestors, average, result = rows[:LAST], rows[LAST], rows[-1]
    assert result["select"] <= min(r["select"] for r in ancestors)
    # the result is the member best on the whole select data
    assert result["select"] == min(doc["final"]["select"])
    assert doc["adaptation"] == "sade" and doc["batch_size"] == 128
    assert sum(h["accepted"] for h in doc["history"][1:]) > 0
    assert doc["final"]["search_state"]["memory"] != [0.1] * 5  # CR's memory learned
    # batch-norm running statistics evolve with the weights
    members = [load_file(str(out.parent / "evolved.run" / "members" / m))
               for m in doc["final"]["members"] if m.startswith("g")]
    initial = [load_file(str(p / "model.safetensors"))
               for p in sorted((root / "run").iterdir())]
    assert members and any(not any(torch.equal(m["bn.running_var"], a["bn.running_var"])
                                   for a in initial) for m in members)
    # report accuracy beside the ancestors and their average (the search saw only select)
    acc = build_evaluator(parse_fitness({**FITNESS, "metric": "accuracy"}, "test"), root)
    lines = ["| model | select loss | report loss | report accuracy |", "|---|---|---|---|"]
    for r in rows:
        if r["label"].startswith("input"):
            state = load_file(str(root / "run" / r["label"].split()[1] / "model.safetensors"))
        elif r["label"].startswith("uniform"):
            states = [load_file(str(root / "run" / a["label"].split()[1] /
                                    "model.safetensors")) for a in ancestors]
            state = {k: sum(s[k] for s in states) / len(states) if states[0][k].is_floating_point()
                     else states[0][k] for k in states[0]}
        else:
            state = load_file(str(out / "model.safetensors"))
        r["report_accuracy"] = acc.score(state, "report")
        lines.append(f"| {r['label']} | {r['select']:.4f} | {r['report']:.4f} | "
                     f"{r['report_accuracy']:.4f} |")
    print("\n".join(lines))
    assert average["report_accuracy"] > 0.5 and result["report_accuracy"] > 0.8


def test_same_bits_with_one_and_two_workers(training_run: Path, tmp_path: Path) -> None:
    path = recipe(training_run, "workers", generations=3, adaptation="none")
    a, b = tmp_path / "a", tmp_path / "b"
    evolve(path, a, trust_code=True)
    evolve(path, b, workers=2, trust_code=True)
    assert same_tensors(a, b) and search_record(a) == search_record(b)


def test_sigkill_then_resume_matches(training_run: Path, tmp_path: Path) -> None:
    path = recipe(training_run, "kill", generations=4)
    evolve(path, tmp_path / "ref", trust_code=True)
    out, state = tmp_path / "out", tmp_path / "out.run" / "state.json"
    # two workers: steps scored ahead, the members rescored on each generation's batch
    # killed early in the run: under a heavy load the run must not finish before the kill
    _kill_when(_start(path, out, "--workers", "2", sleep="0.03"), state, generation=1, step=3)
    killed = json.loads(state.read_text())
    assert killed["phase"] == "evolve" and killed["search"] is not None
    _resume_matches(path, out, tmp_path / "ref", "--workers", "2")
