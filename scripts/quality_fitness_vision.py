"""Fitness for the vision family of the merge-quality benchmark (`scripts/quality_vision.py`).

A merged EfficientNet-Lite0 is scored with each task's own linear head on its globally
average-pooled features. The data file (`data/select.safetensors` or `data/test.safetensors`
under the family's work dir) holds, per task, uint8 images (N, 3, H, W) and labels; its
metadata names the heads and the network config (`config.json`: the architecture and its
overrides) by paths relative to the data file. Same API as `quality_fitness.py`:

    fitness:
      type: callable
      function: quality_fitness_vision:score
      select: .bench/quality/effnet/data/select.safetensors
      report: .bench/quality/effnet/data/test.safetensors

Results are cached on disk (`cache/eval/` beside `data/`) under the SHA-256 of the state,
the data file and the heads, through `quality_fitness`'s cache helpers;
QUALITY_FITNESS_NO_CACHE=1 scores everything afresh.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SCRIPTS = str(Path(__file__).resolve().parent)
if SCRIPTS not in sys.path:  # importable as a fitness module from any working directory
    sys.path.insert(0, SCRIPTS)
import quality_fitness as qf  # noqa: E402
from quality_fitness import load_checkpoint, state_digest  # noqa: E402

# Bump when the way a state is scored changes: it is part of every cache key.
EVAL_VERSION = "vision-eval-1"
EVAL_BATCH = 128
# ImageNet statistics the pretrained weights were trained with.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

_DATA: dict[str, Data] = {}
_MODELS: dict[str, torch.nn.Module] = {}


def build_network(config: Mapping[str, Any]) -> torch.nn.Module:
    """The network a `config.json` names, with random weights, in eval mode (BatchNorm
    uses the stored running statistics)."""
    from efficientnet_lite_pytorch import EfficientNet

    if config.get("library") != "efficientnet_lite_pytorch":
        raise ValueError(f"config names library {config.get('library')!r}, "
                         "expected 'efficientnet_lite_pytorch'")
    return EfficientNet.from_name(config["architecture"], **config.get("overrides", {})).eval()


def embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled features of uint8 images (N, 3, H, W): ImageNet-normalized, the last conv
    block's map averaged over space (what the ImageNet classifier reads)."""
    x = (images.float() / 255.0 - MEAN) / STD
    return model.extract_features(x).mean(dim=(2, 3))


class Data(qf.Data):
    """One data file: per task uint8 images and labels, and the task's head; the network's
    config is part of the cache key."""

    version = EVAL_VERSION

    def task_inputs(self, tensors: dict[str, torch.Tensor], task: str
                    ) -> tuple[torch.Tensor, ...]:
        return tensors[f"{task}/images"], tensors[f"{task}/labels"].long()

    def digested_files(self) -> list[Path]:
        return [self.config_dir / "config.json"]


def load_data(path: str | Path) -> Data:
    return qf.load_data(path, Data, _DATA)


def network_for(config_dir: Path) -> torch.nn.Module:
    """One skeleton per config per process; states are copied into it."""
    key = str(config_dir)
    if key not in _MODELS:
        _MODELS[key] = build_network(json.loads((config_dir / "config.json").read_text()))
    return _MODELS[key]


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"merged state lacks {len(missing)} network tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


@torch.inference_mode()
def correct(model: torch.nn.Module, head: torch.nn.Module, images: torch.Tensor,
            labels: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    """Per image, whether the head's prediction is the label."""
    out = [head(embed(model, images[i:i + batch])).argmax(-1) == labels[i:i + batch]
           for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def _entry(state: Mapping[str, torch.Tensor], data: str | Path) -> dict[str, Any]:
    """The cached record of `state` on `data` ({"acc", "correct", "eval_s"}), computed and
    stored when absent."""
    d = load_data(data)
    path = qf._cache_path(d, state)  # type: ignore[arg-type]  # same digest/cache_dir fields
    entry = qf._read_cache(path)
    if entry is not None and "acc" in entry and "correct" in entry:
        return entry
    t0 = time.perf_counter()
    model = network_for(d.config_dir)
    load_state(model, state)
    right = {t: correct(model, d.heads[t], *d.inputs[t]) for t in d.tasks}
    return qf.store_entry(d, path, right, time.perf_counter() - t0)  # the text family's cache


def evaluate_timed(state: Mapping[str, torch.Tensor],
                   data: str | Path) -> tuple[dict[str, float], float]:
    """`evaluate`, and the seconds the scoring took when it was computed (a cache hit
    returns the recorded cold time)."""
    entry = _entry(state, data)
    return entry["acc"], float(entry.get("eval_s", float("nan")))


def evaluate(state: Mapping[str, torch.Tensor], data: str | Path) -> dict[str, float]:
    """Accuracy per task of the network `state` (each task with its own head)."""
    return evaluate_timed(state, data)[0]


def correctness(state: Mapping[str, torch.Tensor], data: str | Path) -> dict[str, torch.Tensor]:
    """Per task, a bool per image (in the data file's order): for paired comparisons."""
    return {t: torch.tensor([c == "1" for c in v], dtype=torch.bool)
            for t, v in _entry(state, data)["correct"].items()}


def score(state: Mapping[str, torch.Tensor], data: str | Path) -> float:
    """Mean accuracy over the tasks: the searches' fitness (higher is better)."""
    acc = evaluate(state, data)
    return sum(acc.values()) / len(acc)


__all__ = ["EVAL_VERSION", "build_network", "correctness", "embed", "evaluate",
           "evaluate_timed", "load_checkpoint", "score", "state_digest"]
