"""slerp streamed in slices (`methods.slerp.SlerpStats`): each tensor's norms and angle in
two passes over mergekit's chunks, then the result slice by slice, bit for bit the whole
tensor's (`slerp`, itself checked against mergekit in test_half_precision_parity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_pcb.engine.plan import build_plan
from mergekit_pcb.engine.stream import run_plan
from mergekit_pcb.methods import TensorInputs
from mergekit_pcb.methods.ops import uniform_mean
from mergekit_pcb.methods.slerp import CHUNK, Slerp, SlerpStats, slerp
from mergekit_pcb.recipe.schema import parse_recipe
from mergekit_pcb.threads import torch_threads

N = 2 * CHUNK + 4097  # two whole chunks and an uneven one


def _pair(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, generator=g)
    b = a + torch.randn(N, generator=g)
    return a.to(dtype), b.to(dtype)


def _sliced(t: float, a: torch.Tensor, b: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The engine's order: both passes over every slice, then the merge of each; every
    slice a fresh tensor, one entry off the alignment of the whole one's storage."""
    others = b if isinstance(b, list) else [b]
    method, stats = Slerp(), SlerpStats()
    bounds = [(s, min(s + CHUNK, N)) for s in range(0, N, CHUNK)]

    def part(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        buffer = torch.empty(e - s + 1, dtype=x.dtype)
        buffer[1:] = x[s:e]
        return buffer[1:]

    def inputs(s: int, e: int) -> TensorInputs:
        return TensorInputs("w", part(a, s, e), [part(m, s, e) for m in others],
                            [{}] * len(others), {"t": t}, stats=stats, start=s)

    for p in range(len(stats.pass_names)):
        for s, e in reversed(bounds):  # any order: the chunks are put back in place
            stats.observe(p, inputs(s, e))
        stats.finish(p)
    return torch.cat([method.merge(inputs(s, e)) for s, e in bounds])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sliced_slerp_is_the_whole_tensor_bit_for_bit(dtype: torch.dtype, threads: int
                                                       ) -> None:
    a, b = _pair(dtype, threads)
    with torch_threads(threads):
        whole = slerp(0.3, a, b)
        sliced = _sliced(0.3, a, b)
    assert sliced.dtype == whole.dtype == dtype
    assert torch.equal(sliced.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       whole.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # and the value is a slerp: between the two, nearer the base at t = 0.3
    assert 0 < float((sliced.float() - a.float()).norm()) < float((sliced.float()
                                                                   - b.float()).norm())


def test_several_other_models_interpolate_towards_their_mean_in_slices() -> None:
    a, b = _pair(torch.float32, 7)
    others = [b, 2 * b - a, a - b]
    with torch_threads(2):
        assert torch.equal(_sliced(0.6, a, others), slerp(0.6, a, uniform_mean(others)))


def test_nearly_collinear_takes_the_linear_rule_in_slices() -> None:
    a, _ = _pair(torch.float32, 9)
    b = a * 1.5  # cos θ = 1: linear interpolation
    assert torch.equal(_sliced(0.25, a, b), slerp(0.25, a, b))
    assert torch.equal(_sliced(0.25, a, b), 0.75 * a + 0.25 * b)


def _model(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir()
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    return root


def test_engine_streams_large_tensors_and_merges_small_ones_whole(tmp_path: Path) -> None:
    """Two layers with t = 0.2 and 0.8 (the gradient [0.2, 0.8]): the large tensors in
    slices after two statistics passes that read only them, the small one whole."""
    g = torch.Generator().manual_seed(4)
    big = (1040, 2048)  # 2.03 × 2²⁰ entries: three slices
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    small = "model.layers.0.input_layernorm.weight"
    base = {n: torch.randn(big, generator=g) for n in names} | {small: torch.randn(64,
                                                                                   generator=g)}
    other = {n: v + torch.randn(v.shape, generator=g) for n, v in base.items()}
    recipe = parse_recipe({"merge_method": "slerp", "base_model": str(tmp_path / "base"),
                           "models": [{"model": str(_model(tmp_path / "other", other))}],
                           "parameters": {"t": [0.2, 0.8]}}, "test")
    _model(tmp_path / "base", base)
    plan = build_plan(recipe, "")
    try:
        assert plan.pass_names == ["slerp norms", "slerp angle", "merge"]
        assert [plan.observed(t) for t in plan.tasks] == [n != small for n in
                                                          (t.name for t in plan.tasks)]
        run_plan(plan, tmp_path / "out")
    finally:
        plan.close()
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, t in ((names[0], 0.2), (names[1], 0.8), (small, 0.2)):
        assert torch.equal(out[name], slerp(t, base[name], other[name])), name


def test_no_statistics_passes_without_a_large_tensor(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 32, generator=g)}
    other = {k: v + 1 for k, v in base.items()}
    recipe = parse_recipe({"merge_method": "slerp", "base_model": str(tmp_path / "base"),
                           "models": [{"model": str(_model(tmp_path / "other", other))}],
                           "parameters": {"t": 0.5}}, "test")
    _model(tmp_path / "base", base)
    plan = build_plan(recipe, "")
    try:
        assert plan.pass_names == ["merge"] and plan.passes == 1
    finally:
        plan.close()
