"""osr-reprogram through the command line: `pcbmerge run` on tiny cases (tensor files,
PNG folders, a tiny random Swin2SR directory), `validate`/`--dry-run`, `methods`, and
`pcbmerge restore` with its refusals. Bad input: exit 2 and one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from skimage.metrics import peak_signal_noise_ratio
from typer.testing import CliRunner

from mergekit_pcb.cli import app
from mergekit_pcb.io.safetensors_format import read_header
from mergekit_pcb.io.writer import MARKER
from mergekit_pcb.reprogram.data import read_image, write_image
from mergekit_pcb.reprogram.demo import haze, patches, tiny_denoiser
from mergekit_pcb.reprogram.frozen import weights_sha256
from mergekit_pcb.reprogram.store import load_module

ARCH = "mergekit_pcb.reprogram.demo:tiny_denoiser"
ARCH_KWARGS = {"channels": 3, "width": 8, "depth": 2}
FAST = {"steps": 6, "batch_size": 4, "eval_every": 3, "hidden": 4}


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [*map(str, args)])


def error_line(res: Any) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


def json_out(res: Any) -> dict[str, Any]:
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


def save_model(path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tiny_denoiser(**ARCH_KWARGS).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("osr-cli")
    save_model(root / "denoiser.safetensors", 0)
    save_model(root / "other.safetensors", 1)
    clean = patches(("astronaut", "coffee", "chelsea"), 32, 28, seed=0)
    for name, rows in (("train", slice(0, 16)), ("validation", slice(16, 22)),
                       ("test", slice(22, 28))):
        c = clean[rows].contiguous()
        save_file({"degraded": haze(c).contiguous(), "clean": c},
                  str(root / f"{name}.safetensors"))
        for sub, images in (("degraded", haze(c)), ("clean", c)):
            folder = root / "png" / name / sub
            folder.mkdir(parents=True)
            for i, img in enumerate(images):
                write_image(folder / f"{name}-{i}.png", img)
    return root


def recipe(root: Path, name: str = "recipe.yaml", **edits: Any) -> Path:
    data: dict[str, Any] = {
        "merge_method": "osr-reprogram",
        "model": {"arch": ARCH, "arch_kwargs": ARCH_KWARGS, "weights": "denoiser.safetensors"},
        "data": {s: {"tensors": f"{s}.safetensors"} for s in ("train", "validation", "test")},
        "parameters": {"mode": "wave", **FAST},
        "seed": 0,
    }
    for key, value in edits.items():
        if value is None:
            data.pop(key)
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


def frozen_psnr(model: torch.nn.Module, test_file: Path) -> float:
    """Mean PSNR of the frozen model on the test tensors, computed with scikit-image."""
    t = load_file(str(test_file))
    with torch.no_grad():
        out = model(t["degraded"]).clamp(0, 1).double().numpy()
    clean = t["clean"].double().numpy()
    return float(np.mean([peak_signal_noise_ratio(c, o, data_range=1.0)
                          for c, o in zip(clean, out, strict=True)]))


@pytest.mark.parametrize("mode", ["wave", "fourier", "fda"])
def test_run_writes_module_with_metadata_and_scores(case: Path, tmp_path: Path,
                                                    mode: str) -> None:
    out = tmp_path / "out"
    res = cli("run", recipe(case, f"{mode}.yaml", parameters={"mode": mode, **FAST}), "-o",
              out, "--trust-code", "--json")
    summary = json_out(res)
    assert summary["kind"] == "reprogram" and summary["mode"] == mode
    assert summary["output"] == str(out) and summary["seconds"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "module.safetensors", "recipe.yaml", "report.json"])
    assert json.loads((out / MARKER).read_text())["kind"] == "reprogram"
    model = tiny_denoiser(**ARCH_KWARGS)
    model.load_state_dict(load_file(str(case / "denoiser.safetensors")))
    _, meta = read_header(out / "module.safetensors")
    assert meta["frozen_sha256"] == weights_sha256(model) == summary["frozen_sha256"]
    assert meta["mode"] == mode and json.loads(meta["config"])["mode"] == mode
    # the frozen model's score, recomputed independently with scikit-image
    assert summary["test"]["frozen"]["psnr"] == pytest.approx(
        frozen_psnr(model.eval(), case / "test.safetensors"), abs=1e-3)
    # the reprogrammed score is the saved module's, applied again
    module, _ = load_module(out)
    t = load_file(str(case / "test.safetensors"))
    with torch.no_grad():
        restored = module(t["degraded"], model).clamp(0, 1).double().numpy()
    ours = np.mean([peak_signal_noise_ratio(c, o, data_range=1.0)
                    for c, o in zip(t["clean"].double().numpy(), restored, strict=True)])
    assert summary["test"]["reprogrammed"]["psnr"] == pytest.approx(float(ours), abs=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert report["test"] == summary["test"]
    assert (out / "recipe.yaml").read_text() == (case / f"{mode}.yaml").read_text()


def test_run_prints_table_and_summary_line(case: Path, tmp_path: Path) -> None:
    res = cli("run", recipe(case), "-o", tmp_path / "out", "--trust-code")
    assert res.exit_code == 0, res.output
    assert "frozen model alone" in res.output and "reprogrammed (wave)" in res.output
    assert f"wrote {tmp_path / 'out'} in" in res.output


def test_validate_and_dry_run_write_nothing(case: Path, tmp_path: Path) -> None:
    path = recipe(case)
    res = cli("validate", path, "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["kind"] == "reprogram" and plan["data"]["train"]["pairs"] == 16
    res = cli("run", path, "-o", tmp_path / "out", "--dry-run")  # no code imported: no consent
    assert res.exit_code == 0 and "dry run: nothing written" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_methods_lists_osr_reprogram() -> None:
    res = cli("methods", "--json")
    info = json.loads(res.output)["osr-reprogram"]
    assert info["kind"] == "reprogram"
    names = {p["name"]: p for p in info["parameters"]}
    assert names["mode"]["choices"] == ["wave", "fourier", "fda"]
    assert names["steps"]["default"] == 300


def test_png_folders_run_and_restore(case: Path, tmp_path: Path) -> None:
    png = {s: {"degraded": f"png/{s}/degraded", "clean": f"png/{s}/clean"}
           for s in ("train", "validation", "test")}
    path = recipe(case, "png.yaml", data=png)
    out = tmp_path / "out"
    summary = json_out(cli("run", path, "-o", out, "--trust-code", "--json"))
    assert summary["test_images"] == 6
    restored = tmp_path / "restored"
    res = cli("restore", "--model", path, "--module", out, case / "png/test/degraded", restored,
              "--trust-code")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in restored.glob("*.png"))
    assert names == sorted(f"test-{i}.png" for i in range(6))
    # the written pixels are the module's output, quantized to 8 bits
    module, _ = load_module(out)
    model = tiny_denoiser(**ARCH_KWARGS).eval()
    model.load_state_dict(load_file(str(case / "denoiser.safetensors")))
    x = read_image(case / "png/test/degraded/test-3.png", 3, "x")[None]
    with torch.no_grad():
        expected = (module(x, model)[0].clamp(0, 1) * 255).round()
    got = read_image(restored / "test-3.png", 3, "x") * 255
    assert torch.equal(got.round(), expected)
    # an existing OUT_DIR is kept without --force, replaced with it
    line = error_line(cli("restore", "--model", path, "--module", out,
                          case / "png/test/degraded", restored, "--trust-code"))
    assert "already exists" in line and "--force" in line
    res = cli("restore", "--model", case / "denoiser.safetensors", "--arch", ARCH,
              "--arch-kwargs", json.dumps(ARCH_KWARGS), "--module", out / "module.safetensors",
              case / "png/test/degraded", restored, "--trust-code", "--force")
    assert res.exit_code == 0, res.output


def test_restore_refuses_a_module_of_another_model(case: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    json_out(cli("run", recipe(case, parameters={"mode": "fourier", **FAST}), "-o", out,
                 "--trust-code", "--json"))
    line = error_line(cli("restore", "--model", case / "other.safetensors", "--arch", ARCH,
                          "--arch-kwargs", json.dumps(ARCH_KWARGS), "--module", out,
                          case / "png/test/degraded", tmp_path / "restored", "--trust-code"))
    assert "SHA-256" in line and "other.safetensors" in line
    assert not (tmp_path / "restored").exists()
    line = error_line(cli("restore", "--model", case / "denoiser.safetensors", "--arch", ARCH,
                          "--arch-kwargs", json.dumps(ARCH_KWARGS), "--module", out,
                          case / "missing", tmp_path / "restored", "--trust-code"))
    assert "IN_DIR" in line and "missing" in line


def _edit_data(split: str, **value: Any) -> dict[str, Any]:
    d = {s: {"tensors": f"{s}.safetensors"} for s in ("train", "validation", "test")}
    d[split] = value
    return d


@pytest.mark.parametrize(("edit", "expected"), [
    ({"data": _edit_data("train", degraded="png/nowhere", clean="png/train/clean")},
     "data.train.degraded: folder not found: png/nowhere"),
    ({"data": _edit_data("validation", degraded="png/train/degraded",
                         clean="png/validation/clean")},
     "has no clean image of the same name"),
    ({"data": _edit_data("test", tensors="train.safetensors")},
     "data.test: the same images as data.train"),
    ({"parameters": {"mdoe": "wave"}}, "unknown key 'parameters.mdoe'"),
    ({"parameters": {"mode": "spectral"}}, "parameters.mode"),
    ({"model": {"weights": "missing.safetensors"}}, "model.weights: path not found"),
    ({"model": {"hf": "somewhere"}}, "model"),
    ({"parameters": {"crop": 64}}, "parameters.crop: 64 is larger than the smallest"),
])
def test_bad_input_is_one_line(case: Path, tmp_path: Path, edit: dict[str, Any],
                               expected: str) -> None:
    line = error_line(cli("run", recipe(case, "bad.yaml", **edit), "-o", tmp_path / "out",
                          "--trust-code"))
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_code_needs_trust_and_other_kinds_flags_are_refused(case: Path, tmp_path: Path) -> None:
    line = error_line(cli("run", recipe(case), "-o", tmp_path / "out"))
    assert "model.arch" in line and "--trust-code" in line
    line = error_line(cli("run", recipe(case), "-o", tmp_path / "out", "--workers", "2"))
    assert "--workers: not used by reprogram recipes" in line


def test_hugging_face_swin2sr_directory(case: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = Swin2SRConfig(image_size=16, patch_size=1, num_channels=3, embed_dim=8,
                           depths=[1], num_heads=[2], window_size=4, mlp_ratio=1.0, upscale=1,
                           upsampler="")
    torch.manual_seed(0)
    model = Swin2SRForImageSuperResolution(config).eval()
    hf_dir = tmp_path / "swin2sr"
    model.save_pretrained(hf_dir)
    path = recipe(case, "hf.yaml", parameters={"mode": "fourier", **FAST, "steps": 3})
    data = yaml.safe_load(path.read_text())
    data["model"] = {"hf": str(hf_dir)}
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    summary = json_out(cli("run", path, "-o", out, "--json"))  # no code: no --trust-code
    assert summary["frozen_sha256"] == weights_sha256(model)
    restored = tmp_path / "restored"
    res = cli("restore", "--model", hf_dir, "--module", out, case / "png/test/degraded",
              restored)
    assert res.exit_code == 0, res.output
    assert read_image(restored / "test-0.png", 3, "x").shape == (3, 32, 32)
    # the module of the tiny denoiser does not fit this model
    other = tmp_path / "other"
    json_out(cli("run", recipe(case, "fourier.yaml", parameters={"mode": "fourier", **FAST}),
                 "-o", other, "--trust-code", "--json"))
    line = error_line(cli("restore", "--model", hf_dir, "--module", other,
                          case / "png/test/degraded", tmp_path / "r2"))
    assert "SHA-256" in line
