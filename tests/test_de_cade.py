"""`cade` on a small spiking network: a SEW-style residual block (spike-element-wise ADD) of
spikingjelly IF neurons over 4 time steps, trained on scikit-learn's digits, then fine-tuned
from 4 seeds (different shuffles and pixel shifts); the fine-tunes are the population. The
fitness's `reset:` hook clears the neurons' membrane state before every batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_evolve_engine import _kill_when, _resume_matches, _start, same_tensors, search_record
from typer.testing import CliRunner

from mergekit_pcb.evolve.run import evolve
from mergekit_pcb.threads import torch_threads

pytest.importorskip("spikingjelly.activation_based.neuron",
                    reason="spikingjelly is not installed (pip install --no-deps spikingjelly "
                    "loguru): the cade tests need its spiking neurons")

SNN = '''
import os
import time

import torch
from spikingjelly.activation_based import functional, neuron, surrogate


def _neuron():
    return neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True)


class SEWBlock(torch.nn.Module):
    """conv-BN-IF, conv-BN-IF, then the spikes added to the block's input spikes (SEW ADD)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.sn1 = _neuron()
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.sn2 = _neuron()

    def forward(self, s):
        out = self.sn1(self.bn1(self.conv1(s)))
        return self.sn2(self.bn2(self.conv2(out))) + s


class SEWNet(torch.nn.Module):
    def __init__(self, width=6, T=4):
        super().__init__()
        self.T = T
        self.conv = torch.nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(width)
        self.sn = _neuron()
        self.block = SEWBlock(width)
        self.fc = torch.nn.Linear(width * 16, 10)

    def forward(self, x):
        time.sleep(float(os.environ.get("EVOLVE_TEST_SLEEP", "0")))  # for the SIGKILL test
        z = self.bn(self.conv(x.reshape(-1, 1, 8, 8)))  # direct encoding: the same input each step
        out = 0
        for _ in range(self.T):
            s = self.block(self.sn(z))
            out = out + self.fc(torch.nn.functional.max_pool2d(s, 2).flatten(1))
        return out / self.T


def build(width=6, T=4):
    return SEWNet(width, T)


def reset(module):
    functional.reset_net(module)
'''


def _train(net: torch.nn.Module, reset: Any, x: torch.Tensor, y: torch.Tensor, epochs: int,
           seed: int, shift: int, lr: float) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 50):
            idx = perm[s:s + 50]
            batch = x[idx].reshape(-1, 8, 8)
            if shift:  # the augmentation that tells the fine-tunes apart
                batch = torch.roll(batch, shifts=shift, dims=2)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(batch.reshape(-1, 64)), y[idx]).backward()
            opt.step()
            reset(net)


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("cade")
    (root / "snnnet.py").write_text(SNN)
    namespace: dict[str, Any] = {}
    exec(SNN, namespace)
    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(1).permutation(len(y)))
    train, select, report = order[:1000], order[1000:1400], order[1400:]
    for name, idx in (("select", select), ("report", report)):
        np.savez(root / f"{name}.npz", inputs=x[idx].numpy(), labels=y[idx].numpy())
    torch.manual_seed(0)
    base = namespace["build"]()
    with torch_threads(1):  # a tiny network: more threads only contend on a shared machine
        _train(base, namespace["reset"], x[train], y[train], epochs=3, seed=0, shift=0,
               lr=1e-2)
        start = {k: v.detach().clone() for k, v in base.state_dict().items()}
        for i, shift in enumerate((0, 1, -1, 0)):  # transfer: fine-tunes of one trained net
            net = namespace["build"]()
            net.load_state_dict(start)
            _train(net, namespace["reset"], x[train], y[train], epochs=1, seed=10 + i,
                   shift=shift, lr=3e-3)
            (root / f"ft{i}").mkdir()
            save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
                      str(root / f"ft{i}" / "model.safetensors"))
    return root


def recipe(root: Path, name: str, **params: Any) -> Path:
    data = {
        "merge_method": "cade",
        "models": [{"model": str(root / f"ft{i}")} for i in range(4)],
        # larger than the paper's 1e-5..1e-6: a 3k-parameter network changes little otherwise
        "parameters": {"generations": 6,
                       "F": {"schedule": "cosine", "max": 0.5, "min": 0.05, "period": 6},
                       "CR": {"schedule": "cosine", "max": 0.2, "min": 0.02, "period": 6},
                       **params},
        "fitness": {"type": "torch", "arch": "snnnet:build", "reset": "snnnet:reset",
                    "select": "select.npz", "report": "report.npz", "metric": "accuracy",
                    "batch_size": 400},
        "seed": 0,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cade_on_a_spiking_network(fine_tunes: Path, tmp_path: Path) -> None:
    from mergekit_pcb.cli import app

    out = tmp_path / "evolved"
    res = CliRunner().invoke(app, ["evolve", str(recipe(fine_tunes, "main")), "-o", str(out),
                                   "--trust-code"])
    print(res.output)  # the closing table: select and report accuracy of every model
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "evolution.json").read_text())
    rows = {r["label"]: r for r in doc["scores"]}
    members = [rows[f"input ft{i}"] for i in range(4)]
    result = rows["result (cade)"]
    assert "uniform average (linear)" in rows and "report accuracy" in res.output
    assert all(m["select"] > 0.5 for m in members)  # trained: far above chance
    assert result["select"] >= max(m["select"] for m in members)
    assert sum(h["accepted"] for h in doc["history"][1:]) > 0
    assert doc["jitter"] is True and doc["selection"] == "immediate"
    # cosine + jitter: generation 1 exactly at max, later ones in [cos + min, cos + max]
    assert doc["history"][1]["F"] == pytest.approx(0.5)
    assert all(h["F"] >= 0.05 + 0.05 for h in doc["history"][2:])


def test_same_bits_with_one_and_two_workers(fine_tunes: Path, tmp_path: Path) -> None:
    path = recipe(fine_tunes, "workers", generations=3)
    a, b = tmp_path / "a", tmp_path / "b"
    evolve(path, a, trust_code=True)
    evolve(path, b, workers=2, trust_code=True)
    assert same_tensors(a, b) and search_record(a) == search_record(b)
    # immediate selection: with two steps scored at once, a step whose donors include the
    # slot the step before it replaced was redone on the new member
    doc = json.loads((b / "evolution.json").read_text())
    assert doc["totals"]["speculative_discarded"] > 0


def test_sigkill_then_resume_matches(fine_tunes: Path, tmp_path: Path) -> None:
    path = recipe(fine_tunes, "kill", generations=4)
    evolve(path, tmp_path / "ref", trust_code=True)
    out, state = tmp_path / "out", tmp_path / "out.run" / "state.json"
    _kill_when(_start(path, out, sleep="0.05"), state, generation=1, step=2)
    assert json.loads(state.read_text())["phase"] == "evolve"
    _resume_matches(path, out, tmp_path / "ref")
