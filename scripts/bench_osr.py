"""osr-reprogram at a larger scale: every mode on every degradation, held-out PSNR / SSIM
of the frozen model alone and reprogrammed, with the training time of each row.

    python scripts/bench_osr.py                      # about 3 minutes on 2 cores
    python scripts/bench_osr.py --train 1024 --steps 600 --modes wave

The frozen model is the demo's tiny residual denoiser (`mergekit_pcb.reprogram.demo`),
trained on Gaussian noise σ = 0.1 only; the degradations are those it never saw (σ = 0.2
noise, haze I = tJ + A(1 - t), low light, Gaussian blur). Patches (32×32) are cut from
disjoint scikit-image photographs: modules train on the training photographs, are selected
(early stopping; fda's β) on the validation ones and scored on the held-out ones.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergekit_pcb.reprogram.config import Parameters
from mergekit_pcb.reprogram.data import PairSet
from mergekit_pcb.reprogram.demo import (
    DEGRADATIONS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    VALIDATION_IMAGES,
    degrade,
    patches,
    train_denoiser,
)
from mergekit_pcb.reprogram.frozen import FrozenModel, weights_sha256
from mergekit_pcb.reprogram.modules import (
    FDAModule,
    FourierModule,
    ReprogramModule,
    WaveModule,
    mean_amplitude,
)
from mergekit_pcb.reprogram.train import choose_beta, evaluate, train_module

LR = {"wave": 2e-3, "fourier": 2e-2}


def pairs(degraded: torch.Tensor, clean: torch.Tensor) -> PairSet:
    return PairSet([f"{i:05d}" for i in range(len(clean))], list(degraded), list(clean))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=512, help="training patches")
    ap.add_argument("--validation", type=int, default=96, help="validation patches")
    ap.add_argument("--test", type=int, default=192, help="held-out patches")
    ap.add_argument("--steps", type=int, default=300, help="training steps (wave, fourier)")
    ap.add_argument("--denoiser-steps", type=int, default=600)
    ap.add_argument("--modes", default="wave,fourier,fda")
    ap.add_argument("--degradations", default=",".join(DEGRADATIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed = args.seed
    clean = {"train": patches(TRAIN_IMAGES, 32, args.train, seed),
             "validation": patches(VALIDATION_IMAGES, 32, args.validation, seed + 1),
             "test": patches(TEST_IMAGES, 32, args.test, seed + 2)}
    t0 = time.perf_counter()
    model = train_denoiser(clean["train"], steps=args.denoiser_steps, batch=16, seed=seed)
    model.requires_grad_(False)
    frozen = FrozenModel(model, weights_sha256(model), "tiny denoiser")
    print(f"denoiser: {args.denoiser_steps} steps in {time.perf_counter() - t0:.1f}s; "
          f"patches train {len(clean['train'])}, validation {len(clean['validation'])}, "
          f"held-out {len(clean['test'])}", file=sys.stderr)
    rows = []
    for d_index, kind in enumerate(args.degradations.split(",")):
        split = {name: pairs(*_pair(c, kind, seed + 10 * d_index + i))
                 for i, (name, c) in enumerate(clean.items())}
        base = evaluate(None, frozen, split["test"])
        for mode in args.modes.split(","):
            torch.manual_seed(seed)
            module: ReprogramModule
            start = time.perf_counter()
            if mode == "fda":
                module = FDAModule(3, 64)
                module.reference.copy_(mean_amplitude(split["train"].clean, 64))
                result = choose_beta(module, frozen, split["validation"],
                                     [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
                chosen = f"β = {result.beta:g}"
            else:
                module = WaveModule(3, 16) if mode == "wave" else FourierModule(3, 16)
                params = Parameters(mode=mode, steps=args.steps, batch_size=8, crop=32,
                                    lr=LR[mode], eval_every=25, patience=4)
                result = train_module(module, frozen, split["train"], split["validation"],
                                      params, seed)
                chosen = f"step {result.best_step}/{result.steps_run}"
            seconds = time.perf_counter() - start
            ours = evaluate(module, frozen, split["test"])
            assert weights_sha256(frozen.module) == frozen.sha256
            rows.append((kind, mode, base.psnr, ours.psnr, base.ssim, ours.ssim, chosen,
                         seconds))
            print(f"{kind:9s} {mode:8s} {base.psnr:6.2f} -> {ours.psnr:6.2f} dB "
                  f"({chosen}, {seconds:.1f}s)", file=sys.stderr)
    print("| degradation | mode | frozen PSNR | reprogrammed PSNR | gain (dB) | frozen SSIM | "
          "reprogrammed SSIM | selected on validation | training time |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for kind, mode, bp, rp, bs, rs, chosen, seconds in rows:
        print(f"| {kind} | {mode} | {bp:.2f} | {rp:.2f} | {rp - bp:+.2f} | {bs:.3f} | "
              f"{rs:.3f} | {chosen} | {seconds:.1f} s |")


def _pair(clean: torch.Tensor, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = degrade(clean, kind, seed)
    return s.degraded, s.clean


if __name__ == "__main__":
    main()
