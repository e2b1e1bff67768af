"""The baselines `scripts/bench_osr.py` runs beside `osr-reprogram` (not part of the CLI).

- Global fits, fitted on the training pairs by least squares and applied to every pixel
  the same way: per-channel affine y = a·x + b; per-channel gain·x^γ; a linear filter
  (a k×k convolution mixing the channels, plus a bias).
- `Standalone`: a residual CNN trained from scratch (`ResidualCNN`, widths solved by
  `same_size_widths`), with exactly as many trainable parameters as the reprogramming
  module it is compared with (`same_size_cnn`).
- `FineTune`: a trainable copy of the frozen model (what reprogramming avoids).
- The `wave` module with the frozen model replaced by the identity is `WaveModule` with
  `IDENTITY` as its frozen model.

`Standalone` and `FineTune` take (x, frozen) like the reprogramming modules and ignore
the frozen model, so the same training loop (`train_module`: same crops, steps, early
stopping on validation) trains every method.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_pcb.reprogram.frozen import FrozenModel
from mergekit_pcb.reprogram.modules import Frozen, ReprogramModule

IDENTITY = FrozenModel(nn.Identity(), "", "identity")


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- global fits ------------------------------------------------------------------------------

class GlobalFit(nn.Module):
    """One transform applied the same way to every pixel; its fitted numbers are buffers."""

    def __init__(self, kind: str, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.kind = kind  # "affine", "gain-gamma" or "filter"
        for name, value in params.items():
            self.register_buffer(name, value)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.kind == "affine":
            return p["a"].view(1, -1, 1, 1) * x + p["b"].view(1, -1, 1, 1)
        if self.kind == "gain-gamma":
            return p["gain"].view(1, -1, 1, 1) * x.clamp_min(0) ** p["gamma"].view(1, -1, 1, 1)
        k = p["weight"].shape[-1] // 2
        return F.conv2d(F.pad(x, (k, k, k, k), mode="reflect"), p["weight"], p["bias"])

    def describe(self) -> str:
        p = self.params
        if self.kind == "affine":
            return "affine " + ", ".join(f"{a:.2f}·x{b:+.2f}" for a, b in
                                         zip(p["a"].tolist(), p["b"].tolist(), strict=True))
        if self.kind == "gain-gamma":
            return "gain·x^γ " + ", ".join(f"{g:.2f}·x^{e:.2f}" for g, e in
                                           zip(p["gain"].tolist(), p["gamma"].tolist(),
                                               strict=True))
        k = p["weight"].shape[-1]
        return f"{k}×{k} linear filter"


def _pixels(images: list[torch.Tensor]) -> torch.Tensor:
    """Every pixel of the images, (C, P) float64."""
    return torch.cat([im.reshape(im.shape[0], -1) for im in images], dim=1).double()


def fit_affine(degraded: list[torch.Tensor], clean: list[torch.Tensor]) -> GlobalFit:
    """Per channel, the a, b minimizing Σ (a·x + b - y)² over every training pixel."""
    x, y = _pixels(degraded), _pixels(clean)
    xm, ym = x.mean(1), y.mean(1)
    cov = ((x - xm[:, None]) * (y - ym[:, None])).mean(1)
    var = ((x - xm[:, None]) ** 2).mean(1).clamp_min(1e-12)
    a = cov / var
    return GlobalFit("affine", {"a": a.float(), "b": (ym - a * xm).float()})


def fit_gain_gamma(degraded: list[torch.Tensor], clean: list[torch.Tensor],
                   iters: int = 200) -> GlobalFit:
    """Per channel, the gain g and exponent γ minimizing Σ (g·x^γ - y)²: started from the
    log-log regression, refined by Gauss-Newton (Levenberg-damped) in float64."""
    x, y = _pixels(degraded), _pixels(clean)
    gains, gammas = [], []
    for xc, yc in zip(x, y, strict=True):
        ok = (xc > 1e-3) & (yc > 1e-3)
        lx, ly = xc[ok].log(), yc[ok].log()
        if len(lx) > 1 and float(lx.var()) > 0:
            gam = float(((lx - lx.mean()) * (ly - ly.mean())).mean() / lx.var(unbiased=False))
            lg = float(ly.mean() - gam * lx.mean())
        else:
            gam, lg = 1.0, 0.0
        theta = torch.tensor([lg, gam], dtype=torch.float64)  # log gain, γ
        xs = xc.clamp_min(1e-12)
        lxs = xs.log()
        damp = 1e-3
        for _ in range(iters):
            pred = theta[0].exp() * xs ** theta[1]
            r = pred - yc
            jac = torch.stack([pred, pred * lxs], dim=1)
            jtj, jtr = jac.T @ jac, jac.T @ r
            step = torch.linalg.solve(jtj + damp * torch.diag(jtj.diag()), jtr)
            new = theta - step
            if float(((new[0].exp() * xs ** new[1] - yc) ** 2).sum()) < float((r ** 2).sum()):
                theta, damp = new, damp / 3
            else:
                damp *= 10
            if float(step.abs().max()) < 1e-12:
                break
        gains.append(float(theta[0].exp()))
        gammas.append(float(theta[1]))
    return GlobalFit("gain-gamma", {"gain": torch.tensor(gains), "gamma": torch.tensor(gammas)})


def fit_filter(degraded: list[torch.Tensor], clean: list[torch.Tensor], size: int = 5
               ) -> GlobalFit:
    """The k×k convolution (all channels into each) plus bias minimizing the squared error
    over every training pixel (reflected borders), from the normal equations (float64)."""
    c, k = degraded[0].shape[0], size // 2
    cols = c * size * size + 1
    xtx = torch.zeros(cols, cols, dtype=torch.float64)
    xty = torch.zeros(cols, c, dtype=torch.float64)
    for x, y in zip(degraded, clean, strict=True):
        patches = F.unfold(F.pad(x[None].double(), (k, k, k, k), mode="reflect"), size)[0]
        design = torch.cat([patches, torch.ones(1, patches.shape[1], dtype=torch.float64)]).T
        xtx += design.T @ design
        xty += design.T @ y.reshape(c, -1).double().T
    sol = torch.linalg.solve(xtx + 1e-8 * torch.eye(cols, dtype=torch.float64), xty)
    weight = sol[:-1].T.reshape(c, c, size, size)
    return GlobalFit("filter", {"weight": weight.float().contiguous(),
                                "bias": sol[-1].float().contiguous()})


FITS = {"affine": fit_affine, "gain-gamma": fit_gain_gamma, "filter": fit_filter}


# ---- networks trained like the modules -------------------------------------------------------

class ResidualCNN(nn.Module):
    """x + g(x): two 3×3 convolutions (widths w1, w2), a 1×1 convolution (width u) and a
    3×3 output convolution, ReLU between; the output convolution starts at zero, so the
    network starts as the identity (as the modules start as f)."""

    def __init__(self, channels: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        w1, w2, u = widths
        last = nn.Conv2d(u, channels, 3, padding=1, padding_mode="reflect")
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(
            nn.Conv2d(channels, w1, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
            nn.Conv2d(w1, w2, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
            nn.Conv2d(w2, u, 1), nn.ReLU(), last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def cnn_count(channels: int, widths: tuple[int, int, int]) -> int:
    """Parameters of `ResidualCNN(channels, widths)`."""
    w1, w2, u = widths
    return (9 * channels * w1 + w1) + (9 * w1 * w2 + w2) + (w2 * u + u) + (9 * u * channels
                                                                            + channels)


def same_size_widths(target: int, channels: int = 3, max_width: int = 64
                     ) -> tuple[int, int, int]:
    """Widths (w1, w2, u) of a `ResidualCNN` with exactly `target` parameters, the most
    even ones (smallest max - min, then the smallest total). ValueError if none fits."""
    best: tuple[int, int, int] | None = None
    for w1, w2 in itertools.product(range(1, max_width + 1), repeat=2):
        # the count is linear in u: solve for it
        fixed = cnn_count(channels, (w1, w2, 0))
        u, left = divmod(target - fixed, w2 + 1 + 9 * channels)
        if left or not 1 <= u <= max_width:
            continue
        widths = (w1, w2, u)
        if best is None or (max(widths) - min(widths), sum(widths)) < (
                max(best) - min(best), sum(best)):
            best = widths
    if best is None:
        raise ValueError(f"no residual CNN of widths <= {max_width} has exactly {target} "
                         "parameters")
    return best


class Standalone(ReprogramModule):
    """A network trained from scratch; the frozen model is not used."""

    mode = "cnn"

    def __init__(self, channels: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        self.widths = widths
        self.net = ResidualCNN(channels, widths)

    def config(self) -> dict[str, Any]:
        return {"mode": self.mode, "widths": list(self.widths)}

    def forward(self, x: torch.Tensor, frozen: Frozen) -> torch.Tensor:
        return self.net(x)


def same_size_cnn(module: nn.Module, channels: int = 3) -> Standalone:
    return Standalone(channels, same_size_widths(trainable_count(module), channels))


class FineTune(ReprogramModule):
    """A trainable copy of the frozen model (the original is left untouched)."""

    mode = "finetune"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(model)
        self.net.requires_grad_(True)

    def config(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def forward(self, x: torch.Tensor, frozen: Frozen) -> torch.Tensor:
        return self.net(x)


__all__ = ["FITS", "IDENTITY", "FineTune", "GlobalFit", "ResidualCNN", "Standalone",
           "cnn_count", "fit_affine", "fit_filter", "fit_gain_gamma", "same_size_cnn",
           "same_size_widths", "trainable_count"]
