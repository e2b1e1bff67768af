"""osr-reprogram: exact properties of the Fourier helpers and the modules, the module file
round trip, the weights hash, and the metrics against scikit-image. No training here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mergekit_pcb.io.safetensors_format import read_header
from mergekit_pcb.reprogram import FORMAT_VERSION
from mergekit_pcb.reprogram.demo import tiny_denoiser
from mergekit_pcb.reprogram.fourier import (
    amplitude,
    amplitude_phase,
    from_amplitude_phase,
    normalized_amplitude,
    resample_spectrum,
)
from mergekit_pcb.reprogram.frozen import weights_sha256
from mergekit_pcb.reprogram.metrics import psnr, ssim
from mergekit_pcb.reprogram.modules import (
    FDAModule,
    FourierModule,
    WaveModule,
    fda_transform,
    fourier_gain,
    mean_amplitude,
)
from mergekit_pcb.reprogram.store import load_module, save_module, state_equal


def camera(h: int = 32, w: int = 32, top: int = 200, left: int = 180) -> torch.Tensor:
    """A crop of scikit-image's camera photograph, (1, 1, h, w) float64 in [0, 1]."""
    img = skdata.camera()[top:top + h, left:left + w].astype(np.float64) / 255
    return torch.from_numpy(img)[None, None]


def non_dc(t: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(t.shape[-2:], dtype=torch.bool)
    mask[0, 0] = False
    return t[..., mask]


def test_amplitude_unchanged_by_circular_shift() -> None:
    x = camera(32, 40)
    for shift in ((3, 0), (0, 7), (5, -11), (31, 39)):
        shifted = torch.roll(x, shifts=shift, dims=(-2, -1))
        assert not torch.equal(shifted, x)
        torch.testing.assert_close(amplitude(shifted), amplitude(x), rtol=1e-12, atol=1e-12)


def test_constant_haze_scales_non_dc_amplitude_by_t() -> None:
    clean = camera(32, 24)
    h, w = clean.shape[-2:]
    for t, airlight in ((0.55, 0.85), (0.3, 1.0), (0.9, 0.2)):
        hazy = t * clean + airlight * (1 - t)
        a_hazy, a_clean = amplitude(hazy), amplitude(clean)
        torch.testing.assert_close(non_dc(a_hazy), t * non_dc(a_clean), rtol=1e-12,
                                   atol=1e-12)
        # the constant A(1 - t) moves DC only: orthonormal DC = sqrt(HW) · mean
        dc = t * clean.mean() + airlight * (1 - t)
        assert a_hazy[..., 0, 0].item() == pytest.approx(math.sqrt(h * w) * dc.item(),
                                                         rel=1e-12)
        assert (non_dc(a_hazy) - non_dc(a_clean)).abs().max() > 1e-3  # not a trivial case


def test_amplitude_phase_round_trip() -> None:
    x = camera(17, 23)
    amp, phase = amplitude_phase(x)
    torch.testing.assert_close(from_amplitude_phase(amp, phase), x, rtol=0, atol=1e-12)


def test_new_fourier_module_is_exact_identity() -> None:
    gen = torch.Generator().manual_seed(0)
    module = FourierModule(channels=3, bins=16)
    for h, w in ((32, 32), (48, 40), (31, 17)):
        x = torch.rand(2, 3, h, w, generator=gen)
        assert torch.equal(module.transform(x), x)
        assert torch.equal(module(x, lambda v: 2 * v), 2 * x)


def test_fda_band_zero_is_exact_identity() -> None:
    gen = torch.Generator().manual_seed(1)
    ref = torch.rand(3, 64, 64, generator=gen) * 10
    for h, w in ((32, 32), (48, 40)):
        x = torch.rand(2, 3, h, w, generator=gen)
        assert torch.equal(fda_transform(x, ref, 0.0), x)
    module = FDAModule(3, 64, beta=0.0)
    module.reference.copy_(ref)
    x = torch.rand(1, 3, 20, 28, generator=gen)
    assert torch.equal(module.transform(x), x)


def test_new_wave_module_returns_frozen_output() -> None:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    denoiser = tiny_denoiser(3, 8, 3).eval().requires_grad_(False)
    module = WaveModule(3, 8)
    x = torch.rand(2, 3, 24, 20, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(module(x, denoiser), denoiser(x), rtol=0, atol=1e-6)


def test_fourier_gain_on_a_cosine_matches_hand_computation() -> None:
    # one cosine of 4 cycles over 32 columns: radial frequency (4/32)/sqrt(0.5)
    cols = torch.arange(32, dtype=torch.float64)
    x = torch.cos(2 * math.pi * 4 * cols / 32).expand(32, 32)[None, None].clone()
    r = (4 / 32) / math.sqrt(0.5)
    gain = torch.tensor([[1.5, 0.5]], dtype=torch.float64)  # 1.5 at r = 0, 0.5 at r = 1
    offset = torch.tensor([0.25], dtype=torch.float64)
    expected = (1.5 * (1 - r) + 0.5 * r) * x + 0.25
    torch.testing.assert_close(fourier_gain(x, gain, offset), expected, rtol=0, atol=1e-12)


def test_fda_low_band_replaces_the_mean_by_the_reference_mean() -> None:
    # at 32×32 the lowest non-DC radial frequency is (1/32)/sqrt(0.5) = 0.044: with
    # β = 0.04 only DC is replaced, i.e. each channel's mean becomes the reference's
    x = camera(32, 32).repeat(1, 2, 1, 1)
    x[:, 1] = 0.5 * x[:, 1] + 0.1
    ref_images = [torch.full((2, 40, 40), 0.7, dtype=torch.float64),
                  torch.full((2, 40, 40), 0.3, dtype=torch.float64)]
    ref = mean_amplitude(ref_images, 16).double()
    torch.testing.assert_close(ref[:, 0, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    out = fda_transform(x, ref, 0.04)
    expected = x - x.mean(dim=(-2, -1), keepdim=True) + 0.5
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_resample_spectrum_to_its_own_grid_is_identity() -> None:
    spec = normalized_amplitude(camera(16, 16))[0]
    torch.testing.assert_close(resample_spectrum(spec, 16, 16), spec, rtol=0, atol=1e-12)


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return module


@pytest.mark.parametrize("mode", ["wave", "fourier", "fda"])
def test_module_round_trips_through_safetensors_bit_for_bit(mode: str, tmp_path: Path) -> None:
    torch.manual_seed(3)
    module = {"wave": lambda: WaveModule(3, 8), "fourier": lambda: FourierModule(3, 12),
              "fda": lambda: FDAModule(3, 16, beta=0.05)}[mode]()
    _perturbed(module, 4)
    path = tmp_path / "module.safetensors"
    save_module(path, module, "ab" * 32)
    loaded, meta = load_module(path)
    assert type(loaded) is type(module) and loaded.config() == module.config()
    assert state_equal(loaded, module)
    _, raw = read_header(path)
    assert raw["osr_format_version"] == FORMAT_VERSION and raw["mode"] == mode
    assert raw["frozen_sha256"] == "ab" * 32 and meta == raw
    x = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(5))
    f = tiny_denoiser(3, 8, 3).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, f), module(x, f))
    # saved again, the file is the same bytes
    path2 = tmp_path / "again.safetensors"
    save_module(path2, loaded, "ab" * 32)
    assert path2.read_bytes() == path.read_bytes()


def test_weights_hash_sees_every_bit_and_ignores_order() -> None:
    torch.manual_seed(0)
    a = tiny_denoiser(3, 8, 3)
    b = tiny_denoiser(3, 8, 3)
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        w = b.body[0].weight
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(math.inf))
    assert weights_sha256(a) != weights_sha256(b)
    # same tensors in another insertion order: same hash
    reordered = torch.nn.Module()
    for name, p in reversed(list(a.named_parameters())):
        reordered.register_parameter(name.replace(".", "_"), p)
    same = torch.nn.Module()
    for name, p in a.named_parameters():
        same.register_parameter(name.replace(".", "_"), p)
    assert weights_sha256(reordered) == weights_sha256(same)
    # dtype is part of the identity
    assert weights_sha256(a.double()) != weights_sha256(b)


def test_metrics_agree_with_scikit_image() -> None:
    gen = torch.Generator().manual_seed(7)
    clean = torch.from_numpy(skdata.astronaut()[100:164, 200:248].astype(np.float32) / 255)
    clean = clean.permute(2, 0, 1)[None]
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    ours_p, ours_s = float(psnr(noisy, clean)[0]), float(ssim(noisy, clean)[0])
    c, n = clean[0].double().numpy(), noisy[0].double().numpy()
    ref_p = peak_signal_noise_ratio(c, n, data_range=1.0)
    ref_s = structural_similarity(c, n, data_range=1.0, channel_axis=0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False)
    assert ours_p == pytest.approx(ref_p, abs=1e-4)
    assert ours_s == pytest.approx(ref_s, abs=1e-3)
    assert 0.2 < ours_s < 0.95 and 15 < ours_p < 30  # a non-trivial case
