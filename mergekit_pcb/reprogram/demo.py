"""A small worked case on real photographs that scikit-image ships: a tiny residual
denoiser trained on Gaussian noise σ = 0.1, and the degradations it never saw (σ = 0.2
noise, haze, low light, blur), on patches cut from disjoint images per split.

Used by the tests, `scripts/bench_osr.py` and `scripts/osr_demo_data.py`; the factory
`tiny_denoiser` is what the demo recipes name as `arch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Disjoint photographs per split: the denoiser and the modules train on TRAIN only.
TRAIN_IMAGES = ("astronaut", "coffee", "moon", "grass")
VALIDATION_IMAGES = ("chelsea", "immunohistochemistry")
TEST_IMAGES = ("rocket", "camera", "coins")

TRAIN_SIGMA = 0.1
NOISE_SIGMA = 0.2
HAZE_T, HAZE_A = 0.55, 0.85
LOWLIGHT_GAIN, LOWLIGHT_GAMMA = 0.35, 1.5
BLUR_SIGMA = 1.2


class TinyDenoiser(nn.Module):
    """x - g(x): a few 3×3 convolutions predict the noise."""

    def __init__(self, channels: int = 3, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for _ in range(depth - 1):
            layers += [nn.Conv2d(c, width, 3, padding=1, padding_mode="reflect"), nn.ReLU()]
            c = width
        layers.append(nn.Conv2d(c, channels, 3, padding=1, padding_mode="reflect"))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def tiny_denoiser(channels: int = 3, width: int = 16, depth: int = 3) -> TinyDenoiser:
    return TinyDenoiser(channels, width, depth)


# ---- degradations ---------------------------------------------------------------------------

def add_noise(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def haze(x: torch.Tensor, t: float = HAZE_T, airlight: float = HAZE_A) -> torch.Tensor:
    """I = t·J + A·(1 - t), a constant transmission t."""
    return t * x + airlight * (1 - t)


def low_light(x: torch.Tensor, gain: float = LOWLIGHT_GAIN, gamma: float = LOWLIGHT_GAMMA
              ) -> torch.Tensor:
    return gain * x.clamp(0, 1) ** gamma


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders, per channel; x (N, C, H, W)."""
    k = gaussian_kernel(sigma)
    r, c = len(k) // 2, x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


Degradation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
DEGRADATIONS: dict[str, Degradation] = {
    "noise": lambda x, g: add_noise(x, NOISE_SIGMA, g),
    "haze": lambda x, g: haze(x),
    "lowlight": lambda x, g: low_light(x),
    "blur": lambda x, g: blur(x),
}


# ---- patches of scikit-image's photographs --------------------------------------------------

def photo(name: str, downscale: int = 2) -> torch.Tensor:
    """scikit-image sample `name` as (3, H, W) in [0, 1] (grey repeated), averaged over
    downscale×downscale blocks."""
    import numpy as np
    from skimage import data

    arr = np.asarray(getattr(data, name)())
    t = torch.from_numpy(arr.astype("float32") / (255.0 if arr.dtype == np.uint8 else 1.0))
    t = t[None].repeat(3, 1, 1) if t.dim() == 2 else t[..., :3].permute(2, 0, 1)
    if downscale > 1:
        t = F.avg_pool2d(t[None], downscale)[0]
    return t.contiguous()


def patches(names: tuple[str, ...], size: int, count: int, seed: int,
            downscale: int = 2) -> torch.Tensor:
    """`count` distinct non-overlapping size×size patches of the named photographs, chosen
    by a seeded permutation, (N, 3, size, size)."""
    cut = []
    for name in names:
        img = photo(name, downscale)
        h, w = img.shape[-2:]
        for top in range(0, h - size + 1, size):
            for left in range(0, w - size + 1, size):
                cut.append(img[:, top:top + size, left:left + size])
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(cut), generator=gen)[:count]
    return torch.stack([cut[int(i)] for i in order])


@dataclass
class Split:
    degraded: torch.Tensor
    clean: torch.Tensor


def degrade(clean: torch.Tensor, kind: str, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(DEGRADATIONS[kind](clean, gen).float().contiguous(), clean)


def train_denoiser(clean: torch.Tensor, *, steps: int = 300, batch: int = 16,
                   lr: float = 3e-3, seed: int = 0, width: int = 16, depth: int = 3
                   ) -> TinyDenoiser:
    """The frozen model of the demo: trained on clip(x + N(0, 0.1²)) only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_denoiser(clean.shape[1], width, depth)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(len(clean), (batch,), generator=gen)
        y = clean[idx]
        x = add_noise(y, TRAIN_SIGMA, gen)
        loss = (model(x) - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


__all__ = ["DEGRADATIONS", "TEST_IMAGES", "TRAIN_IMAGES", "VALIDATION_IMAGES", "Split",
           "TinyDenoiser", "add_noise", "blur", "degrade", "haze", "low_light", "patches",
           "photo", "tiny_denoiser", "train_denoiser"]
