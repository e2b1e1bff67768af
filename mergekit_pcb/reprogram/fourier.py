"""Fourier amplitude and phase of images (B, C, H, W), and their frequency grids.

Amplitudes use the orthonormal DFT, under which a stationary texture has the same
amplitude at a given normalized frequency whatever the image size; the DC term is further
divided by sqrt(H·W) so that it is the image mean (`size_scale`). Frequencies are in
cycles per pixel; the radial frequency is normalized to [0, 1] by its largest value
sqrt(0.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_RADIUS = math.sqrt(0.5)


def amplitude(x: torch.Tensor) -> torch.Tensor:
    """|FFT2(x)| (orthonormal), over the last two dimensions."""
    return torch.fft.fft2(x, norm="ortho").abs()


def amplitude_phase(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    spectrum = torch.fft.fft2(x, norm="ortho")
    return spectrum.abs(), spectrum.angle()


def from_amplitude_phase(amp: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The real image whose spectrum is amp·e^{i·phase} (inverse of `amplitude_phase`)."""
    return torch.fft.ifft2(torch.polar(amp, phase), norm="ortho").real


def radial_frequency(h: int, w: int, *, half: bool = False,
                     device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized radial frequency in [0, 1] on the FFT grid (H, W), or on the rfft grid
    (H, W // 2 + 1) with `half`."""
    fy = torch.fft.fftfreq(h, device=device, dtype=dtype)
    fx = (torch.fft.rfftfreq if half else torch.fft.fftfreq)(w, device=device, dtype=dtype)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / MAX_RADIUS


def size_scale(h: int, w: int, *, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H, W): 1 everywhere but sqrt(H·W) at DC; amplitude / size_scale is comparable
    across image sizes (DC becomes the mean)."""
    s = torch.ones(h, w, device=device, dtype=dtype)
    s[0, 0] = math.sqrt(h * w)
    return s


def normalized_amplitude(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return amplitude(x) / size_scale(h, w, device=x.device, dtype=x.real.dtype)


def interpolate_profile(profile: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of `profile` (C, B), sampled at B equally spaced radii over
    [0, 1], at `radius` (H, W) -> (C, H, W)."""
    bins = profile.shape[-1]
    pos = radius.clamp(0, 1) * (bins - 1)
    i0 = pos.floor().long().clamp(max=bins - 1)
    i1 = (i0 + 1).clamp(max=bins - 1)
    frac = (pos - i0.to(pos.dtype)).to(profile.dtype)
    return profile[:, i0] * (1 - frac) + profile[:, i1] * frac


def resample_spectrum(spec: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A spectrum (C, Hr, Wr) on the unshifted FFT grid of size (Hr, Wr), sampled
    (bilinear) at the frequencies of the FFT grid (H, W): same cycles per pixel."""
    hr, wr = spec.shape[-2:]
    shifted = torch.fft.fftshift(spec, dim=(-2, -1))
    fy = torch.fft.fftfreq(h, device=spec.device, dtype=spec.dtype)
    fx = torch.fft.fftfreq(w, device=spec.device, dtype=spec.dtype)
    # shifted index k holds frequency (k - n // 2) / n; align_corners maps -1..1 to 0..n-1
    gy = 2 * (fy * hr + hr // 2) / max(hr - 1, 1) - 1
    gx = 2 * (fx * wr + wr // 2) / max(wr - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (H, W, 2): x, y
    out = F.grid_sample(shifted[None], grid[None], mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[0]


__all__ = ["MAX_RADIUS", "amplitude", "amplitude_phase", "from_amplitude_phase",
           "interpolate_profile", "normalized_amplitude", "radial_frequency",
           "resample_spectrum", "size_scale"]
