"""`dtype` as mergekit means it: without the key, mergekit's methods compute in the inputs'
dtype; methods mergekit lacks (pcb) compute in float32; `dtype: float32` computes in
float32. Checked on bf16 inputs against the methods' own functions run in each dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_pcb.cli import app
from mergekit_pcb.methods.ties import ties_merge


def _models(root: Path) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g).to(torch.bfloat16)}
    dirs = []
    for name, state in [("base", base)] + [
            (f"ft{i}", {"w": (base["w"].float() + 0.02 * torch.randn(64, 64, generator=g))
                        .to(torch.bfloat16)}) for i in range(3)]:
        (root / name).mkdir()
        save_file(state, str(root / name / "model.safetensors"))
        dirs.append(root / name)
    return dirs[0], dirs[1:]


def _run(root: Path, body: dict, tag: str) -> torch.Tensor:
    recipe = write_recipe(root / f"{tag}.yaml", body)
    res = CliRunner().invoke(app, ["run", str(recipe), "-o", str(root / tag), "--quiet"])
    assert res.exit_code == 0, res.output
    return load_file(str(root / tag / "model.safetensors"))["w"]


@pytest.fixture
def bf16(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    base, tuned = _models(tmp_path)
    return tmp_path, base, tuned


def _ties(base: Path, tuned: list[Path], **extra: object) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(t), "parameters": {"weight": 0.7, "density": 0.5}}
                       for t in tuned], "parameters": {"normalize": True}, **extra}


def test_ties_without_dtype_computes_in_the_inputs_dtype(bf16: tuple[Path, Path, list[Path]]
                                                         ) -> None:
    root, base, tuned = bf16
    b = load_file(str(base / "model.safetensors"))["w"]
    ms = [load_file(str(t / "model.safetensors"))["w"] for t in tuned]
    got = _run(root, _ties(base, tuned), "none")
    in_bf16 = ties_merge(b, ms, [0.7] * 3, [0.5] * 3, 1.0, True)
    in_fp32 = ties_merge(b.float(), [m.float() for m in ms], [0.7] * 3, [0.5] * 3, 1.0,
                         True).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, in_bf16)
    assert not torch.equal(in_bf16, in_fp32)  # the choice matters on these inputs
    # `dtype: float32` computes in float32 and writes float32
    got32 = _run(root, _ties(base, tuned, dtype="float32"), "fp32")
    assert got32.dtype == torch.float32
    assert torch.equal(got32, ties_merge(b.float(), [m.float() for m in ms], [0.7] * 3,
                                         [0.5] * 3, 1.0, True))


def test_pcb_without_dtype_computes_in_float32(bf16: tuple[Path, Path, list[Path]]) -> None:
    root, base, tuned = bf16
    body = {"merge_method": "pcb", "base_model": str(base),
            "models": [{"model": str(t)} for t in tuned],
            "parameters": {"scope": "tensor", "lambda": 1.0}}
    none = _run(root, body, "pcb-none")
    fp32 = _run(root, {**body, "dtype": "float32", "out_dtype": "bfloat16"}, "pcb-fp32")
    assert none.dtype == torch.bfloat16 and torch.equal(none, fp32)


def test_a_global_pcb_gathers_its_statistics_in_float32_whatever_dtype(
        bf16: tuple[Path, Path, list[Path]]) -> None:
    """PCB computes in float32 (its merge upcasts its inputs): its whole-model statistics
    (clip bounds, score thresholds) come from the same float32 τ, so on bf16 inputs
    `dtype: bfloat16` gives what `dtype: float32` does (written in bf16)."""
    root, base, tuned = bf16
    body = {"merge_method": "pcb", "base_model": str(base),
            "models": [{"model": str(t)} for t in tuned],
            "parameters": {"scope": "global", "lambda": 1.0, "density": 0.3}}
    in_bf16 = _run(root, {**body, "dtype": "bfloat16"}, "pcb-global-bf16")
    fp32 = _run(root, {**body, "dtype": "float32", "out_dtype": "bfloat16"}, "pcb-global-fp32")
    assert in_bf16.dtype == torch.bfloat16 and torch.equal(in_bf16, fp32)
