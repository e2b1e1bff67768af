"""Degradations that no global transform inverts, for the demo and the benchmark: each
image of a batch (N, C, H, W) in [0, 1] gets its own random parameters, drawn from a
seeded generator, so the same seed gives the same images.

- `spatial_haze`: I = J·t + A·(1 - t) with a depth-like map d (a base depth plus a ramp
  in a random direction and a smooth random field), t = exp(-β·d), and an airlight A
  that varies smoothly over the image and has a colour tint.
- `noisy_low_light`: a camera-like response k·J^γ (exposure k, γ > 1 per image) with
  signal-dependent noise of variance s / photons + read² (Gaussian approximation of
  Poisson-Gaussian sensor noise).
- `noisy_motion_blur`: a line kernel of random length and angle, then Gaussian noise.
- `random_jpeg`: JPEG (Pillow, 4:2:0 chroma) at a quality drawn per image.
- `mixture`: one of the above per image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HAZE_BETA = (0.6, 1.8)          # t = exp(-β·d), d in [0, 1]: t down to about 0.17
DEPTH_SPAN = (0.15, 0.4)        # depth variation across one image (patch)
HAZE_AIRLIGHT = (0.65, 0.95)
HAZE_TINT = 0.06                # per-channel airlight offset
HAZE_AIRLIGHT_VARIATION = 0.12  # relative spatial variation of the airlight
# Exposure and response vary per image but over ranges narrow enough that a trained
# method can learn them; the noise is what no global fit removes (mapped back through the
# inverse response its standard deviation is about 0.24 at mid-grey).
LOWLIGHT_EXPOSURE = (0.10, 0.14)
LOWLIGHT_GAMMA = (1.4, 1.6)
LOWLIGHT_PHOTONS = (30.0, 90.0)  # photons at full scale: shot-noise variance s / photons
LOWLIGHT_READ = 0.01
MOTION_LENGTH = (3.0, 9.0)
MOTION_KERNEL = 11
MOTION_NOISE = 0.02
JPEG_QUALITIES = (10, 15, 20, 30)


def _uniform(n: int, bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def smooth_field(n: int, h: int, w: int, gen: torch.Generator, cells: int = 4
                 ) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1]: a cells×cells random grid, bicubic-upsampled, each image
    rescaled to span [0, 1]."""
    grid = torch.rand(n, 1, cells, cells, generator=gen)
    return _unit(F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True))


def depth_map(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1], depth-like at the scale of a patch of a scene: a base depth
    (how far the patch is) plus a variation of 0.15 to 0.4 across it, shaped as a linear
    ramp in a random direction (a receding ground plane) mixed with a smooth random field
    (objects)."""
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    mix = _uniform(n, (0.3, 0.7), gen)[:, None, None, None]
    span = _uniform(n, DEPTH_SPAN, gen)[:, None, None, None]
    base = (1 - span) * torch.rand(n, 1, 1, 1, generator=gen)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    ramp = (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy)[:, None]
    shape = mix * _unit(ramp) + (1 - mix) * smooth_field(n, h, w, gen)
    return base + span * _unit(shape)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Each image of (N, 1, H, W) rescaled to span [0, 1]."""
    lo = t.amin(dim=(-2, -1), keepdim=True)
    hi = t.amax(dim=(-2, -1), keepdim=True)
    return (t - lo) / (hi - lo).clamp_min(1e-6)


@dataclass
class HazeMaps:
    depth: torch.Tensor          # (N, 1, H, W) in [0, 1]
    transmission: torch.Tensor   # (N, 1, H, W) in (0, 1]
    airlight: torch.Tensor       # (N, C, H, W)


def haze_maps(n: int, c: int, h: int, w: int, gen: torch.Generator) -> HazeMaps:
    """The random maps of `spatial_haze`, fixed by the generator's state."""
    depth = depth_map(n, h, w, gen)
    beta = _uniform(n, HAZE_BETA, gen)[:, None, None, None]
    base = _uniform(n, HAZE_AIRLIGHT, gen)[:, None, None, None]
    tint = HAZE_TINT * (2 * torch.rand(n, c, 1, 1, generator=gen) - 1)
    vary = HAZE_AIRLIGHT_VARIATION * (2 * smooth_field(n, h, w, gen) - 1)
    airlight = (base * (1 + vary) + tint).clamp(0, 1)
    return HazeMaps(depth, torch.exp(-beta * depth), airlight)


def apply_haze(x: torch.Tensor, transmission: torch.Tensor, airlight: torch.Tensor
               ) -> torch.Tensor:
    """The atmospheric scattering model I = J·t + A·(1 - t)."""
    return x * transmission + airlight * (1 - transmission)


def spatial_haze(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    m = haze_maps(n, c, h, w, gen)
    return apply_haze(x, m.transmission, m.airlight)


def signal_dependent_noise(signal: torch.Tensor, photons: torch.Tensor, read: float,
                           gen: torch.Generator) -> torch.Tensor:
    """signal + N(0, signal / photons + read²) per pixel (no clipping); `photons` (N,)."""
    var = signal.clamp_min(0) / photons.view(-1, *([1] * (signal.dim() - 1))) + read ** 2
    return signal + var.sqrt() * torch.randn(signal.shape, generator=gen)


def noisy_low_light(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    exposure = _uniform(n, LOWLIGHT_EXPOSURE, gen).view(-1, 1, 1, 1)
    gamma = _uniform(n, LOWLIGHT_GAMMA, gen).view(-1, 1, 1, 1)
    photons = _uniform(n, LOWLIGHT_PHOTONS, gen)
    signal = exposure * x.clamp(0, 1) ** gamma
    return signal_dependent_noise(signal, photons, LOWLIGHT_READ, gen).clamp(0, 1)


def motion_kernel(length: float, angle: float, size: int = MOTION_KERNEL) -> torch.Tensor:
    """(size, size), sum 1: a centred line segment of `length` pixels at `angle` (radians),
    sampled at 16 points per pixel and splatted bilinearly. Length 0 is the identity."""
    k = torch.zeros(size, size, dtype=torch.float64)
    points = max(1, int(16 * length) + 1)
    centre = (size - 1) / 2
    for s in torch.linspace(-length / 2, length / 2, points, dtype=torch.float64):
        px, py = centre + float(s) * math.cos(angle), centre + float(s) * math.sin(angle)
        x0, y0 = math.floor(px), math.floor(py)
        fx, fy = px - x0, py - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
                    k[y0 + dy, x0 + dx] += wy * wx
    return (k / k.sum()).float()


def convolve(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel of x (N, C, H, W) correlated with `kernel` (K, K), reflected borders."""
    c, r = x.shape[1], kernel.shape[-1] // 2
    y = F.pad(x, (r, r, r, r), mode="reflect")
    return F.conv2d(y, kernel.to(x.dtype)[None, None].repeat(c, 1, 1, 1), groups=c)


def noisy_motion_blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    lengths = _uniform(n, MOTION_LENGTH, gen)
    angles = math.pi * torch.rand(n, generator=gen)
    out = torch.cat([convolve(x[i:i + 1], motion_kernel(float(lengths[i]), float(angles[i])))
                     for i in range(n)])
    return (out + MOTION_NOISE * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image through an 8-bit JPEG encode and decode at `quality` (Pillow)."""
    from PIL import Image

    out = []
    for img in x:
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        grey = arr.shape[0] == 1
        pil = Image.fromarray(arr[0].numpy() if grey else arr.permute(1, 2, 0).numpy())
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            back = torch.frombuffer(bytearray(decoded.tobytes()), dtype=torch.uint8)
        back = back.view(img.shape[1], img.shape[2], -1).permute(2, 0, 1)
        out.append(back.float() / 255)
    return torch.stack(out)


def random_jpeg(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    picks = torch.randint(len(JPEG_QUALITIES), (x.shape[0],), generator=gen)
    return torch.cat([jpeg(x[i:i + 1], JPEG_QUALITIES[int(q)]) for i, q in enumerate(picks)])


Degradation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
SINGLE: dict[str, Degradation] = {"haze": spatial_haze, "lowlight": noisy_low_light,
                                  "motion": noisy_motion_blur, "jpeg": random_jpeg}


def mixture(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image degraded by one of `SINGLE`, drawn at random."""
    kinds = list(SINGLE.values())
    picks = torch.randint(len(kinds), (x.shape[0],), generator=gen)
    return torch.cat([kinds[int(k)](x[i:i + 1], gen) for i, k in enumerate(picks)])


__all__ = ["JPEG_QUALITIES", "SINGLE", "Degradation", "HazeMaps", "apply_haze", "convolve",
           "depth_map", "haze_maps", "jpeg", "mixture", "motion_kernel", "noisy_low_light",
           "noisy_motion_blur", "random_jpeg", "signal_dependent_noise", "smooth_field",
           "spatial_haze"]
