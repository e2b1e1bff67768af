"""`de-ancestor` and `cade` on tasks larger than the tests: select and report scores of every
member, their uniform average and the result, with wall time, as Markdown tables.

    python scripts/bench_de.py                      # digits, both methods (about 1 min)
    python scripts/bench_de.py --data digits,fashion --fashion-dir DIR   # + Fashion-MNIST:
                                                    # about 8 min on 2 busy cores, 4 cached
    python scripts/bench_de.py --only de-ancestor   # or: --only cade
    python scripts/bench_de.py --rebuild            # retrain the cached checkpoints

Data sets, each one seeded permutation split into train, select (the only data a search
sees) and report (scored at the end):
- `digits`: scikit-learn's digits (8x8), 1,000 / 400 / 397 rows;
- `fashion`: Fashion-MNIST (28x28; the four `*-idx*-ubyte.gz` files in `--fashion-dir`, e.g.
  `/usr/share/datasets/fashion-mnist` from Debian's `dataset-fashion-mnist` package, or
  `dpkg-deb -x dataset-fashion-mnist_*.deb X` then `X/usr/share/datasets/fashion-mnist`):
  12,000 train and 2,000 select rows from its training set, 5,000 report rows from its test
  set. Nothing is downloaded.

1. `de-ancestor`: a two-conv CNN with batch norm, trained 20 epochs with SGD (momentum 0.9,
   constant learning rate); the last 8 epoch checkpoints (`epoch-N/model.safetensors`) are
   the ancestors. Recipe: the method's defaults (`recipes/de-ancestor.yaml`: 15
   generations, F 0.1, CR 0.1, `adaptation: sade`, mini-batches of 256 select rows,
   fitness = cross-entropy).
2. `cade`: a SEW-style spiking network (spikingjelly IF neurons, 4 time steps, one SEW ADD
   residual block, batch norm), trained with Adam, then 6 fine-tunes from different seeds and
   augmentations (random pixel shifts, input noise; each applied to half the batches).
   Fitness = accuracy on all the select rows, neurons reset by `functional.reset_net` in the
   fitness's `reset:` hook. Two runs of 20 generations: the paper's reference F/CR (cosine
   1.0e-5 -> 1.0e-6, period 40, jitter: the method's defaults) and, labelled as such, a
   larger setting (F cosine 0.5 -> 0.05, CR cosine 0.2 -> 0.02, period 20, jitter), the one
   `tests/test_de_cade.py` uses: with a few thousand entries, CR ~1e-5 crosses over well
   under one entry a trial (0.04-0.1), so a trial is almost always its parent.

Every search runs through `python -m mergekit_pcb run RECIPE -o OUT --trust-code --force
--quiet --threads 1 --workers 1`; the scores come from `OUT/evolution.json`, and this
script adds the accuracy (de-ancestor) or loss (cade) the search did not optimise, computed
with the same evaluator (`mergekit_pcb.evolve.fitness.build_evaluator`). The uniform average
here averages every floating tensor (batch-norm statistics included) and takes integer
buffers from the first member; its score is checked against the one in `evolution.json`.
Checkpoints are cached under `.bench/de/DATA/`; the tables go to stdout and
`.bench/de/tables.md`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mergekit_pcb.evolve.config import parse_fitness  # noqa: E402
from mergekit_pcb.evolve.fitness import build_evaluator  # noqa: E402

WORK = REPO / ".bench" / "de"

# ----------------------------------------------------------------------------- models

CNN = """
import torch


class Net(torch.nn.Module):
    \"\"\"conv-BN-ReLU-pool, conv-BN-ReLU-pool, linear, on side x side images.\"\"\"

    def __init__(self, width=12, side=8):
        super().__init__()
        self.side = side
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(2 * width)
        self.fc = torch.nn.Linear(2 * width * (side // 4) ** 2, 10)

    def forward(self, x):
        x = x.reshape(-1, 1, self.side, self.side)
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def build(width=12, side=8):
    return Net(width, side)
"""

SNN = """
import torch
from spikingjelly.activation_based import functional, neuron, surrogate


def _neuron():
    return neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True)


class SEWBlock(torch.nn.Module):
    \"\"\"conv-BN-IF, conv-BN-IF, then the spikes added to the block's input spikes (SEW ADD).\"\"\"

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
    \"\"\"Direct encoding (the same input each step); images above 16 pixels a side are
    average-pooled by 2 first.\"\"\"

    def __init__(self, width=8, T=4, side=8):
        super().__init__()
        self.T, self.side = T, side
        self.pool_in = side > 16
        inner = side // 2 if self.pool_in else side
        self.conv = torch.nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(width)
        self.sn = _neuron()
        self.block = SEWBlock(width)
        self.fc = torch.nn.Linear(width * (inner // 2) ** 2, 10)

    def forward(self, x):
        x = x.reshape(-1, 1, self.side, self.side)
        if self.pool_in:
            x = torch.nn.functional.avg_pool2d(x, 2)
        z = self.bn(self.conv(x))
        out = 0
        for _ in range(self.T):
            s = self.block(self.sn(z))
            out = out + self.fc(torch.nn.functional.max_pool2d(s, 2).flatten(1))
        return out / self.T


def build(width=8, T=4, side=8):
    return SEWNet(width, T, side)


def reset(module):
    functional.reset_net(module)
"""

CNN_LAST = 8
# cade fine-tunes: (seed, augmentation), each augmentation applied to half the batches
FINE_TUNES = [(10, "none"), (11, "shift-x"), (12, "shift-y"), (13, "noise"), (14, "shift-xy"),
              (15, "none")]
AUG_TEXT = {"none": "none", "shift-x": "random column shift", "shift-y": "random row shift",
            "noise": "Gaussian input noise σ 0.1", "shift-xy": "random row and column shift"}

CADE_GENERATIONS = 20
CADE_SETTINGS = {
    # the method's defaults: the paper's reference setting
    "reference": {"generations": CADE_GENERATIONS},
    # larger, labelled: the setting tests/test_de_cade.py uses, period = the run's length
    "larger": {"generations": CADE_GENERATIONS,
               "F": {"schedule": "cosine", "max": 0.5, "min": 0.05, "period": CADE_GENERATIONS},
               "CR": {"schedule": "cosine", "max": 0.2, "min": 0.02,
                      "period": CADE_GENERATIONS},
               "jitter": True},
}


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    side: int
    n_train: int
    n_select: int
    n_report: int
    cnn_width: int
    cnn_epochs: int
    cnn_lr: float
    snn_width: int
    snn_base_epochs: int
    snn_ft_epochs: int
    shift: int  # pixels, for the fine-tunes' shift augmentations
    eval_batch: int


TASKS = {
    "digits": Task("digits", "scikit-learn digits (8x8)", 8, 1000, 400, 397, cnn_width=12,
                   cnn_epochs=20, cnn_lr=0.05, snn_width=8, snn_base_epochs=4,
                   snn_ft_epochs=2, shift=1, eval_batch=400),
    "fashion": Task("fashion", "Fashion-MNIST (28x28)", 28, 12000, 2000, 5000, cnn_width=8,
                    cnn_epochs=20, cnn_lr=0.02, snn_width=8, snn_base_epochs=3,
                    snn_ft_epochs=1, shift=2, eval_batch=1000),
}
FASHION_DIR: Path | None = None


# ----------------------------------------------------------------------------- data


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_arrays(task: Task) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_select, y_select, x_report, y_report), inputs in [0, 1]."""
    if task.name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.data.astype(np.float32) / 16.0)
        y = torch.as_tensor(d.target, dtype=torch.long)
        order = torch.from_numpy(np.random.default_rng(2026).permutation(len(y)))
        a, b = task.n_train, task.n_train + task.n_select
        tr, se, re = order[:a], order[a:b], order[b:b + task.n_report]
        return x[tr], y[tr], x[se], y[se], x[re], y[re]
    if FASHION_DIR is None:
        sys.exit("--data fashion needs --fashion-dir (the Fashion-MNIST *-ubyte.gz files)")
    files = {}
    for part in ("train", "t10k"):
        xs = _idx(FASHION_DIR / f"{part}-images-idx3-ubyte.gz", 16).reshape(-1, 784)
        ys = _idx(FASHION_DIR / f"{part}-labels-idx1-ubyte.gz", 8)
        files[part] = (torch.from_numpy(xs.astype(np.float32) / 255.0),
                       torch.from_numpy(ys.astype(np.int64)))
    rng = np.random.default_rng(2026)
    (xt, yt), (xr, yr) = files["train"], files["t10k"]
    order = torch.from_numpy(rng.permutation(len(yt)))
    tr, se = order[:task.n_train], order[task.n_train:task.n_train + task.n_select]
    re = torch.from_numpy(rng.permutation(len(yr))[:task.n_report])
    return xt[tr], yt[tr], xt[se], yt[se], xr[re], yr[re]


def write_splits(task: Task, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """select.npz and report.npz under root; returns the train rows."""
    x, y, xs, ys, xr, yr = load_arrays(task)
    for name, (a, b) in (("select", (xs, ys)), ("report", (xr, yr))):
        np.savez(root / f"{name}.npz", inputs=a.numpy(), labels=b.numpy())
    return x, y


def load_source(src: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(src, namespace)
    return namespace


def save_state(net: torch.nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
              str(out / "model.safetensors"))


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached(root: Path, key: str) -> bool:
    stamp = root / "built.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("key") == key


# ----------------------------------------------------------------------------- checkpoints


def build_cnn_run(task: Task, root: Path, rebuild: bool) -> tuple[list[Path], float]:
    """The last CNN_LAST epoch checkpoints of one SGD run; (dirs, seconds spent building)."""
    key = fingerprint(CNN, task, CNN_LAST, "sgd-m0.9-b32")
    first = task.cnn_epochs - CNN_LAST + 1
    dirs = [root / "run" / f"epoch-{e}" for e in range(first, task.cnn_epochs + 1)]
    if cached(root, key) and not rebuild:
        return dirs, 0.0
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "bench_de_cnn.py").write_text(CNN)
    x, y = write_splits(task, root)
    ns = load_source(CNN)
    torch.manual_seed(0)
    net = ns["build"](task.cnn_width, task.side)
    opt = torch.optim.SGD(net.parameters(), lr=task.cnn_lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for epoch in range(1, task.cnn_epochs + 1):
        net.train()
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 32):
            idx = perm[s:s + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        if epoch >= first:
            save_state(net, root / "run" / f"epoch-{epoch}")
    (root / "built.json").write_text(json.dumps({"key": key}))
    return dirs, time.perf_counter() - t0


def _augment(batch: torch.Tensor, aug: str, shift: int, g: torch.Generator) -> torch.Tensor:
    """`aug` on half the batches (a coin per batch); shifts are ±shift pixels, drawn per batch."""
    if aug == "none" or torch.rand((), generator=g) < 0.5:
        return batch
    if aug == "noise":
        return batch + 0.1 * torch.randn(batch.shape, generator=g)
    sign = lambda: shift if torch.rand((), generator=g) < 0.5 else -shift  # noqa: E731
    dy = sign() if aug in ("shift-y", "shift-xy") else 0
    dx = sign() if aug in ("shift-x", "shift-xy") else 0
    return torch.roll(batch, shifts=(dy, dx), dims=(1, 2))


def _train_snn(net: torch.nn.Module, reset: Any, task: Task, x: torch.Tensor, y: torch.Tensor,
               epochs: int, seed: int, aug: str, lr: float) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 50):
            idx = perm[s:s + 50]
            batch = _augment(x[idx].reshape(-1, task.side, task.side), aug, task.shift, g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(batch.reshape(len(idx), -1)), y[idx]).backward()
            opt.step()
            reset(net)


def build_snn_fine_tunes(task: Task, root: Path, rebuild: bool) -> tuple[list[Path], float]:
    key = fingerprint(SNN, task, FINE_TUNES, "adam1e-2/3e-3-b50-coin")
    dirs = [root / f"ft{i}" for i in range(len(FINE_TUNES))]
    if cached(root, key) and not rebuild:
        return dirs, 0.0
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "bench_de_sew.py").write_text(SNN)
    x, y = write_splits(task, root)
    ns = load_source(SNN)
    torch.manual_seed(0)
    base = ns["build"](task.snn_width, 4, task.side)
    _train_snn(base, ns["reset"], task, x, y, task.snn_base_epochs, seed=0, aug="none", lr=1e-2)
    save_state(base, root / "base")
    start = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for out, (seed, aug) in zip(dirs, FINE_TUNES, strict=True):
        torch.manual_seed(seed)
        net = ns["build"](task.snn_width, 4, task.side)
        net.load_state_dict(start)
        _train_snn(net, ns["reset"], task, x, y, task.snn_ft_epochs, seed=seed, aug=aug, lr=3e-3)
        save_state(net, out)
    (root / "built.json").write_text(json.dumps({"key": key}))
    return dirs, time.perf_counter() - t0


# ----------------------------------------------------------------------------- runs

COMMAND = ["-m", "mergekit_pcb", "run", "RECIPE", "-o", "OUT", "--trust-code", "--force",
           "--quiet", "--threads", "1", "--workers", "1"]


def run_recipe(recipe: Path, out: Path) -> tuple[dict[str, Any], float]:
    cmd = [sys.executable] + [str(recipe) if a == "RECIPE" else str(out) if a == "OUT" else a
                              for a in COMMAND]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return json.loads((out / "evolution.json").read_text()), wall


def uniform_average(dirs: list[Path]) -> dict[str, torch.Tensor]:
    states = [load_file(str(d / "model.safetensors")) for d in dirs]
    return {k: (sum(s[k] for s in states) / len(states)) if states[0][k].is_floating_point()
            else states[0][k] for k in states[0]}


def states_of_rows(doc: dict[str, Any], dirs: list[Path], out: Path
                   ) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Each row of the closing table beside the weights it scored."""
    by_name = {d.name: d for d in dirs}
    rows = []
    for r in doc["scores"]:
        if r["label"].startswith("input "):
            state = load_file(str(by_name[r["label"].split()[1]] / "model.safetensors"))
        elif r["label"].startswith("uniform average"):
            state = uniform_average(dirs)
        elif r["label"].startswith("result"):
            state = load_file(str(out / "model.safetensors"))
        else:
            raise SystemExit(f"unexpected row in evolution.json: {r['label']}")
        rows.append((r, state))
    return rows


def evaluator(fitness: dict[str, Any], root: Path, metric: str) -> Any:
    return build_evaluator(parse_fitness({**fitness, "metric": metric}, "bench_de"), root)


def short(label: str) -> str:
    if label.startswith("input "):
        return label.split()[1]
    if label.startswith("uniform average"):
        return "uniform average"
    return "**result**"


def f4(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def n_entries(path: Path) -> int:
    return sum(v.numel() for v in load_file(str(path / "model.safetensors")).values()
               if v.is_floating_point())


def lower(a: float, b: float) -> bool:
    return a < b


def higher(a: float, b: float) -> bool:
    return a > b


def verdict(table: list[dict[str, Any]], key_sel: str, sel_better: Any, key_rep: str,
            rep_better: Any, what: str) -> str:
    """One line: the result against the member best on select (the search's own metric, as a
    user would pick a member) and the member best on report (an oracle)."""
    members = [t for t in table if t["kind"] == "member"]
    result = next(t for t in table if t["kind"] == "result")
    avg = next(t for t in table if t["kind"] == "average")
    on_sel = members[0]
    for m in members[1:]:
        if sel_better(m[key_sel], on_sel[key_sel]):
            on_sel = m
    on_rep = members[0]
    for m in members[1:]:
        if rep_better(m[key_rep], on_rep[key_rep]):
            on_rep = m

    def cmp(a: float, b: float) -> str:
        return "above" if a > b else "below" if a < b else "equal to"

    return (f"Report {what}: result {result[key_rep]:.4f}, {cmp(result[key_rep], on_sel[key_rep])} "
            f"the member best on select ({on_sel['name']}, {on_sel[key_rep]:.4f}) and "
            f"{cmp(result[key_rep], on_rep[key_rep])} the member best on report "
            f"({on_rep['name']}, {on_rep[key_rep]:.4f}); uniform average {avg[key_rep]:.4f}.")


def bench_de_ancestor(task: Task, rebuild: bool) -> str:
    root = WORK / task.name / "ancestor"
    dirs, built_s = build_cnn_run(task, root, rebuild)
    fitness = {"type": "torch", "arch": "bench_de_cnn:build",
               "arch_kwargs": {"width": task.cnn_width, "side": task.side},
               "select": "select.npz", "report": "report.npz", "metric": "loss",
               "batch_size": task.eval_batch}
    params = {"generations": 15, "F": 0.1, "CR": 0.1, "adaptation": "sade", "F_sd": 0.04,
              "CR_sd": 0.05, "CR_max": 0.2, "memory": 5, "batch_size": 256}
    recipe = root / "de-ancestor.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "de-ancestor",
        "ancestors": {"glob": str(root / "run" / "epoch-*"), "last": CNN_LAST},
        "parameters": params, "fitness": fitness, "seed": 0}, sort_keys=False))
    out = root / "out"
    print(f"[{task.name}] de-ancestor: {len(dirs)} ancestors, "
          f"running {recipe.relative_to(REPO)} ...", flush=True)
    doc, wall = run_recipe(recipe, out)
    acc = evaluator(fitness, root, "accuracy")
    loss = evaluator(fitness, root, "loss")
    lines = ["| model | select loss | report loss | select accuracy | report accuracy |",
             "|---|---|---|---|---|"]
    table = []
    for r, state in states_of_rows(doc, dirs, out):
        check = loss.score(state, "select")
        if abs(check - r["select"]) > 1e-4:
            sys.exit(f"{r['label']}: select loss {check} here, {r['select']} in evolution.json")
        sa, ra = acc.score(state, "select"), acc.score(state, "report")
        kind = ("member" if r["label"].startswith("input") else
                "average" if r["label"].startswith("uniform") else "result")
        table.append({"name": short(r["label"]), "kind": kind, "sl": r["select"],
                      "rl": r["report"], "sa": sa, "ra": ra})
        lines.append(f"| {short(r['label'])} | {f4(r['select'])} | {f4(r['report'])} | "
                     f"{f4(sa)} | {f4(ra)} |")
    accepted = sum(h["accepted"] for h in doc["history"][1:])
    evaluated = sum(h["evaluated"] for h in doc["history"][1:])
    head = (f"### `de-ancestor` on {task.title}: last {CNN_LAST} of {task.cnn_epochs} epochs "
            f"of a CNN with batch norm ({n_entries(dirs[0]):,} floating entries)\n\n"
            f"Defaults (`recipes/de-ancestor.yaml`): {doc['generations']} generations, F 0.1, "
            f"CR 0.1, `adaptation: sade`, mini-batches of 256 select rows; fitness = "
            f"cross-entropy. Train / select / report = {task.n_train:,} / {task.n_select:,} / "
            f"{task.n_report:,} rows. {accepted} of {evaluated} trials kept. "
            f"Wall time: {wall:.1f} s for the whole `pcbmerge run` (start-up and closing "
            f"scores included), {doc['totals']['wall_s']:.1f} s in the generations"
            + (f"; building the checkpoints took {built_s:.1f} s" if built_s else
               "; checkpoints from the cache") + ".\n")
    tail = (verdict(table, "sl", lower, "rl", lower, "loss") + " "
            + verdict(table, "sl", lower, "ra", higher, "accuracy")
            .replace("member best on select", "member best on select loss"))
    return head + "\n" + "\n".join(lines) + "\n\n" + tail + "\n"


def bench_cade(task: Task, rebuild: bool) -> str:
    root = WORK / task.name / "cade"
    dirs, built_s = build_snn_fine_tunes(task, root, rebuild)
    fitness = {"type": "torch", "arch": "bench_de_sew:build", "reset": "bench_de_sew:reset",
               "arch_kwargs": {"width": task.snn_width, "T": 4, "side": task.side},
               "select": "select.npz", "report": "report.npz", "metric": "accuracy",
               "batch_size": task.eval_batch}
    loss = evaluator(fitness, root, "loss")
    acc = evaluator(fitness, root, "accuracy")
    blocks = []
    member_loss: dict[str, tuple[float, float]] = {}
    for name, params in CADE_SETTINGS.items():
        recipe = root / f"cade-{name}.yaml"
        recipe.write_text(yaml.safe_dump({
            "merge_method": "cade", "models": [{"model": str(d)} for d in dirs],
            "parameters": params, "fitness": fitness, "seed": 0}, sort_keys=False))
        out = root / f"out-{name}"
        print(f"[{task.name}] cade ({name}): {len(dirs)} fine-tunes, "
              f"running {recipe.relative_to(REPO)} ...", flush=True)
        doc, wall = run_recipe(recipe, out)
        lines = ["| model | select accuracy | report accuracy | select loss | report loss |",
                 "|---|---|---|---|---|"]
        table = []
        for r, state in states_of_rows(doc, dirs, out):
            if r["label"].startswith("result"):
                check = acc.score(state, "select")
                if abs(check - r["select"]) > 1e-9:
                    sys.exit(f"{r['label']}: select accuracy {check} here, {r['select']} in "
                             "evolution.json")
            if r["label"].startswith("result") or r["label"] not in member_loss:
                member_loss[r["label"]] = (loss.score(state, "select"),
                                           loss.score(state, "report"))
            sl, rl = member_loss[r["label"]]
            kind = ("member" if r["label"].startswith("input") else
                    "average" if r["label"].startswith("uniform") else "result")
            table.append({"name": short(r["label"]), "kind": kind, "sa": r["select"],
                          "ra": r["report"], "sl": sl, "rl": rl})
            lines.append(f"| {short(r['label'])} | {f4(r['select'])} | {f4(r['report'])} | "
                         f"{f4(sl)} | {f4(rl)} |")
        hist = doc["history"][1:]
        accepted = sum(h["accepted"] for h in hist)
        evaluated = sum(h["evaluated"] for h in hist)
        F = [h["F"] for h in hist]
        CR = [h["CR"] for h in hist]
        label = ("reference setting (the method's defaults: F, CR cosine 1.0e-5 → 1.0e-6, "
                 "period 40, jitter)" if name == "reference" else
                 "**larger setting** (not the paper's: F cosine 0.5 → 0.05, CR cosine "
                 f"0.2 → 0.02, period {CADE_GENERATIONS}, jitter)")
        head = (f"#### `cade` on {task.title}, {label}\n\n"
                f"{doc['generations']} generations; F drawn in [{min(F):.3g}, {max(F):.3g}], "
                f"CR in [{min(CR):.3g}, {max(CR):.3g}]; {accepted} of {evaluated} trials kept. "
                f"Wall time: {wall:.1f} s for the whole `pcbmerge run`, "
                f"{doc['totals']['wall_s']:.1f} s in the generations.\n")
        tail = verdict(table, "sa", higher, "ra", higher, "accuracy")
        blocks.append(head + "\n" + "\n".join(lines) + "\n\n" + tail + "\n")
    augs = ", ".join(f"ft{i} {AUG_TEXT[a]}" for i, (_, a) in enumerate(FINE_TUNES))
    intro = (f"### `cade` on {task.title}: {len(dirs)} fine-tunes of a SEW-style spiking "
             f"network ({n_entries(dirs[0]):,} floating entries, IF neurons, T = 4)\n\n"
             f"Base trained {task.snn_base_epochs} epochs (Adam 1e-2), then fine-tuned "
             f"{task.snn_ft_epochs} epoch(s) each (Adam 3e-3) from seeds 10–15, augmentation on "
             f"half the batches (shifts ±{task.shift} px): {augs}. Fitness = select accuracy "
             f"(all {task.n_select:,} rows each candidate), `reset: bench_de_sew:reset` "
             f"(spikingjelly `functional.reset_net`). Train / select / report = "
             f"{task.n_train:,} / {task.n_select:,} / {task.n_report:,} rows"
             + (f"; building the checkpoints took {built_s:.1f} s" if built_s else
                "; checkpoints from the cache") + ".\n")
    return intro + "\n" + "\n".join(blocks)


def main() -> None:
    global FASHION_DIR
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", help="comma-separated: digits, fashion")
    ap.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                    help="folder of Fashion-MNIST's four *-ubyte.gz files")
    ap.add_argument("--only", choices=["de-ancestor", "cade"], default=None)
    ap.add_argument("--rebuild", action="store_true", help="retrain the cached checkpoints")
    args = ap.parse_args()
    FASHION_DIR = args.fashion_dir
    names = [n.strip() for n in args.data.split(",") if n.strip()]
    for n in names:
        if n not in TASKS:
            ap.error(f"--data: unknown data set {n!r} (digits, fashion)")
    torch.set_num_threads(1)  # small networks on a shared machine: more threads only contend
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sections = []
    for n in names:
        if args.only in (None, "de-ancestor"):
            sections.append(bench_de_ancestor(TASKS[n], args.rebuild))
        if args.only in (None, "cade"):
            sections.append(bench_cade(TASKS[n], args.rebuild))
    cmd = "python scripts/bench_de.py " + " ".join(sys.argv[1:])
    text = (f"<!-- {cmd.strip()}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
            f"{time.perf_counter() - t0:.0f} s in all; each search: python "
            f"{' '.join(COMMAND)} -->\n\n" + "\n".join(sections))
    (WORK / "tables.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
