"""The reprogramming modules. Each is a torch module whose math is a pure function of
tensors (below the classes' thin wrappers), applied around a frozen model `f` that the
caller passes in: f is never a submodule, so a module's state holds only its own tensors.

- `wave` (the paper): a per-pixel amplitude a = x + Δa(x) and phase φ = Δφ(x); r = a·cos φ
  and s = a·sin φ each pass through f; a phase-aware fusion of f(r), f(s) and the input
  gives the output. Δa, Δφ and the fusion's residual start at zero and its linear part
  selects f(r), so a new module returns exactly f(x).
- `fourier`: a gain on the Fourier amplitude by channel and normalized radial frequency
  (linear interpolation between bins, so any image size works) and a per-channel offset,
  then f. Starts as the exact identity (gain 1, offset 0).
- `fda`: no training; the amplitude in the band r < β (normalized radial frequency) is
  replaced by the mean amplitude of reference images, resampled at the image's
  frequencies. β = 0 is the identity.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_pcb.errors import UserError
from mergekit_pcb.reprogram.fourier import (
    interpolate_profile,
    normalized_amplitude,
    radial_frequency,
    resample_spectrum,
    size_scale,
)

Frozen = Callable[[torch.Tensor], torch.Tensor]


# ---- the math, as functions of tensors ------------------------------------------------------

def wave_transform(x: torch.Tensor, delta_amp: torch.Tensor, phase: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, s) = a·(cos φ, sin φ) with a = x + Δa."""
    amp = x + delta_amp
    return amp * torch.cos(phase), amp * torch.sin(phase)


def fourier_gain(x: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x with its Fourier amplitude multiplied by `gain` (C, bins) at each radial frequency
    (phase kept), plus `offset` (C,). Written as x + IFFT((g - 1)·X) so that g = 1 and
    offset 0 give x exactly."""
    h, w = x.shape[-2:]
    radius = radial_frequency(h, w, half=True, device=x.device, dtype=x.dtype)
    g = interpolate_profile(gain, radius)  # (C, H, W//2+1)
    spectrum = torch.fft.rfft2(x, norm="ortho")
    delta = torch.fft.irfft2((g - 1) * spectrum, s=(h, w), norm="ortho")
    return x + delta + offset[:, None, None]


def fda_transform(x: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """x with the normalized amplitude (see `fourier.size_scale`) in the band r < β
    replaced by `reference` (C, Hr, Wr, unshifted FFT grid) resampled to x's frequencies,
    the phase kept. Written as x + IFFT(ΔA·e^{iφ}), so β = 0 gives x exactly."""
    h, w = x.shape[-2:]
    radius = radial_frequency(h, w, device=x.device, dtype=x.dtype)
    mask = radius < beta
    if not bool(mask.any()):
        return x
    scale = size_scale(h, w, device=x.device, dtype=x.dtype)
    spectrum = torch.fft.fft2(x, norm="ortho")
    amp = spectrum.abs()
    target = resample_spectrum(reference.to(x.dtype), h, w) * scale
    unit = torch.where(amp > 0, spectrum / amp.clamp_min(1e-30), torch.ones_like(spectrum))
    delta = torch.where(mask, (target - amp) * unit, torch.zeros_like(spectrum))
    return x + torch.fft.ifft2(delta, norm="ortho").real


def mean_amplitude(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Mean normalized amplitude (C, size, size) of images (C, H, W) of any sizes, each
    resampled at the frequencies of a size×size grid."""
    acc = None
    for img in images:
        amp = normalized_amplitude(img.double())
        grid = resample_spectrum(amp, size, size)
        acc = grid if acc is None else acc + grid
    assert acc is not None
    return (acc / len(images)).float()


# ---- the modules ----------------------------------------------------------------------------

class ReprogramModule(nn.Module):
    mode: ClassVar[str]
    trainable: ClassVar[bool] = True

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, frozen: Frozen) -> torch.Tensor:
        raise NotImplementedError


class WaveModule(ReprogramModule):
    mode = "wave"

    def __init__(self, channels: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.channels, self.hidden = channels, hidden
        self.encode = nn.Conv2d(channels, hidden, 3, padding=1, padding_mode="reflect")
        self.amp = nn.Conv2d(hidden, channels, 3, padding=1, padding_mode="reflect")
        self.phase = nn.Conv2d(hidden, channels, 3, padding=1, padding_mode="reflect")
        self.fuse = nn.Conv2d(3 * channels, channels, 1)
        self.mix1 = nn.Conv2d(3 * channels, hidden, 3, padding=1, padding_mode="reflect")
        self.mix2 = nn.Conv2d(hidden, channels, 3, padding=1, padding_mode="reflect")
        with torch.no_grad():
            for conv in (self.amp, self.phase, self.mix2):
                conv.weight.zero_()
                conv.bias.zero_()
            self.fuse.weight.zero_()
            self.fuse.bias.zero_()
            for c in range(channels):
                self.fuse.weight[c, c, 0, 0] = 1.0  # selects f(r)

    def config(self) -> dict[str, Any]:
        return {"mode": self.mode, "channels": self.channels, "hidden": self.hidden}

    def forward(self, x: torch.Tensor, frozen: Frozen) -> torch.Tensor:
        h = F.gelu(self.encode(x))
        r, s = wave_transform(x, self.amp(h), self.phase(h))
        out = frozen(torch.cat([r, s]))
        fr, fs = out[: len(x)], out[len(x):]
        if fr.shape[-2:] != x.shape[-2:]:  # an upscaling f: the input at its output size
            x = F.interpolate(x, size=fr.shape[-2:], mode="bicubic", align_corners=False)
        z = torch.cat([fr, fs, x], dim=1)
        return self.fuse(z) + self.mix2(F.gelu(self.mix1(z)))


class FourierModule(ReprogramModule):
    mode = "fourier"

    def __init__(self, channels: int = 3, bins: int = 16) -> None:
        super().__init__()
        self.channels, self.bins = channels, bins
        self.gain = nn.Parameter(torch.ones(channels, bins))
        self.offset = nn.Parameter(torch.zeros(channels))

    def config(self) -> dict[str, Any]:
        return {"mode": self.mode, "channels": self.channels, "bins": self.bins}

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return fourier_gain(x, self.gain, self.offset)

    def forward(self, x: torch.Tensor, frozen: Frozen) -> torch.Tensor:
        return frozen(self.transform(x))


class FDAModule(ReprogramModule):
    mode = "fda"
    trainable = False

    def __init__(self, channels: int = 3, size: int = 64, beta: float = 0.0) -> None:
        super().__init__()
        self.channels, self.size, self.beta = channels, size, float(beta)
        self.register_buffer("reference", torch.zeros(channels, size, size))

    def config(self) -> dict[str, Any]:
        return {"mode": self.mode, "channels": self.channels, "size": self.size,
                "beta": self.beta}

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return fda_transform(x, self.reference, self.beta)

    def forward(self, x: torch.Tensor, frozen: Frozen) -> torch.Tensor:
        return frozen(self.transform(x))


MODULES: dict[str, type[ReprogramModule]] = {
    m.mode: m for m in (WaveModule, FourierModule, FDAModule)}


def build_module(config: dict[str, Any]) -> ReprogramModule:
    """A module from its `config()` (as stored in the module file's metadata)."""
    args = dict(config)
    mode = args.pop("mode", None)
    cls = MODULES.get(mode) if isinstance(mode, str) else None
    if cls is None:
        raise UserError(f"module config: unknown mode {mode!r} (known: {', '.join(MODULES)})")
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"module config {json.dumps(config)[:200]}: {e}") from None


__all__ = ["MODULES", "FDAModule", "FourierModule", "Frozen", "ReprogramModule", "WaveModule",
           "build_module", "fda_transform", "fourier_gain", "mean_amplitude",
           "wave_transform"]
