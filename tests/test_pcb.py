"""PCB (and TIES with global scope) against a dense reference: flatten everything, sort.

The reference follows the authors' released code (rows sorted with torch.sort, order
statistics taken by index), written here independently of the package's streaming passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_recipe
from safetensors.torch import load_file, save_file

from mergekit_pcb.engine import merge_recipe_file, plan_recipe_file
from mergekit_pcb.engine.stream import _method_inputs, _read_inputs, gather_statistics
from mergekit_pcb.methods.pcb import pcb_scores

SHAPES = {"a.weight": ((40, 30), torch.float32), "b.bias": ((100,), torch.bfloat16),
          "c.weight": ((7, 3, 5), torch.float16), "d.scale": ((1,), torch.float32),
          "e.weight": ((13, 17), torch.float32)}


# ---------------------------------------------------------------- dense reference
def clamp_rows(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    d = x.shape[1]
    s = torch.sort(x, dim=1).values
    lo = s[:, int(d * min_ratio)].unsqueeze(1)
    hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), 0)


def pcb_dense(tv: torch.Tensor, density: list[float], clip: float, inter: str,
              weights: list[float], lam: float) -> torch.Tensor:
    n = tv.shape[0]
    a = clamp_rows(tv.abs(), clip, clip)
    clipped = tv.sign() * a
    intra = torch.exp(n * normalize_rows(a) ** 2)
    if inter == "consensus":
        cross = torch.tanh(tv * tv.sum(dim=0))
    else:
        h = tv.sign() * normalize_rows(tv.abs())
        if inter == "normalized":
            cross = torch.tanh(tv * h.sum(dim=0))
        else:
            cross = torch.stack([torch.tanh(h[i] * h).sum(dim=0) for i in range(n)])
    score = intra * cross
    scale = torch.stack([normalize_rows(clamp_rows(score[i:i + 1], 1 - density[i], 0))[0]
                         for i in range(n)])
    w = torch.tensor(weights).unsqueeze(1)
    return lam * (w * scale * clipped).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)


def ties_global_dense(tv: torch.Tensor, density: list[float], weights: list[float]
                      ) -> torch.Tensor:
    n, d = tv.shape
    trimmed = []
    for i in range(n):
        k = max(1, int(density[i] * d))
        thr = torch.sort(tv[i].abs(), descending=True).values[k - 1]
        trimmed.append(tv[i] * (tv[i].abs() >= thr))
    w = torch.tensor(weights).unsqueeze(1)
    weighted = torch.stack(trimmed) * w
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == elected
    div = (w * agree).sum(dim=0)
    div[div == 0] = 1
    return (weighted * agree).sum(dim=0) / div


def dense_merge(kind: str, base: dict[str, torch.Tensor], tuned: list[dict[str, torch.Tensor]],
                scope: str, **kw: object) -> dict[str, torch.Tensor]:
    names = list(base)
    fn = pcb_dense if kind == "pcb" else ties_global_dense
    if scope == "tensor":
        return {n: base[n].float() + fn(torch.stack([(t[n].float() - base[n].float()).reshape(-1)
                                                     for t in tuned]), **kw).reshape(base[n].shape)
                for n in names}
    rows = torch.stack([torch.cat([(t[n].float() - base[n].float()).reshape(-1) for n in names])
                        for t in tuned])
    merged = fn(rows, **kw)
    out, offset = {}, 0
    for n in names:
        size = base[n].numel()
        out[n] = base[n].float() + merged[offset:offset + size].reshape(base[n].shape)
        offset += size
    return out


# ---------------------------------------------------------------- fixtures
def make_models(tmp_path: Path, n: int, *, zero_task: bool = False, quantized: bool = False,
                seed: int = 0) -> tuple[Path, list[Path], dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(shape, generator=g).to(dt) for k, (shape, dt) in SHAPES.items()}
    tuned = []
    for i in range(n):
        t = {}
        for k, v in base.items():
            delta = torch.randn(v.shape, generator=g) * 0.05 * (i + 1)
            if quantized:  # few distinct values: many exact ties among scores
                delta = torch.randint(-2, 3, v.shape, generator=g).float() * 0.25
            if zero_task and i == n - 1:
                delta = torch.zeros(v.shape)
            t[k] = (v.float() + delta).to(v.dtype)
        tuned.append(t)
    # Compare against what was actually stored (after rounding to each tensor's dtype).
    dirs = []
    for name, state in [("base", base)] + [(f"ft{i}", t) for i, t in enumerate(tuned)]:
        d = tmp_path / name
        d.mkdir()
        save_file(state, d / "model.safetensors")
        dirs.append(d)
    return dirs[0], dirs[1:], base, tuned


def pcb_recipe(base: Path, tuned: list[Path], **params: object) -> dict:
    weights = [1.0, 0.7, 1.3, 0.9][: len(tuned)]
    densities = [0.1, 0.2, 0.15, 0.3][: len(tuned)]
    return {
        "merge_method": "pcb", "base_model": str(base), "out_dtype": "float32",
        "models": [{"model": str(t), "parameters": {"weight": w, "density": d}}
                   for t, w, d in zip(tuned, weights, densities, strict=False)],
        "parameters": {"lambda": 1.3, "clip": 0.05, **params},
    }


def run_recipe(tmp_path: Path, recipe: dict, tag: str) -> dict[str, torch.Tensor]:
    """In process (the CLI path is covered elsewhere): the same engine, less start-up."""
    path = write_recipe(tmp_path / f"{tag}.yaml", recipe)
    merge_recipe_file(path, tmp_path / tag)
    return load_file(tmp_path / tag / "model.safetensors")


def assert_matches(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for name, value in ref.items():
        err = (out[name] - value).abs().max().item()
        scale = max(value.abs().max().item(), 1e-30)
        assert err / scale <= 1e-6, (name, err, scale)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("inter", ["consensus", "normalized", "pairwise"])
@pytest.mark.parametrize("case", ["three", "single", "zero_task", "ties"])
def test_pcb_matches_dense_reference(tmp_path: Path, scope: str, inter: str, case: str) -> None:
    n = {"three": 3, "single": 1, "zero_task": 3, "ties": 3}[case]
    base_dir, tuned_dirs, base, tuned = make_models(
        tmp_path, n, zero_task=case == "zero_task", quantized=case == "ties")
    recipe = pcb_recipe(base_dir, tuned_dirs, inter=inter, scope=scope)
    out = run_recipe(tmp_path, recipe, "out")
    weights = [m["parameters"]["weight"] for m in recipe["models"]]
    densities = [m["parameters"]["density"] for m in recipe["models"]]
    ref = dense_merge("pcb", base, tuned, scope, density=densities, clip=0.05, inter=inter,
                      weights=weights, lam=1.3)
    for value in out.values():
        assert bool(torch.isfinite(value).all())
    assert_matches(out, ref)


def test_pcb_clip_zero_and_global_differs_from_tensor(tmp_path: Path) -> None:
    base_dir, tuned_dirs, base, tuned = make_models(tmp_path, 3, seed=3)
    glob = run_recipe(tmp_path, pcb_recipe(base_dir, tuned_dirs, clip=0.0), "g")
    ref = dense_merge("pcb", base, tuned, "global", density=[0.1, 0.2, 0.15], clip=0.0,
                      inter="consensus", weights=[1.0, 0.7, 1.3], lam=1.3)
    assert_matches(glob, ref)
    per_tensor = run_recipe(tmp_path, pcb_recipe(base_dir, tuned_dirs, clip=0.0,
                                                 scope="tensor"), "t")
    assert not torch.allclose(glob["a.weight"], per_tensor["a.weight"])


@pytest.mark.parametrize("quantized", [False, True])
def test_ties_global_scope_matches_dense_reference(tmp_path: Path, quantized: bool) -> None:
    base_dir, tuned_dirs, base, tuned = make_models(tmp_path, 3, quantized=quantized, seed=1)
    densities, weights = [0.2, 0.5, 0.3], [1.0, 0.5, 2.0]
    recipe = {  # the dense reference computes in float32 (without `dtype`, half-precision
        # inputs would be merged in their own dtype, as mergekit does)
        "merge_method": "ties", "base_model": str(base_dir), "dtype": "float32",
        "out_dtype": "float32", "parameters": {"scope": "global"},
        "models": [{"model": str(t), "parameters": {"weight": w, "density": d}}
                   for t, w, d in zip(tuned_dirs, weights, densities, strict=True)],
    }
    out = run_recipe(tmp_path, recipe, "out")
    assert_matches(out, dense_merge("ties", base, tuned, "global", density=densities,
                                    weights=weights))


# ---------------------------------------------------------------- properties
def survivors(tmp_path: Path, recipe: dict) -> tuple[list[int], int, int]:
    """Per task, how many entries score above the drop threshold (S > 0), over the model."""
    path = write_recipe(tmp_path / "p.yaml", recipe)
    plan = plan_recipe_file(path)
    from rich.progress import Progress

    with Progress(disable=True) as progress:
        gather_statistics(plan, torch.device("cpu"), progress)
    counts = [0] * len(recipe["models"])
    disagree = 0
    for task in plan.tasks:
        inputs = _method_inputs(plan, task, _read_inputs(plan, task, torch.device("cpu")))
        assert inputs.base is not None
        tau = [m - inputs.base for m in inputs.models]
        scores = pcb_scores(tau, inputs.stats.rows, "consensus")
        total = torch.stack(tau).sum(dim=0)
        for i, (b, row) in enumerate(zip(scores, inputs.stats.rows, strict=True)):
            kept = b > row.drop_threshold
            counts[i] += int(kept.sum())
            disagree += int((kept & (tau[i].sign() != total.sign())).sum())
    d = sum(int(torch.tensor(t.shape).prod()) for t in plan.tasks)
    plan.close()
    return counts, d, disagree


def test_pcb_keeps_density_fraction_and_agrees_with_consensus(tmp_path: Path) -> None:
    base_dir, tuned_dirs, *_ = make_models(tmp_path, 3, seed=5)
    recipe = pcb_recipe(base_dir, tuned_dirs)
    counts, d, disagree = survivors(tmp_path, recipe)
    for count, m in zip(counts, recipe["models"], strict=True):
        r = m["parameters"]["density"]
        # The threshold is entry ⌊D(1−r)⌋ of the sorted scores; everything above it survives.
        assert count == d - 1 - int(d * (1 - r)), (count, d, r)
        assert abs(count - int(r * d)) <= 1
    assert disagree == 0


def test_pcb_model_order_does_not_matter(tmp_path: Path) -> None:
    base_dir, tuned_dirs, *_ = make_models(tmp_path, 3, seed=7)
    recipe = pcb_recipe(base_dir, tuned_dirs)
    forward = run_recipe(tmp_path, recipe, "fwd")
    recipe["models"] = recipe["models"][::-1]
    backward = run_recipe(tmp_path, recipe, "bwd")
    for name in forward:
        torch.testing.assert_close(forward[name], backward[name], rtol=1e-6, atol=1e-7)


def test_validate_counts_passes_and_bytes(tmp_path: Path) -> None:
    import json

    base_dir, tuned_dirs, *_ = make_models(tmp_path, 2)
    path = write_recipe(tmp_path / "r.yaml", pcb_recipe(base_dir, tuned_dirs))
    info = json.loads(run_cli("validate", path, "--json").stdout)
    assert info["passes"] == 5 and info["pass_names"][-1] == "merge"
    one_pass = sum(t.numel() * t.element_size()
                   for d in (base_dir, *tuned_dirs)
                   for t in load_file(d / "model.safetensors").values())
    assert info["read_bytes"] == 5 * one_pass
    path = write_recipe(tmp_path / "t.yaml", pcb_recipe(base_dir, tuned_dirs, scope="tensor"))
    info = json.loads(run_cli("validate", path, "--json").stdout)
    assert info["passes"] == 1 and info["read_bytes"] == one_pass


def test_global_scope_rejects_per_tensor_density(tmp_path: Path) -> None:
    base_dir, tuned_dirs, *_ = make_models(tmp_path, 2)
    recipe = pcb_recipe(base_dir, tuned_dirs)
    recipe["models"][0]["parameters"]["density"] = [{"filter": "a.", "value": 0.5},
                                                    {"value": 0.1}]
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cli("run", path, "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert "need the same parameters for every tensor" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["pcb", "ties_global", "task_arithmetic", "linear"])
def test_streaming_in_slices_changes_nothing(tmp_path: Path, monkeypatch, method: str) -> None:
    """Large tensors stream in slices for elementwise methods; the bytes must not move."""
    base_dir, tuned_dirs, *_ = make_models(tmp_path, 3, seed=11)
    recipe = pcb_recipe(base_dir, tuned_dirs)
    if method != "pcb":
        recipe["merge_method"] = method.removesuffix("_global")
        recipe["parameters"] = {"scope": "global"} if method == "ties_global" else {}
        if method != "ties_global":
            for m in recipe["models"]:
                del m["parameters"]["density"]
    whole = run_recipe(tmp_path, recipe, "whole")
    monkeypatch.setattr("mergekit_pcb.engine.stream.CHUNK_ELEMENTS", 7)
    sliced = run_recipe(tmp_path, recipe, "sliced")
    for name in whole:
        assert torch.equal(whole[name], sliced[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_cuda_matches_cpu(tmp_path: Path, scope: str) -> None:
    base_dir, tuned_dirs, *_ = make_models(tmp_path, 3, seed=13)
    path = write_recipe(tmp_path / "r.yaml", pcb_recipe(base_dir, tuned_dirs, scope=scope))
    merge_recipe_file(path, tmp_path / "cpu")
    merge_recipe_file(path, tmp_path / "cuda", device="cuda")
    cpu = load_file(tmp_path / "cpu" / "model.safetensors")
    gpu = load_file(tmp_path / "cuda" / "model.safetensors")
    assert_matches(gpu, cpu)


def test_kth_smallest_equals_sort() -> None:
    """The histogram selection behind the trims and the global statistics is exact."""
    from mergekit_pcb.methods.selection import kth_smallest

    g = torch.Generator().manual_seed(2)
    values = torch.cat([torch.randn(3000, generator=g) * s for s in (1e-3, 1.0, 1e3)]
                       + [torch.zeros(40), -torch.zeros(10), torch.full((25,), 0.5),
                          torch.tensor([float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45,
                                        -1e-45])])
    ordered = torch.sort(values).values
    magnitudes = torch.sort(values.abs()).values
    for k in range(0, values.numel(), 37):
        assert kth_smallest(values, k) == ordered[k].item(), k
        assert kth_smallest(values.abs(), k, nonnegative=True) == magnitudes[k].item(), k


@pytest.mark.parametrize("n", [1, 2, 7, 1118, 4096])
def test_kth_smallest_of_a_small_tensor_is_the_rounds_value(n: int) -> None:
    """Up to `SORT_MAX` values the k-th smallest is sorted out: the same float, +0.0 for
    either zero, as the histogram rounds; NaNs go to the rounds."""
    import math

    from mergekit_pcb.methods.selection import SORT_MAX, _histogram_kth, kth_smallest

    assert n <= SORT_MAX
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))
    values[::3] = -0.0
    values[1::5] = 0.0
    values[2::7] = values[0].abs() + 1.0  # ties
    for signed, nonnegative in ((values, False), (values.abs(), True)):
        for k in range(0, n, max(1, n // 61)):
            got = kth_smallest(signed, k, nonnegative=nonnegative)
            want = _histogram_kth(signed.contiguous(), k, nonnegative)
            assert got == want and math.copysign(1, got) == math.copysign(1, want), (k, got)
    with_nan = values.clone()
    with_nan[0] = -float("nan")
    # the rounds put a negative NaN first (a sort would put it last)
    assert math.isnan(kth_smallest(with_nan, 0)) and math.isnan(_histogram_kth(with_nan, 0, False))


@pytest.mark.parametrize("nonnegative", [False, True])
def test_streaming_select_equals_sort(nonnegative: bool) -> None:
    """The streamed selection over chunks (magnitudes: bits taken as keys) is exact."""
    from mergekit_pcb.methods.selection import StreamingSelect

    g = torch.Generator().manual_seed(4)
    values = torch.cat([torch.randn(5000, generator=g) * s for s in (1e-30, 1e-3, 1.0, 1e3)]
                       + [torch.zeros(60), -torch.zeros(20), torch.full((90,), 0.25),
                          torch.tensor([3.4e38, 1e-45, -1e-45])])
    if nonnegative:
        values = values.abs()
    ordered = torch.sort(values).values
    ks = [*range(0, values.numel(), 997), values.numel() - 1]
    select = StreamingSelect(ks, nonnegative=nonnegative)
    chunks = values[torch.randperm(values.numel(), generator=g)].split(3001)
    for c in chunks:
        select.observe_high(c)
    select.finish_high()
    for c in reversed(chunks):  # any order
        select.observe_low(c)
    select.finish_low()
    assert select.values == [ordered[k].item() for k in ks]
    assert select.counts_below == [int((ordered < ordered[k]).sum()) for k in ks]


@pytest.mark.parametrize(("inter", "dtype"), [("consensus", None), ("normalized", None),
                                              ("pairwise", None), ("consensus", "bfloat16")])
def test_kept_scores_give_the_streamed_bits(tmp_path: Path, monkeypatch, inter: str,
                                            dtype: str | None) -> None:
    """An in-memory merge with a memo keeps each part's scores from the first score pass
    for the second and the merge: every part scored once instead of three times, and the
    bits of `pcbmerge run`'s streamed merge (in slices, too)."""
    from mergekit_pcb.engine.memo import PreparedMemo
    from mergekit_pcb.engine.stream import merge_in_memory, slices
    from mergekit_pcb.methods import pcb as pcb_module

    monkeypatch.setattr("mergekit_pcb.engine.stream.CHUNK_ELEMENTS", 97)
    base_dir, tuned_dirs, *_ = make_models(tmp_path, 3, seed=17)
    recipe = pcb_recipe(base_dir, tuned_dirs, inter=inter)
    if dtype:  # bf16 inputs: the passes' τ and the merge's are both float32, kept too
        recipe["dtype"] = dtype
    streamed = run_recipe(tmp_path, recipe, "streamed")
    calls = []
    scores = pcb_module.pcb_scores
    monkeypatch.setattr(pcb_module, "pcb_scores",
                        lambda *a, **k: calls.append(1) or scores(*a, **k))
    plan = plan_recipe_file(write_recipe(tmp_path / "mem.yaml", recipe))
    try:
        parts = sum(len(slices(plan, t)) for t in plan.tasks if t.route.stats is not None)
        assert parts > len(SHAPES)  # a tensor in several slices
        kept = merge_in_memory(plan, memo=PreparedMemo(1 << 20))
        assert len(calls) == parts  # once per part
        calls.clear()
        again = merge_in_memory(plan)  # no memo: the streaming engine's three times
        assert len(calls) == 3 * parts
    finally:
        plan.close()
    for name in streamed:
        assert torch.equal(kept[name], streamed[name]), name
        assert torch.equal(again[name], streamed[name]), name
