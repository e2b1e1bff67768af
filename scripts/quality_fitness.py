"""Fitness for the merge-quality benchmark (`scripts/bench_quality.py`).

A merged MiniLM encoder is scored with each task's own linear head on mean-pooled token
states. The data file (written by `bench_quality.py`, `select.safetensors` or
`test.safetensors`) holds, per task, the tokenized texts and labels; its metadata names the
heads and the encoder config, by paths relative to the data file.

As an evolver fitness (`type: callable`, run with `--trust-code` and `scripts/` importable):

    fitness:
      type: callable
      function: quality_fitness:score
      select: .bench/quality/data/select.safetensors
      report: .bench/quality/data/test.safetensors

`score(state, data)` returns the mean accuracy over the tasks; `evaluate(state, data)`
returns the accuracy per task. Results are cached on disk (beside the data, in
`cache/eval/`) under the SHA-256 of the state's bytes, the data file and the heads, so the
same weights are never scored twice on the same data, by the benchmark or by a search.
Set QUALITY_FITNESS_NO_CACHE=1 to score everything afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# Bump when the way a state is scored changes: it is part of every cache key.
EVAL_VERSION = "quality-eval-2"
EVAL_BATCH = 64
USE_DISK_CACHE = os.environ.get("QUALITY_FITNESS_NO_CACHE", "") == ""

_DATA: dict[str, Data] = {}
_MODELS: dict[str, torch.nn.Module] = {}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class Data:
    """One data file: per task its inputs and labels, and the task's head; `digest` (with
    the scoring's version, the file, and the heads) keys the evaluation cache. A family
    with other inputs subclasses it (`task_inputs`, `digested_files`)."""

    version = EVAL_VERSION

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["bench"])
        tensors = load_file(str(path))
        self.tasks: list[str] = meta["tasks"]
        self.config_dir = (path.parent / meta["config"]).resolve()
        self.inputs = {t: self.task_inputs(tensors, t) for t in self.tasks}
        digest = hashlib.sha256(self.version.encode())
        digest.update(file_digest(path).encode())
        for extra in self.digested_files():
            digest.update(file_digest(extra).encode())
        self.heads = load_heads(path, meta, self.tasks, digest)
        self.digest = digest.hexdigest()
        self.cache_dir = path.parent.parent / "cache" / "eval"

    def task_inputs(self, tensors: dict[str, torch.Tensor], task: str
                    ) -> tuple[torch.Tensor, ...]:
        return (tensors[f"{task}/input_ids"].long(), tensors[f"{task}/attention_mask"].long(),
                tensors[f"{task}/labels"].long())

    def digested_files(self) -> list[Path]:
        """Files besides the data and the heads whose change must miss the cache."""
        return []


def load_heads(path: Path, meta: dict[str, Any], tasks: list[str],
               digest: Any) -> dict[str, torch.nn.Linear]:
    """Each task's linear head named in a data file's metadata (paths relative to the file),
    each file's SHA-256 added to `digest` (the evaluation cache's key)."""
    heads = {}
    for t in tasks:
        head_path = (path.parent / meta["heads"][t]).resolve()
        w = load_file(str(head_path))
        head = torch.nn.Linear(w["weight"].shape[1], w["weight"].shape[0])
        head.load_state_dict(w)
        heads[t] = head.eval()
        digest.update(file_digest(head_path).encode())
    return heads


def load_data(path: str | Path, kind: type = Data, loaded: dict[str, Any] = _DATA) -> Any:
    """The data file at `path` as `kind`, read once per process (`loaded`: the cache)."""
    key = str(Path(path).resolve())
    if key not in loaded:
        loaded[key] = kind(Path(key))
    return loaded[key]


def encoder_for(config_dir: Path) -> torch.nn.Module:
    """A BertModel skeleton built once per process; states are loaded into it."""
    key = str(config_dir)
    if key not in _MODELS:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(config_dir)
        _MODELS[key] = AutoModel.from_config(config).eval()
    return _MODELS[key]


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    if missing:
        raise KeyError(f"merged state lacks {len(missing)} encoder tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))


@torch.inference_mode()
def correct(model: torch.nn.Module, head: torch.nn.Module, ids: torch.Tensor,
            mask: torch.Tensor, labels: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    """Per row, whether the prediction is right. Rows are stored sorted by length, so each
    batch is cut to its longest row."""
    out = []
    for i in range(0, len(ids), batch):
        m = mask[i:i + batch]
        width = int(m.sum(1).max())
        hidden = model(input_ids=ids[i:i + batch, :width],
                       attention_mask=m[:, :width]).last_hidden_state
        pred = head(mean_pool(hidden, m[:, :width])).argmax(-1)
        out.append(pred == labels[i:i + batch])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def _cache_path(d: Data, state: Mapping[str, torch.Tensor]) -> Path:
    key = hashlib.sha256(f"{d.digest}|{state_digest(state)}".encode()).hexdigest()
    return d.cache_dir / f"{key}.json"


def _read_cache(path: Path) -> dict[str, Any] | None:
    if USE_DISK_CACHE and path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None
    return None


def _compute(d: Data, state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = encoder_for(d.config_dir)
    load_state(model, state)
    right = {t: correct(model, d.heads[t], *d.inputs[t]) for t in d.tasks}
    return store_entry(d, path, right, time.perf_counter() - t0)


def store_entry(d: Data, path: Path, right: dict[str, torch.Tensor],
                eval_s: float) -> dict[str, Any]:
    """The evaluation record of per-task right/wrong rows, written to the disk cache
    (unless QUALITY_FITNESS_NO_CACHE) and returned."""
    entry = {"acc": {t: int(r.sum()) / max(1, len(r)) for t, r in right.items()},
             "correct": {t: "".join("1" if x else "0" for x in r.tolist())
                         for t, r in right.items()},
             "eval_s": eval_s, "data": str(d.path)}
    if USE_DISK_CACHE:
        d.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
    return entry


def evaluate_timed(state: Mapping[str, torch.Tensor],
                   data: str | Path) -> tuple[dict[str, float], float]:
    """`evaluate`, and the seconds the scoring took when it was computed (a cache hit
    returns the recorded cold time, so timings do not depend on the cache)."""
    d = load_data(data)
    path = _cache_path(d, state)
    entry = _read_cache(path)
    if entry is None or "acc" not in entry:
        entry = _compute(d, state, path)
    return entry["acc"], float(entry.get("eval_s", float("nan")))


def evaluate(state: Mapping[str, torch.Tensor], data: str | Path) -> dict[str, float]:
    """Accuracy per task of the encoder `state` (each task with its own head)."""
    return evaluate_timed(state, data)[0]


def correctness(state: Mapping[str, torch.Tensor], data: str | Path) -> dict[str, torch.Tensor]:
    """Per task, a bool per example (in the data file's order): for paired comparisons."""
    d = load_data(data)
    path = _cache_path(d, state)
    entry = _read_cache(path)
    if entry is None or "correct" not in entry:
        entry = _compute(d, state, path)
    return {t: torch.tensor([c == "1" for c in v], dtype=torch.bool)
            for t, v in entry["correct"].items()}


def score(state: Mapping[str, torch.Tensor], data: str | Path) -> float:
    """Mean accuracy over the tasks: the evolver's fitness (higher is better)."""
    acc = evaluate(state, data)
    return sum(acc.values()) / len(acc)


def load_checkpoint(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's `*.safetensors` files."""
    state: dict[str, Any] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


__all__ = ["EVAL_VERSION", "correctness", "evaluate", "evaluate_timed", "load_checkpoint",
           "mean_pool", "score", "state_digest"]
