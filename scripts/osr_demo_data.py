"""Write the data and the frozen model that the `recipes/osr-*.yaml` recipes read.

    python scripts/osr_demo_data.py                # writes ./osr-demo
    pcbmerge run recipes/osr-wave.yaml -o osr-wave --trust-code
    pcbmerge restore --model recipes/osr-wave.yaml --module osr-wave --trust-code \\
        osr-demo/lowlight/test/degraded osr-wave-restored

Contents of the folder (default `osr-demo`):
- `denoiser.safetensors`: the frozen restorer, `mergekit_pcb.reprogram.demo:tiny_denoiser`
  (width 32, depth 5) trained on blind Gaussian denoising only (σ in [0, 0.2]); trained
  once (a few minutes on one core) and cached in `.bench/osr/restorer.safetensors`, which
  `scripts/bench_osr.py` shares;
- `<degradation>/<split>/{degraded,clean}/NNNN.png` for the degradations it never saw
  (`mergekit_pcb.reprogram.degradations`: haze, lowlight, motion, jpeg, mixture) and the
  splits train, validation and test, cut as 48×48 patches from disjoint photographs per
  split (see `mergekit_pcb.reprogram.demo`).
Everything is seeded: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mergekit_pcb.reprogram.data import write_image  # noqa: E402
from mergekit_pcb.reprogram.demo import (  # noqa: E402
    DEGRADATIONS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    VALIDATION_IMAGES,
    degrade,
    patches,
    restorer,
)

SPLIT_IMAGES = {"train": TRAIN_IMAGES, "validation": VALIDATION_IMAGES, "test": TEST_IMAGES}
PATCH = 48  # as scripts/bench_osr.py: the same patches, the same restorer


def write_demo(out: Path, cache: Path | None, *, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = {split: patches(names, PATCH, 10_000, seed + i)
             for i, (split, names) in enumerate(SPLIT_IMAGES.items())}
    src = cache if cache is not None else out / "restorer-cache.safetensors"
    restorer(clean["train"], src, seed=seed)  # trains, or reads the cached one back
    shutil.copyfile(src, out / "denoiser.safetensors")
    for k, kind in enumerate(DEGRADATIONS):
        for i, split in enumerate(SPLIT_IMAGES):
            # the seeds of scripts/bench_osr.py: the same degraded patches
            pair = degrade(clean[split], kind, 1000 * (k + 1) + i)
            for sub, images in (("degraded", pair.degraded), ("clean", pair.clean)):
                folder = out / kind / split / sub
                folder.mkdir(parents=True, exist_ok=True)
                for n, img in enumerate(images):
                    write_image(folder / f"{n:04d}.png", img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("osr-demo"))
    ap.add_argument("--cache", type=Path, default=REPO / ".bench" / "osr" / "restorer.safetensors",
                    help="the trained restorer, reused when trained with the same settings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    start = time.perf_counter()
    write_demo(args.out, args.cache, seed=args.seed)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    torch.set_num_threads(1)  # faster than 2 threads on a shared machine
    main()
