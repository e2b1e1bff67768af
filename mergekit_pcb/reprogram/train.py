"""Training a module on paired few-shot data: AdamW, L1 or Charbonnier plus (1 - SSIM),
seeded random crops and flips, early stopping on the validation split only (the best
validation state is kept; the held-out split is never looked at here)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergekit_pcb.reprogram.config import Parameters
from mergekit_pcb.reprogram.data import PairSet
from mergekit_pcb.reprogram.frozen import FrozenModel
from mergekit_pcb.reprogram.metrics import psnr, ssim, ssim_loss
from mergekit_pcb.reprogram.modules import FDAModule, ReprogramModule
from mergekit_pcb.reprogram.restore import apply_images

CHARBONNIER_EPS = 1e-3


@dataclass
class Scores:
    psnr: float
    ssim: float

    def as_dict(self) -> dict[str, float]:
        return {"psnr": round(self.psnr, 4), "ssim": round(self.ssim, 5)}


@dataclass
class TrainResult:
    best_step: int
    steps_run: int
    best_val_psnr: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    beta: float | None = None


def evaluate(module: ReprogramModule | None, frozen: FrozenModel, pairs: PairSet,
             device: str = "cpu") -> Scores:
    """Mean PSNR and SSIM over the split's images (each at its own size)."""
    outs = apply_images(module, frozen, pairs.degraded, device)
    p = [float(psnr(o[None], c[None])[0]) for o, c in zip(outs, pairs.clean, strict=True)]
    s = [float(ssim(o[None], c[None])[0]) for o, c in zip(outs, pairs.clean, strict=True)]
    return Scores(sum(p) / len(p), sum(s) / len(s))


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return (pred - target).abs().mean()
    return torch.sqrt((pred - target) ** 2 + CHARBONNIER_EPS ** 2).mean()


def sample_batch(pairs: PairSet, params: Parameters, scale: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` seeded random crops (crop × crop of the degraded image, the matching
    region of the clean one), each flipped horizontally and vertically at random."""
    xs, ys = [], []
    c = params.crop
    for _ in range(params.batch_size):
        i = int(torch.randint(len(pairs), (1,), generator=gen))
        x, y = pairs.degraded[i], pairs.clean[i]
        h, w = x.shape[-2:]
        top = int(torch.randint(h - c + 1, (1,), generator=gen))
        left = int(torch.randint(w - c + 1, (1,), generator=gen))
        x = x[:, top:top + c, left:left + c]
        y = y[:, top * scale:(top + c) * scale, left * scale:(left + c) * scale]
        flips = torch.randint(2, (2,), generator=gen)
        dims = [d for d, f in zip((-1, -2), flips.tolist(), strict=True) if f]
        if dims:
            x, y = x.flip(dims), y.flip(dims)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def train_module(module: ReprogramModule, frozen: FrozenModel, train: PairSet, val: PairSet,
                 params: Parameters, seed: int, *, device: str = "cpu",
                 console: Console | None = None) -> TrainResult:
    """Train `module` in place; it ends holding its best state on the validation split."""
    start = time.perf_counter()
    module.to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=params.lr,
                            weight_decay=params.weight_decay)
    history: list[dict[str, Any]] = []
    module.eval()
    best = evaluate(module, frozen, val, device).psnr
    best_state = copy.deepcopy(module.state_dict())
    best_step, since, step = 0, 0, 0
    history.append({"step": 0, "loss": None, "val_psnr": round(best, 4)})
    quiet = console is None or console.quiet
    progress = Progress(TextColumn(f"{module.mode}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"),
                        TextColumn("val PSNR {task.fields[psnr]}"), TimeElapsedColumn(),
                        console=console, disable=quiet, transient=False)
    with progress:
        task = progress.add_task("train", total=params.steps, loss="-", psnr=f"{best:.2f}")
        for step in range(1, params.steps + 1):
            module.train()
            x, y = sample_batch(train, params, frozen.scale, gen)
            x, y = x.to(device), y.to(device)
            out = module(x, frozen)
            loss = pixel_loss(out, y, params.loss)
            if params.ssim_weight > 0:
                loss = loss + params.ssim_weight * ssim_loss(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.update(task, advance=1, loss=f"{loss.item():.4f}")
            if step % params.eval_every == 0 or step == params.steps:
                module.eval()
                v = evaluate(module, frozen, val, device).psnr
                history.append({"step": step, "loss": round(loss.item(), 6),
                                "val_psnr": round(v, 4)})
                if v > best:
                    best, best_step, since = v, step, 0
                    best_state = copy.deepcopy(module.state_dict())
                else:
                    since += 1
                progress.update(task, psnr=f"{v:.2f} (best {best:.2f})")
                if since >= params.patience:
                    break
    module.load_state_dict(best_state)
    module.eval()
    return TrainResult(best_step, step, best, time.perf_counter() - start, history)


def choose_beta(module: FDAModule, frozen: FrozenModel, val: PairSet, betas: list[float],
                device: str = "cpu") -> TrainResult:
    """fda has no training: the band β with the best validation PSNR (ties: the smaller)."""
    start = time.perf_counter()
    history = []
    best_beta, best = None, float("-inf")
    for beta in sorted(set(betas)):
        module.beta = beta
        v = evaluate(module, frozen, val, device).psnr
        history.append({"beta": beta, "val_psnr": round(v, 4)})
        if v > best:
            best_beta, best = beta, v
    assert best_beta is not None
    module.beta = best_beta
    return TrainResult(0, 0, best, time.perf_counter() - start, history, beta=best_beta)


__all__ = ["Scores", "TrainResult", "choose_beta", "evaluate", "pixel_loss", "sample_batch",
           "train_module"]
