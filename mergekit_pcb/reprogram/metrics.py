"""PSNR and SSIM (torchmetrics; a test cross-checks them against scikit-image), per image.

Images are compared in [0, 1] (outputs clamped), data range 1; SSIM uses torchmetrics'
default Gaussian window (11 pixels, σ = 1.5), as scikit-image's `gaussian_weights=True`.
"""

from __future__ import annotations

import torch

# torchmetrics is imported where it is used: importing it loads scipy, matplotlib and
# transformers (2 s), which every `pcbmerge` command would otherwise pay.


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image of a batch (B, C, H, W) -> (B,)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(pred.clamp(0, 1), target.clamp(0, 1), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image of a batch (B, C, H, W) -> (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    out = structural_similarity_index_measure(pred.clamp(0, 1), target.clamp(0, 1),
                                              data_range=1.0, reduction="none")
    assert isinstance(out, torch.Tensor)
    return out


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean SSIM, differentiable (no clamping)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    out = structural_similarity_index_measure(pred, target, data_range=1.0)
    assert isinstance(out, torch.Tensor)
    return 1 - out


__all__ = ["psnr", "ssim", "ssim_loss"]
