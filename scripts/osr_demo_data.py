"""Write the data and the frozen model that the `recipes/osr-*.yaml` recipes read.

    python scripts/osr_demo_data.py                # writes ./osr-demo
    pcbmerge run recipes/osr-wave.yaml -o osr-wave --trust-code
    pcbmerge restore --model recipes/osr-wave.yaml --module osr-wave --trust-code \\
        osr-demo/haze/test/degraded osr-wave-restored

Contents of the folder (default `osr-demo`):
- `denoiser.safetensors`: the frozen model, `mergekit_pcb.reprogram.demo:tiny_denoiser`
  (width 16, depth 3) trained on Gaussian noise σ = 0.1 only;
- `<degradation>/<split>/{degraded,clean}/NNNN.png` for the degradations it never saw
  (noise σ = 0.2, haze, lowlight, blur) and the splits train, validation and test, cut as
  32×32 patches from disjoint scikit-image photographs per split (see
  `mergekit_pcb/reprogram/demo.py`).
Everything is seeded: the same command writes the same files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergekit_pcb.reprogram.data import write_image
from mergekit_pcb.reprogram.demo import (
    DEGRADATIONS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    VALIDATION_IMAGES,
    degrade,
    patches,
    train_denoiser,
)

SPLIT_IMAGES = {"train": TRAIN_IMAGES, "validation": VALIDATION_IMAGES, "test": TEST_IMAGES}


def write_demo(out: Path, *, counts: dict[str, int], size: int = 32, seed: int = 0,
               denoiser_steps: int = 300) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = {split: patches(names, size, counts[split], seed + i)
             for i, (split, names) in enumerate(SPLIT_IMAGES.items())}
    model = train_denoiser(clean["train"], steps=denoiser_steps, batch=16, seed=seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "denoiser.safetensors"))
    for k, kind in enumerate(DEGRADATIONS):
        for i, split in enumerate(SPLIT_IMAGES):
            pair = degrade(clean[split], kind, seed + 100 * (k + 1) + i)
            for sub, images in (("degraded", pair.degraded), ("clean", pair.clean)):
                folder = out / kind / split / sub
                folder.mkdir(parents=True, exist_ok=True)
                for n, img in enumerate(images):
                    write_image(folder / f"{n:04d}.png", img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("osr-demo"))
    ap.add_argument("--train", type=int, default=128, help="training patches")
    ap.add_argument("--validation", type=int, default=32, help="validation patches")
    ap.add_argument("--test", type=int, default=64, help="held-out patches")
    ap.add_argument("--size", type=int, default=32, help="patch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--denoiser-steps", type=int, default=300)
    args = ap.parse_args()
    start = time.perf_counter()
    write_demo(args.out, counts={"train": args.train, "validation": args.validation,
                                 "test": args.test},
               size=args.size, seed=args.seed, denoiser_steps=args.denoiser_steps)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    torch.set_num_threads(min(4, torch.get_num_threads()))
    main()
