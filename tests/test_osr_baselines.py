"""The baselines of the OSR benchmark (scripts/osr_baselines.py): the global fits recover
known parameters from exact synthetic data, the same-size CNN has exactly the module's
trainable parameter count, fine-tuning leaves the frozen model untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from osr_baselines import (  # noqa: E402
    IDENTITY,
    FineTune,
    ResidualCNN,
    cnn_count,
    fit_affine,
    fit_filter,
    fit_gain_gamma,
    same_size_cnn,
    same_size_widths,
    trainable_count,
)

from mergekit_pcb.reprogram.demo import tiny_denoiser  # noqa: E402
from mergekit_pcb.reprogram.frozen import weights_sha256  # noqa: E402
from mergekit_pcb.reprogram.modules import FourierModule, WaveModule  # noqa: E402


def err(fitted: torch.Tensor, known: torch.Tensor) -> float:
    """The largest absolute difference (shapes must agree)."""
    assert fitted.shape == known.shape
    return float((fitted.double() - known.double()).abs().max())


def images(n: int = 6, c: int = 3, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n, c, size, size, generator=g) * 0.9 + 0.05)


def test_affine_fit_recovers_gain_and_offset_per_channel() -> None:
    x = images()
    a, b = torch.tensor([1.82, 0.5, 2.0]), torch.tensor([-0.7, 0.1, 0.0])
    y = [a.view(-1, 1, 1) * im + b.view(-1, 1, 1) for im in x]
    fit = fit_affine(x, y)
    assert err(fit.params["a"], a) < 1e-5
    assert err(fit.params["b"], b) < 1e-5
    assert err(fit(torch.stack(x)), torch.stack(y)) < 1e-5


def test_gain_gamma_fit_recovers_known_parameters() -> None:
    x = images(seed=1)
    gain, gamma = torch.tensor([2.02, 0.8, 1.3]), torch.tensor([0.667, 1.5, 1.0])
    y = [gain.view(-1, 1, 1) * im ** gamma.view(-1, 1, 1) for im in x]
    fit = fit_gain_gamma(x, y)
    assert err(fit.params["gain"], gain) < 1e-4
    assert err(fit.params["gamma"], gamma) < 1e-4


def test_gain_gamma_fit_minimizes_squared_error_with_noise() -> None:
    """With noise on y, the least-squares optimum: a perturbed (g, γ) never does better."""
    x = images(seed=2)
    g = torch.Generator().manual_seed(3)
    y = [1.5 * im ** 1.4 + 0.02 * torch.randn(im.shape, generator=g) for im in x]
    fit = fit_gain_gamma(x, y)
    xs, ys = torch.stack(x).double(), torch.stack(y).double()

    def sse(gn: torch.Tensor, gm: torch.Tensor) -> float:
        return float(((gn.view(1, -1, 1, 1) * xs ** gm.view(1, -1, 1, 1) - ys) ** 2).sum())

    best = sse(fit.params["gain"].double(), fit.params["gamma"].double())
    for dg, dm in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        assert sse(fit.params["gain"].double() + dg, fit.params["gamma"].double() + dm) > best


def test_filter_fit_recovers_a_known_convolution() -> None:
    x = images(n=4, size=20, seed=4)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(3, 3, 5, 5, generator=g) * 0.1
    bias = torch.tensor([0.1, -0.2, 0.05])
    y = [F.conv2d(F.pad(im[None], (2, 2, 2, 2), mode="reflect"), weight, bias)[0] for im in x]
    fit = fit_filter(x, y, size=5)
    assert err(fit.params["weight"], weight) < 1e-4
    assert err(fit.params["bias"], bias) < 1e-4
    assert fit.describe() == "5×5 linear filter"


@pytest.mark.parametrize("hidden", [4, 8, 16, 32])
def test_same_size_cnn_has_the_wave_modules_trainable_parameter_count(hidden: int) -> None:
    module = WaveModule(3, hidden)
    cnn = same_size_cnn(module)
    assert trainable_count(cnn) == trainable_count(module)
    assert cnn_count(3, cnn.widths) == trainable_count(cnn.net)  # the formula, checked
    x = torch.rand(2, 3, 12, 12)
    assert torch.equal(cnn(x, IDENTITY), x)  # starts as the identity, like the modules


def test_same_size_widths_are_exact_or_refused() -> None:
    assert cnn_count(3, same_size_widths(3095)) == 3095
    assert trainable_count(ResidualCNN(3, (12, 20, 12))) == cnn_count(3, (12, 20, 12))
    with pytest.raises(ValueError, match="exactly 5 parameters"):
        same_size_widths(5)
    assert trainable_count(FourierModule(3, 16)) == 51


def test_fine_tuning_trains_a_copy_and_leaves_the_frozen_model_untouched() -> None:
    torch.manual_seed(0)
    frozen = tiny_denoiser(3, 8, 2).requires_grad_(False)
    before = weights_sha256(frozen)
    tuned = FineTune(frozen)
    assert trainable_count(tuned) == sum(p.numel() for p in frozen.parameters())
    x = torch.rand(2, 3, 8, 8)
    loss = (tuned(x, IDENTITY) - 0.5).pow(2).mean()
    loss.backward()
    with torch.no_grad():  # one SGD step by hand (torch.optim's first use imports for seconds)
        for p in tuned.parameters():
            p -= 0.1 * p.grad
    assert weights_sha256(frozen) == before
    assert weights_sha256(tuned.net) != before
