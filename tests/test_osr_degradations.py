"""The demo's degradations (mergekit_pcb/reprogram/degradations.py): exact properties of
each, from the formulas, and their statistics on constant images. No training here."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_pcb.reprogram.degradations import (
    DEPTH_SPAN,
    HAZE_BETA,
    SINGLE,
    apply_haze,
    convolve,
    depth_map,
    haze_maps,
    jpeg,
    mixture,
    motion_kernel,
    noisy_low_light,
    signal_dependent_noise,
    spatial_haze,
)
from mergekit_pcb.reprogram.demo import DEGRADATIONS, photo


def assert_near(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    """|a - b| <= atol everywhere (torch.testing's first call costs seconds of imports)."""
    assert a.shape == b.shape and float((a.double() - b.double()).abs().max()) <= atol


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """Four 32×32 crops of scikit-image's astronaut, (4, 3, 32, 32) in [0, 1]."""
    img = photo("astronaut")
    return torch.stack([img[:, 40 * i:40 * i + 32, 60:92] for i in range(4)])


def test_haze_with_transmission_one_is_the_identity(crops: torch.Tensor) -> None:
    maps = haze_maps(4, 3, 32, 32, gen(0))
    ones = torch.ones_like(maps.transmission)
    assert torch.equal(apply_haze(crops, ones, maps.airlight), crops)
    # and t = 0 gives the airlight alone
    assert torch.equal(apply_haze(crops, torch.zeros_like(ones), maps.airlight), maps.airlight)


def test_haze_maps_are_fixed_by_the_seed_and_differ_per_image() -> None:
    a, b, c = haze_maps(3, 3, 24, 20, gen(5)), haze_maps(3, 3, 24, 20, gen(5)), \
        haze_maps(3, 3, 24, 20, gen(6))
    for name in ("depth", "transmission", "airlight"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.allclose(getattr(a, name), getattr(c, name))
    assert not torch.allclose(a.depth[0], a.depth[1])  # each image its own depth


def test_haze_transmission_is_exp_of_depth_and_spatially_varying() -> None:
    m = haze_maps(8, 3, 32, 32, gen(1))
    assert float(m.depth.min()) >= 0.0 and float(m.depth.max()) <= 1.0 + 1e-6
    # t = exp(-β·d): β = -log(t)/d is one number per image, in HAZE_BETA
    beta = -torch.log(m.transmission) / m.depth.clamp_min(1e-3)
    far = m.depth > 0.05
    for i in range(8):
        b = beta[i][far[i]]
        assert float(b.max() - b.min()) < 1e-3 * float(b.mean())
        assert HAZE_BETA[0] <= float(b.mean()) <= HAZE_BETA[1]
        # the depth varies across the image by the drawn span
        spread = float(m.depth[i].max() - m.depth[i].min())
        assert DEPTH_SPAN[0] - 1e-6 <= spread <= DEPTH_SPAN[1] + 1e-6
        assert float(m.transmission[i].max() - m.transmission[i].min()) > 0.02
    # the airlight varies over the image and is tinted per channel
    assert float(m.airlight.std(dim=(-2, -1)).min()) > 0.01
    assert float((m.airlight[:, 0] - m.airlight[:, 2]).abs().mean()) > 1e-3


def test_spatial_haze_is_no_global_affine_map(crops: torch.Tensor) -> None:
    hazy = spatial_haze(crops, gen(2))
    for i in range(len(crops)):
        x, y = crops[i].reshape(-1), hazy[i].reshape(-1)
        design = torch.stack([x, torch.ones_like(x)], dim=1).double()
        sol = torch.linalg.lstsq(design, y.double()[:, None]).solution
        residual = (design @ sol)[:, 0] - y.double()
        assert float(residual.abs().mean()) > 0.01  # an affine fit leaves a real error


def test_depth_map_is_in_unit_range_and_reproducible() -> None:
    a, b = depth_map(2, 16, 24, gen(3)), depth_map(2, 16, 24, gen(3))
    assert a.shape == (2, 1, 16, 24) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 + 1e-6
    assert not torch.equal(a, depth_map(2, 16, 24, gen(4)))


def test_signal_dependent_noise_statistics() -> None:
    """On constant images: mean s, variance s / photons + read² (a sample of 100k pixels:
    relative error of a variance estimate ~ sqrt(2/n) = 0.45 %; bounds at 3 %)."""
    for level, photons, read in ((0.05, 200.0, 0.01), (0.2, 400.0, 0.02), (0.5, 100.0, 0.0)):
        s = torch.full((4, 1, 125, 200), level, dtype=torch.float64)
        y = signal_dependent_noise(s, torch.full((4,), photons), read, gen(4))
        expected = level / photons + read ** 2
        assert float(y.mean()) == pytest.approx(level, abs=4 * math.sqrt(expected / y.numel()))
        assert float(y.var()) == pytest.approx(expected, rel=0.03)


def test_low_light_darkens_and_is_seeded(crops: torch.Tensor) -> None:
    a, b = noisy_low_light(crops, gen(9)), noisy_low_light(crops, gen(9))
    assert torch.equal(a, b)
    assert float(a.mean()) < 0.25 * float(crops.mean())
    assert float(a.min()) >= 0 and float(a.max()) <= 1


@pytest.mark.parametrize(("length", "angle"), [(5.0, 0.0), (7.0, math.pi / 2),
                                               (6.0, math.pi / 4), (3.5, 2.0)])
def test_motion_kernel_is_a_normalized_centred_line(length: float, angle: float) -> None:
    k = motion_kernel(length, angle).double()
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    # centred: its centre of mass is the middle pixel; a line through it is point-symmetric
    idx = torch.arange(k.shape[0], dtype=torch.float64)
    assert float((k.sum(1) * idx).sum()) == pytest.approx(5.0, abs=1e-6)
    assert float((k.sum(0) * idx).sum()) == pytest.approx(5.0, abs=1e-6)
    assert_near(k, k.flip(0, 1), 1e-6)
    # its second moment along the line: that of n = 16·length + 1 evenly spaced points,
    # length²/12·(n + 1)/(n - 1), plus the bilinear splat's own variance, at most 1/4
    ys, xs = torch.meshgrid(idx - 5, idx - 5, indexing="ij")
    along = xs * math.cos(angle) + ys * math.sin(angle)
    n = int(16 * length) + 1
    segment = length ** 2 / 12 * (n + 1) / (n - 1)
    assert segment <= float((k * along ** 2).sum()) <= segment + 0.25


def test_motion_kernel_of_length_zero_is_the_identity(crops: torch.Tensor) -> None:
    k = motion_kernel(0.0, 0.7)
    assert float(k[5, 5]) == 1.0 and float(k.sum()) == 1.0
    assert torch.equal(convolve(crops, k), crops)


def test_horizontal_motion_blur_matches_a_hand_computed_average() -> None:
    x = torch.rand(1, 1, 9, 15, generator=gen(11), dtype=torch.float64).float()
    # 33 points s = i/16, i = -16..16, splatted bilinearly: the centre pixel gets
    # Σ(1 - |s|)/33 = 16/33, each neighbour Σ_{i>0} (i/16)/33 = 17/66
    k = motion_kernel(2.0, 0.0)
    side, mid = 17 / 66, 16 / 33
    assert_near(k[5, 4:7], torch.tensor([side, mid, side]), 1e-6)
    assert float(k.sum() - k[5, 4:7].sum()) == 0.0
    out = convolve(x, k)
    ref = side * x[..., 3:-3, 2:-4] + mid * x[..., 3:-3, 3:-3] + side * x[..., 3:-3, 4:-2]
    assert_near(out[..., 3:-3, 3:-3], ref, 1e-6)


def test_jpeg_quality_100_is_close_to_identity_and_quality_orders_error(
        crops: torch.Tensor) -> None:
    """Quality 100 (4:2:0 chroma, as Pillow's default) stays above 38 dB on these photo
    crops; lower qualities lose more."""
    def mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
        return float((10 * torch.log10(1 / mse)).mean())

    q = {quality: mean_psnr(jpeg(crops, quality), crops) for quality in (10, 30, 70, 100)}
    assert q[100] > 38.0
    assert q[10] < q[30] < q[70] < q[100]
    grey = crops[:, :1]
    assert jpeg(grey, 90).shape == grey.shape


def test_every_degradation_is_seeded_and_keeps_the_shape(crops: torch.Tensor) -> None:
    assert set(DEGRADATIONS) == {*SINGLE, "mixture"}
    for name, fn in DEGRADATIONS.items():
        a, b = fn(crops, gen(0)), fn(crops, gen(0))
        assert a.shape == crops.shape and torch.equal(a, b), name
        assert float((a - crops).abs().mean()) > 0.01, name


def test_mixture_applies_one_single_degradation_per_image(crops: torch.Tensor) -> None:
    """Replaying the generator: each image equals one of SINGLE applied to it alone."""
    out = mixture(crops, gen(3))
    g = gen(3)
    picks = torch.randint(len(SINGLE), (len(crops),), generator=g)
    fns = list(SINGLE.values())
    for i, k in enumerate(picks):
        assert torch.equal(out[i:i + 1], fns[int(k)](crops[i:i + 1], g))
