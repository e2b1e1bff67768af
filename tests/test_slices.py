"""`slices:` as mergekit defines them: frankenmerges (passthrough of layer ranges), per-slice
merges with gradients over the slice, outside tensors from the first and last slices, and a
config whose layer count matches. Values are checked against the source tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_pcb.cli import app


def _load(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _run(tmp_path: Path, recipe: dict[str, Any], tag: str = "out") -> Path:
    path = write_recipe(tmp_path / f"{tag}.yaml", recipe)
    out = tmp_path / tag
    res = CliRunner().invoke(app, ["run", str(path), "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    return out


def test_frankenmerge_stacks_layer_ranges(hf_models: Any, tmp_path: Path) -> None:
    _base, tuned = hf_models("llama", 2)
    a, b = tuned
    out = _run(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]})
    merged, sa, sb = _load(out), _load(a), _load(b)
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(merged[name.format(0)], sa[name.format(0)])
    assert torch.equal(merged[name.format(1)], sa[name.format(1)])
    assert torch.equal(merged[name.format(2)], sb[name.format(1)])
    assert torch.equal(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], sb["lm_head.weight"])  # the last slice's
    assert torch.equal(merged["model.norm.weight"], sb["model.norm.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3


def test_slerp_gradient_runs_over_each_slice(hf_models: Any, tmp_path: Path) -> None:
    base, tuned = hf_models("llama", 1)
    ft = tuned[0]
    out = _run(tmp_path, {"merge_method": "slerp", "base_model": str(base),
                          "parameters": {"t": [0.0, 1.0]}, "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]},
                     {"model": str(ft), "layer_range": [0, 2]}]}]})
    merged, sbase, sft = _load(out), _load(base), _load(ft)
    name = "model.layers.{}.self_attn.q_proj.weight"
    # t = 0 at the slice's first layer (the base), 1 at its last (the other model)
    torch.testing.assert_close(merged[name.format(0)], sbase[name.format(0)])
    torch.testing.assert_close(merged[name.format(1)], sft[name.format(1)])
    # tensors outside the layers sit at t = 0
    torch.testing.assert_close(merged["model.embed_tokens.weight"],
                               sbase["model.embed_tokens.weight"])


def test_linear_slices_weight_each_source(hf_models: Any, tmp_path: Path) -> None:
    _base, tuned = hf_models("llama", 2)
    a, b = tuned
    out = _run(tmp_path, {"merge_method": "linear", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [1, 2], "parameters": {"weight": 3.0}},
                     {"model": str(b), "layer_range": [0, 1], "parameters": {"weight": 1.0}}]}]})
    merged, sa, sb = _load(out), _load(a), _load(b)
    name = "model.layers.{}.mlp.down_proj.weight"
    expected = (3 * sa[name.format(1)] + sb[name.format(0)]) / 4
    torch.testing.assert_close(merged[name.format(0)], expected, rtol=1e-6, atol=1e-7)
    assert name.format(1) not in merged
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.parametrize(("slices", "message"), [
    ([{"sources": [{"model": "A", "layer_range": [0, 2]},
                   {"model": "B", "layer_range": [0, 1]}]}], "same number of layers"),
    ([{"sources": [{"model": "A", "layer_range": [2, 1]}]}], "layer_range"),
    ([{"sources": [{"model": "A", "layer_range": [0, 9]}]}], "has 2 layers"),
])
def test_bad_slices_are_one_line(hf_models: Any, tmp_path: Path, slices: list[dict[str, Any]],
                                 message: str) -> None:
    _base, tuned = hf_models("llama", 2)
    names = {"A": str(tuned[0]), "B": str(tuned[1])}
    for sl in slices:
        for s in sl["sources"]:
            s["model"] = names[s["model"]]
    path = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "slices": slices})
    res = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert message in res.output and not (tmp_path / "o").exists()
