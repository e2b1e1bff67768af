"""osr-reprogram on real photographs (packaged sample images cut into 32×32 patches): a
tiny denoiser trained on Gaussian noise σ = 0.1 is reprogrammed for degradations it never
saw (spatially varying haze, noisy low light, noisy motion blur). Modules train on TRAIN
photographs, are selected on VALIDATION ones and scored on TEST ones: three disjoint sets
of photographs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from mergekit_pcb.reprogram.config import Parameters
from mergekit_pcb.reprogram.data import PairSet
from mergekit_pcb.reprogram.degradations import noisy_low_light
from mergekit_pcb.reprogram.demo import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    VALIDATION_IMAGES,
    Split,
    add_noise,
    degrade,
    patches,
    photo,
    train_denoiser,
)
from mergekit_pcb.reprogram.frozen import FrozenModel, weights_sha256
from mergekit_pcb.reprogram.metrics import psnr
from mergekit_pcb.reprogram.modules import (
    FDAModule,
    FourierModule,
    ReprogramModule,
    WaveModule,
    mean_amplitude,
)
from mergekit_pcb.reprogram.train import Scores, TrainResult, choose_beta, evaluate, train_module

KINDS = ("haze", "lowlight", "motion")
PARAMS = Parameters(mode="wave", steps=60, batch_size=8, crop=32, lr=3e-3, eval_every=20,
                    patience=3, hidden=16)


@dataclass
class World:
    frozen: FrozenModel
    hash_before: str
    clean: dict[str, torch.Tensor]


@dataclass
class Outcome:
    module: ReprogramModule
    result: TrainResult
    frozen: Scores
    reprogrammed: Scores


def pairs(split: Split) -> PairSet:
    return PairSet([f"{i:04d}" for i in range(len(split.clean))], list(split.degraded),
                   list(split.clean))


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread (the suite shares the machine), then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world() -> World:
    clean = {"train": patches(TRAIN_IMAGES, 32, 128, seed=0),
             "validation": patches(VALIDATION_IMAGES, 32, 32, seed=1),
             "test": patches(TEST_IMAGES, 32, 48, seed=2)}
    with one_thread():
        model = train_denoiser(clean["train"], steps=150, batch=8, seed=0)
    model.requires_grad_(False)
    return World(FrozenModel(model, weights_sha256(model), "tiny denoiser"),
                 weights_sha256(model), clean)


def _splits(world: World, kind: str) -> dict[str, PairSet]:
    return {name: pairs(degrade(c, kind, seed=10 + i))
            for i, (name, c) in enumerate(world.clean.items())}


@pytest.fixture(scope="session")
def outcomes(world: World) -> dict[str, Outcome]:
    out = {}
    for kind in KINDS:
        s = _splits(world, kind)
        torch.manual_seed(0)
        module = WaveModule(3, PARAMS.hidden)
        with one_thread():
            result = train_module(module, world.frozen, s["train"], s["validation"], PARAMS, 0)
        out[kind] = Outcome(module, result, evaluate(None, world.frozen, s["test"]),
                            evaluate(module, world.frozen, s["test"]))
    return out


def test_splits_are_disjoint_photographs() -> None:
    names = [TRAIN_IMAGES, VALIDATION_IMAGES, TEST_IMAGES]
    assert sum(len(n) for n in names) == len(set().union(*names))


def test_frozen_denoiser_works_on_its_own_noise(world: World) -> None:
    gen = torch.Generator().manual_seed(99)
    test = world.clean["test"]
    noisy = Split(add_noise(test, 0.1, gen), test)
    identity = FrozenModel(torch.nn.Identity(), "", "identity")
    assert evaluate(None, world.frozen, pairs(noisy)).psnr > \
        evaluate(None, identity, pairs(noisy)).psnr + 3


@pytest.mark.parametrize("kind", ["haze", "lowlight"])
def test_wave_gains_half_a_db_on_unseen_degradations(outcomes: dict[str, Outcome],
                                                     kind: str) -> None:
    o = outcomes[kind]
    assert o.reprogrammed.psnr >= o.frozen.psnr + 0.5, (o.frozen, o.reprogrammed)
    assert o.reprogrammed.ssim > o.frozen.ssim
    assert o.result.best_step > 0  # selected on validation, after training


def test_wave_is_not_worse_on_motion_blur(outcomes: dict[str, Outcome]) -> None:
    o = outcomes["motion"]
    assert o.reprogrammed.psnr >= o.frozen.psnr, (o.frozen, o.reprogrammed)


def test_frozen_weights_unchanged_and_without_gradients(world: World,
                                                        outcomes: dict[str, Outcome]) -> None:
    assert len(outcomes) == len(KINDS)
    assert weights_sha256(world.frozen.module) == world.hash_before
    for p in world.frozen.module.parameters():
        assert not p.requires_grad and p.grad is None


def test_early_stopping_keeps_the_best_validation_state(world: World,
                                                         outcomes: dict[str, Outcome]) -> None:
    o = outcomes["haze"]
    best = max(h["val_psnr"] for h in o.result.history)
    assert o.result.best_val_psnr == pytest.approx(best, abs=1e-4)
    val = _splits(world, "haze")["validation"]
    assert evaluate(o.module, world.frozen, val).psnr == pytest.approx(best, abs=1e-3)


def test_modules_trained_on_32px_patches_apply_to_48x40(world: World,
                                                         outcomes: dict[str, Outcome]) -> None:
    # 48×40 crops of test photographs, darkened and noised as the low-light split
    clean = torch.stack([photo(name)[:, 60:108, 70:110]
                         for name in ("rocket", "camera", "coins", "sklearn:flower")])
    dark = noisy_low_light(clean, torch.Generator().manual_seed(3))
    s = _splits(world, "lowlight")
    torch.manual_seed(0)
    fourier = FourierModule(3, 16)
    train_module(fourier, world.frozen, s["train"], s["validation"],
                 PARAMS.model_copy(update={"mode": "fourier", "lr": 0.02}), 0)
    fda = FDAModule(3, 64)
    fda.reference.copy_(mean_amplitude(list(world.clean["train"]), 64))
    choose_beta(fda, world.frozen, s["validation"], [0.0, 0.05, 0.1, 0.2])
    with torch.no_grad():
        base = float(psnr(world.frozen(dark), clean).mean())
        for module, gain in ((outcomes["lowlight"].module, 0.5), (fourier, 0.5), (fda, 0.0)):
            out = module(dark, world.frozen)
            assert out.shape == (4, 3, 48, 40)
            assert float(psnr(out, clean).mean()) >= base + gain, module.mode
