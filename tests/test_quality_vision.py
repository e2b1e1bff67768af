"""The vision family of the merge-quality benchmark (scripts/quality_vision.py and its fitness
scripts/quality_fitness_vision.py) on tiny stand-ins: a small random EfficientNet-Lite,
fake photos and rendered images; no data package is read."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import quality_fitness as qf  # noqa: E402
import quality_fitness_vision as qfv  # noqa: E402
import quality_vision as qv  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# A 3-class EfficientNet-Lite0 at a quarter width and minimal depth: ~0.3M parameters.
TINY = {"library": "efficientnet_lite_pytorch", "architecture": "efficientnet-lite0",
        "overrides": {"image_size": 32, "width_coefficient": 0.25, "depth_coefficient": 0.1,
                      "num_classes": 3}}
N = {"train": 30, "select": 12, "test": 12}


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = qfv.build_network(TINY)
    # Non-trivial BatchNorm statistics, so that eval-mode normalisation matters.
    for name, t in net.state_dict().items():
        if name.endswith("running_mean"):
            t.normal_(0, 0.1)
        elif name.endswith("running_var"):
            t.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in net.state_dict().items()}


def fake_photos(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {f"p{i}": g.integers(0, 256, size=(200, 150, 3), dtype=np.uint8) for i in range(3)}


def test_synthetic_splits_fixed_by_seed_and_disjoint() -> None:
    a = qv.build_task("shapes", N, seed=0)
    b = qv.build_task("shapes", N, seed=0)
    c = qv.build_task("shapes", N, seed=1)
    for split in qv.SPLITS:
        assert a[split][0] == b[split][0]
        assert torch.equal(a[split][1], b[split][1]) and torch.equal(a[split][2], b[split][2])
        assert not torch.equal(a[split][1], c[split][1])
        # Balanced: N[split] // 6 per class.
        assert a[split][2].bincount().tolist() == [N[split] // 6] * 6
    # No drawing in two splits (each image compared by its bytes).
    seen = [{bytes(img.numpy()) for img in a[s][1]} for s in qv.SPLITS]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_count_task_draws_the_labelled_number_of_discs() -> None:
    """Each count image holds label + 1 discs: connected components of the non-background
    colours (discs keep 2 px apart, so they never touch)."""
    from scipy import ndimage

    g = np.random.default_rng(3)
    for y in range(5):
        img = qv.render_count(y, g)
        # Background is its colour ± noise (σ 12); discs are ≥ 80 away on average.
        bg = np.median(img.reshape(-1, 3), axis=0)
        fg = np.abs(img - bg).mean(2) > 55
        assert ndimage.label(fg)[1] == y + 1


def test_indexed_task_rows_disjoint_and_fixed() -> None:
    g = np.random.default_rng(0)
    images = g.integers(0, 256, size=(90, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 30)
    def to_images(a: np.ndarray) -> torch.Tensor:
        return qv.resize(np.repeat(a[:, None], 3, axis=1))
    def build(seed: int) -> dict[str, Any]:
        return qv.indexed_task("t", ["a", "b", "c"], {"s": (images, labels)},
                               {s: "s" for s in qv.SPLITS}, N, np.random.default_rng(seed),
                               to_images)
    a, b = build(5), build(5)
    ids = {s: set(a[s][0]) for s in qv.SPLITS}
    assert not (ids["train"] & ids["select"]) and not (ids["train"] & ids["test"])
    assert not (ids["select"] & ids["test"])
    assert all(a[s][0] == b[s][0] for s in qv.SPLITS)
    # Labels follow the rows: row i of the source has label i // 30.
    for s in qv.SPLITS:
        rows = [int(i.rsplit("/", 1)[1]) for i in a[s][0]]
        assert a[s][2].tolist() == [r // 30 for r in rows]
    assert build(6)["test"][0] != a["test"][0]


def test_patch_splits_use_disjoint_cells() -> None:
    photos = fake_photos(0)
    built = qv.patch_task("scenes", list(photos), photos, 24, N, np.random.default_rng(1))
    again = qv.patch_task("scenes", list(photos), photos, 24, N, np.random.default_rng(1))
    for cells in built["cells"].values():
        sets = {s: {tuple(c) for c in cells[s]} for s in qv.SPLITS}
        assert not (sets["train"] & sets["select"]) and not (sets["train"] & sets["test"])
        assert not (sets["select"] & sets["test"])
        # 8 × 6 = 48 cells of 24 px in a 200 × 150 photo: select and test round(0.2 × 48).
        assert [len(sets[s]) for s in ("train", "select", "test")] == [28, 10, 10]
    for split in qv.SPLITS:
        assert built[split][0] == again[split][0]
        assert torch.equal(built[split][1], again[split][1])
        for pid, y in zip(built[split][0], built[split][2].tolist(), strict=True):
            _, photo, where, label = pid.split("/")
            corner = tuple(int(v) for v in where.split("+")[0].split(","))
            assert corner in {tuple(c) for c in built["cells"][photo][split]}
            assert photo == label == list(photos)[y]
            # Inside its cell: offset + side within the cell's 24 px.
            oy, ox, side = (int(v) for v in where.split("+")[1].split(","))
            assert side + 1 >= 0.6 * 24 and oy + side <= 24 and ox + side <= 24


def test_stripes_run_at_the_labelled_angle() -> None:
    """The 2-D spectrum's peak (mean colour removed) lies along the stripes' normal: at
    y × 45° + 90° from the horizontal crest direction, within the ± 8° jitter and the
    frequency grid's resolution."""
    g = np.random.default_rng(4)
    for y in range(4):
        for _ in range(3):
            img = qv.render_stripes(y, g).mean(2)
            spec = np.abs(np.fft.fftshift(np.fft.fft2(img - img.mean())))
            spec[qv.SIZE // 2, qv.SIZE // 2] = 0
            fy, fx = np.unravel_index(int(spec.argmax()), spec.shape)
            # Frequency vector (fx, fy) is the normal (sin a, cos a): a = atan2(fx, fy).
            a = np.degrees(np.arctan2(fx - qv.SIZE // 2, fy - qv.SIZE // 2)) % 180
            diff = min(abs(a - 45 * y), 180 - abs(a - 45 * y))
            assert diff <= 8 + 14, (y, a)  # ± 8° jitter, ≥ 2 cycles: grid step ≤ ~14°


def write_work(root: Path, task_count: int = 2, seed: int = 0) -> dict[str, Any]:
    """A tiny work dir: the base, select/test/train files of random images, heads = the
    tiny net's own classifier (so the fitness can be checked against its forward)."""
    base_state = tiny_state(seed)
    qv.prepare_base(root, TINY, base_state)
    g = torch.Generator().manual_seed(seed)
    built = {}
    for t in range(task_count):
        parts = {}
        for s in qv.SPLITS:
            n = N[s]
            parts[s] = ([f"t{t}/{s}/{i}" for i in range(n)],
                        torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                        torch.randint(0, 3, (n,), generator=g))
        built[f"t{t}"] = {"labels": ["a", "b", "c"], **parts}
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "heads").mkdir(parents=True, exist_ok=True)
    for part in qv.SPLITS:
        qv.write_split_file(root / "data" / f"{part}.safetensors", built, part)
    for t in built:
        save_file({"weight": base_state["_fc.weight"].clone(),
                   "bias": base_state["_fc.bias"].clone()},
                  str(root / "heads" / f"{t}.safetensors"))
    return built


def test_fitness_matches_the_network_forward_and_caches(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    built = write_work(tmp_path)
    data = tmp_path / "data" / "test.safetensors"
    state = qfv.load_checkpoint(tmp_path / "models" / "base")
    # By hand: the library's own forward (pool, dropout off, _fc) on normalised pixels.
    net = qfv.build_network(TINY)
    net.load_state_dict(state)
    expected = {}
    with torch.no_grad():
        for t, b in built.items():
            x = (b["test"][1].float() / 255 - qfv.MEAN) / qfv.STD
            expected[t] = int((net(x).argmax(-1) == b["test"][2]).sum()) / len(x)
    monkeypatch.setattr(qf, "USE_DISK_CACHE", True)
    acc, secs = qfv.evaluate_timed(state, data)
    assert acc == pytest.approx(expected, abs=1e-12) and secs > 0
    assert qfv.score(state, data) == pytest.approx(sum(expected.values()) / len(expected))
    per_row = qfv.correctness(state, data)
    assert {t: float(v.float().mean()) for t, v in per_row.items()} == pytest.approx(expected)
    # A second call reads the cache: scoring anything now would fail.
    assert list((tmp_path / "cache" / "eval").glob("*.json"))

    def boom(*_: Any, **__: Any) -> torch.Tensor:
        raise AssertionError("scored again despite the cache")

    monkeypatch.setattr(qfv, "correct", boom)
    assert qfv.evaluate_timed(state, data) == (acc, secs)
    assert torch.equal(qfv.correctness(state, data)["t0"], per_row["t0"])
    # Another state is another key: it is scored (and so reaches `boom`).
    other = {k: v.clone() for k, v in state.items()}
    other["_conv_stem.weight"] += 0.1
    with pytest.raises(AssertionError, match="scored again"):
        qfv.evaluate(other, data)


def test_finetune_keeps_frozen_tensors_and_moves_the_rest(tmp_path: Path) -> None:
    built = write_work(tmp_path, task_count=1)
    doc = {"key": {"tiny": 1}, "tasks": {t: {"labels": b["labels"]} for t, b in built.items()}}
    s = {**qv.DEFAULTS, "seed": 0, "vision_steps": 2, "vision_train": N["train"]}
    metas = qv.prepare_models(tmp_path, s, doc, tasks=("t0",))
    assert metas["t0"]["steps"] == 2 and 0 <= metas["t0"]["probe_test"] <= 1
    base = qfv.load_checkpoint(tmp_path / "models" / "base")
    tuned = qfv.load_checkpoint(tmp_path / "models" / "t0")
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert moved and all(not qv.frozen(k) for k in moved)
    assert "_conv_stem.weight" in moved and "_blocks.0._bn1.weight" in moved
    # The head replaced the tiny net's classifier in heads/ and matches the 3 labels.
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "heads" / "t0.safetensors"))["weight"].shape[0] == 3
    # Cached: a second call with the same settings trains nothing (same meta back).
    assert qv.prepare_models(tmp_path, s, doc, tasks=("t0",)) == metas
    meta = json.loads((tmp_path / "heads" / "t0.json").read_text())
    assert meta["key"]["steps"] == 2


def test_settings_fall_back_to_defaults() -> None:
    import argparse

    s = qv.settings(argparse.Namespace(seed=3, select=80, vision_steps=7))
    assert s["seed"] == 3 and s["select"] == 80 and s["vision_steps"] == 7
    assert s["test"] == qv.DEFAULTS["test"] and s["vision_lr"] == qv.DEFAULTS["vision_lr"]
