"""A worked case on real photographs that scikit-image, scikit-learn and matplotlib ship:
a small residual denoiser (the frozen restorer) trained on blind Gaussian noise, and the
degradations it never saw (`degradations`: spatially varying haze, noisy low light, noisy
motion blur, JPEG, a mixture), on patches cut from disjoint photographs per split.

Used by the tests, `scripts/bench_osr.py` and `scripts/osr_demo_data.py`; the factory
`tiny_denoiser` is what the demo recipes name as `arch`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_pcb.reprogram.degradations import SINGLE, Degradation, mixture

# Disjoint photographs per split: the denoiser and the modules train on TRAIN only.
# "sklearn:" names are scikit-learn's sample images, "matplotlib:" its sample data.
TRAIN_IMAGES = ("astronaut", "coffee", "sklearn:china", "moon", "grass", "gravel", "brick")
VALIDATION_IMAGES = ("chelsea", "immunohistochemistry")
TEST_IMAGES = ("rocket", "sklearn:flower", "matplotlib:grace_hopper", "camera", "coins")

TRAIN_SIGMA = 0.1
# The frozen restorer of the demo and the benchmark: blind Gaussian denoising, σ drawn
# per image from RESTORER_SIGMA, trained RESTORER_STEPS steps on RESTORER_CROP-px crops of
# the training photographs; its own-task score is at σ = TRAIN_SIGMA.
RESTORER_KWARGS = {"channels": 3, "width": 32, "depth": 5}
RESTORER_SIGMA = (0.0, 0.2)
RESTORER_STEPS = 3000
RESTORER_CROP = 48
RESTORER_BATCH = 8
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

def add_noise(x: torch.Tensor, sigma: float | torch.Tensor, gen: torch.Generator
              ) -> torch.Tensor:
    """clip(x + σ·N(0, 1)); σ a number or a tensor that broadcasts against x."""
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


# What the demo and the benchmark reprogram for: none is inverted by a global transform
# (each image has its own random parameters; see `degradations`).
DEGRADATIONS: dict[str, Degradation] = {**SINGLE, "mixture": mixture}


# ---- patches of scikit-image's photographs --------------------------------------------------

def photo(name: str, downscale: int = 2) -> torch.Tensor:
    """scikit-image sample `name` as (3, H, W) in [0, 1] (grey repeated), averaged over
    downscale×downscale blocks."""
    import numpy as np

    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        arr = np.asarray(load_sample_image(name.removeprefix("sklearn:") + ".jpg"))
    elif name.startswith("matplotlib:"):
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data(name.removeprefix("matplotlib:") + ".jpg") as f, \
                Image.open(f) as im:
            arr = np.asarray(im.convert("RGB"))
    else:
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
                   lr: float = 3e-3, seed: int = 0, width: int = 16, depth: int = 3,
                   sigma: float | tuple[float, float] = TRAIN_SIGMA, crop: int | None = None
                   ) -> TinyDenoiser:
    """A denoiser trained on clip(x + N(0, σ²)) only: σ fixed, or drawn uniformly per
    image from a (low, high) range (blind denoising); on random crop×crop crops."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_denoiser(clean.shape[1], width, depth)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    h, w = clean.shape[-2:]
    c = min(crop or h, h, w)
    for _ in range(steps):
        idx = torch.randint(len(clean), (batch,), generator=gen)
        top = int(torch.randint(h - c + 1, (1,), generator=gen))
        left = int(torch.randint(w - c + 1, (1,), generator=gen))
        y = clean[idx][..., top:top + c, left:left + c]
        if isinstance(sigma, tuple):
            s: float | torch.Tensor = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(
                batch, 1, 1, 1, generator=gen)
        else:
            s = sigma
        x = add_noise(y, s, gen)
        loss = (model(x) - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def restorer(clean: torch.Tensor, cache: Path | None, *, seed: int = 0,
             steps: int = RESTORER_STEPS) -> TinyDenoiser:
    """The demo's frozen restorer (`RESTORER_*`), trained on `clean` (the training
    photographs' patches), or read back from `cache` (a .safetensors file) when it was
    trained there with the same settings and data."""
    from safetensors.torch import load_file, save_file

    key = json.dumps({"kwargs": RESTORER_KWARGS, "sigma": RESTORER_SIGMA, "steps": steps,
                      "crop": RESTORER_CROP, "batch": RESTORER_BATCH, "seed": seed,
                      "data": [list(clean.shape), round(float(clean.double().sum()), 4)]},
                     sort_keys=True)
    model = tiny_denoiser(**RESTORER_KWARGS)
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            stored = (f.metadata() or {}).get("restorer")
        if stored == key:
            model.load_state_dict(load_file(str(cache)))
            return model.eval()
    model = train_denoiser(clean, steps=steps, batch=RESTORER_BATCH, seed=seed,
                           width=RESTORER_KWARGS["width"], depth=RESTORER_KWARGS["depth"],
                           sigma=RESTORER_SIGMA, crop=RESTORER_CROP)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"restorer": key})
        tmp.replace(cache)
    return model


__all__ = ["DEGRADATIONS", "RESTORER_KWARGS", "TEST_IMAGES", "TRAIN_IMAGES",
           "VALIDATION_IMAGES", "Split", "TinyDenoiser", "add_noise", "blur", "degrade", "haze",
           "low_light", "patches",
           "photo", "restorer", "tiny_denoiser", "train_denoiser"]
