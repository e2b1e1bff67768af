"""A dense, flatten-everything PCB merge: the peer for the memory benchmark.

This is how the PCB authors' code works: every task vector is flattened into one row of
an [n, D] matrix, rows are sorted to find the clip bounds and the drop threshold, and
the merge is computed on the whole matrix. Memory grows with the model; the streaming
`pcbmerge` implementation's does not.

    python scripts/pcb_dense.py RECIPE -o OUT

Reads a `pcb` recipe (base_model, models with weight/density, parameters lambda, clip,
inter: consensus) and writes OUT/model.safetensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def load_state(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def clamp_rows(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    d = x.shape[1]
    s = torch.sort(x, dim=1).values
    lo = s[:, int(d * min_ratio)].unsqueeze(1)
    hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    del s
    return torch.clamp(x, lo, hi)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), 0)


def pcb_rows(tv: torch.Tensor, densities: list[float], clip: float, weights: list[float],
             lam: float) -> torch.Tensor:
    n = tv.shape[0]
    a = clamp_rows(tv.abs(), clip, clip)
    score = torch.exp(n * normalize_rows(a) ** 2) * torch.tanh(tv * tv.sum(dim=0))
    clipped = tv.sign() * a
    del a, tv
    scale = torch.cat([normalize_rows(clamp_rows(score[i:i + 1], 1 - densities[i], 0))
                       for i in range(n)])
    w = torch.tensor(weights).unsqueeze(1)
    return lam * (w * scale * clipped).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    params = recipe.get("parameters", {})
    base = load_state(Path(recipe["base_model"]))
    names = [n for n, t in base.items() if t.dtype.is_floating_point]
    tuned = [load_state(Path(m["model"])) for m in recipe["models"]]
    rows = torch.stack([torch.cat([(t[n].float() - base[n].float()).reshape(-1) for n in names])
                        for t in tuned])
    del tuned
    merged = pcb_rows(
        rows,
        [m.get("parameters", {}).get("density", params.get("density", 0.1))
         for m in recipe["models"]],
        params.get("clip", 0.01),
        [m.get("parameters", {}).get("weight", 1.0) for m in recipe["models"]],
        params.get("lambda", 1.0),
    )
    out, offset = dict(base), 0
    for n in names:
        size = base[n].numel()
        out[n] = (base[n].float() + merged[offset:offset + size].reshape(base[n].shape)).to(
            base[n].dtype)
        offset += size
    args.output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, args.output / "model.safetensors")


if __name__ == "__main__":
    main()
