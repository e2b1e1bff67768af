"""Post-processing steps (methods.postprocess) against float64 references written from the
official code's steps: FusionBench's `subspace_consistency_spectral_calibration` (one
singular direction at a time, explicit dot products) and LiNeS's `LiNeS_scaling` /
`create_task_vector` (block keys `.{i}.`, a = ‖Σ τ‖₁ / ‖τ_merged‖₁ / K)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, write_recipe
from test_end_to_end import load_state

from mergekit_pcb.methods.postprocess import (
    lines_alpha,
    lines_factor,
    lines_scale,
    rescale_norms,
    svc,
)


def svc_reference(base: torch.Tensor, tasks: list[torch.Tensor], merged: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """Algorithm 1 step by step in float64: SVD of ΔW_merge; per direction r, a_r = u_rᵀΔ
    for the merge and for each task; s_r^i = ⟨a_r^merge, a_r^i⟩ / max(‖a_r^i‖², 1e-12);
    γ_r = K / Σ_i max(α, s_r^i); W = U diag(γ σ) Vᵀ + W_pre."""
    base = base.double()
    deltas = [t.double() - base for t in tasks]
    dm = merged.double() - base
    u, s, vh = torch.linalg.svd(dm, full_matrices=False)
    gammas = []
    for r in range(u.shape[1]):
        a_merge = u[:, r] @ dm
        total = 0.0
        for d in deltas:
            a_task = u[:, r] @ d
            coef = float(torch.dot(a_merge, a_task)) / max(float(torch.dot(a_task, a_task)),
                                                             1e-12)
            total += max(alpha, coef)
        gammas.append(len(deltas) / total)
    return u @ torch.diag(torch.tensor(gammas, dtype=torch.float64) * s) @ vh + base


@pytest.mark.parametrize("shape,k,alpha", [((6, 4), 3, 0.1), ((4, 7), 2, 1.0),
                                           ((5, 5), 4, 0.5)])
def test_svc_matches_reference(shape: tuple[int, int], k: int, alpha: float) -> None:
    g = torch.Generator().manual_seed(sum(shape) * 10 + k)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    shared = torch.randn(shape, generator=g, dtype=torch.float64)  # over-counted by the sum
    tasks = [base + 0.5 * shared + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
             for _ in range(k)]
    merged = base + sum(t - base for t in tasks)  # task arithmetic, λ = 1
    expected = svc_reference(base, tasks, merged, alpha)
    got = base + svc(merged - base, [t - base for t in tasks], alpha)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # The over-counted spectrum is shrunk: the calibrated update is smaller than the sum.
    assert torch.linalg.norm(got - base) < torch.linalg.norm(merged - base)


def test_svc_keeps_dtype_and_leaves_vectors() -> None:
    g = torch.Generator().manual_seed(1)
    update = torch.randn(8, 3, generator=g, dtype=torch.float32)
    tasks = [torch.randn(8, 3, generator=g) for _ in range(2)]
    out = svc(update, tasks)
    assert out.dtype == torch.float32
    expected = svc(update.double(), [t.double() for t in tasks])
    torch.testing.assert_close(out, expected.float())
    bias = torch.randn(5, generator=g)
    assert svc(bias, [torch.randn(5, generator=g)]) is bias  # 1-D: untouched


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_svc_single_task_returns_its_update(alpha: float) -> None:
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(7, 5, generator=g)
    torch.testing.assert_close(svc(tau, [tau], alpha), tau, rtol=1e-6, atol=1e-6)
    # rank-deficient: the zero singular values stay zero, whatever γ there
    low = torch.randn(7, 2, generator=g) @ torch.randn(2, 5, generator=g)
    torch.testing.assert_close(svc(low, [low], alpha), low, rtol=1e-6, atol=1e-6)


def lines_reference(vector: dict[str, torch.Tensor], alpha: float, beta: float,
                    num_blocks: int) -> dict[str, torch.Tensor]:
    """LiNeS_scaling: the first block key `.{i}.` found in the name sets the layer; keys
    outside every block get alpha."""
    keys = [f".{i}." for i in range(num_blocks)]
    scale = {}
    for k in vector:
        for layer, block in enumerate(keys):
            if block in k:
                scale[k] = alpha + beta * (layer / (num_blocks - 1))
                break
    return {k: v.double() * scale.get(k, alpha) for k, v in vector.items()}


def test_lines_matches_reference() -> None:
    g = torch.Generator().manual_seed(3)
    names = ["embed.weight", *[f"layers.{i}.mlp.weight" for i in range(4)], "norm.weight"]
    tasks = [{n: torch.randn(3, 2, generator=g).double() for n in names} for _ in range(3)]
    merged = {n: sum(t[n] for t in tasks) * 0.4 for n in names}  # TA with λ = 0.4
    # a from the two whole-model L1 norms, as create_task_vector/evaluate compute them
    summed_l1 = float(sum(sum(t[n] for t in tasks).abs().sum() for n in names))
    merged_l1 = float(sum(merged[n].abs().sum() for n in names))
    a_ref = (summed_l1 / merged_l1) * 1 / 3
    a = lines_alpha(summed_l1, merged_l1, 3)
    assert a == pytest.approx(a_ref, rel=1e-15)
    assert a == pytest.approx(1 / 3 / 0.4, rel=1e-12)  # TA: the mean task vector's scale
    expected = lines_reference(merged, a, 0.7, 4)
    for n in names:
        idx = int(n.split(".")[1]) if n.startswith("layers.") else None
        torch.testing.assert_close(lines_scale(merged[n], idx, 4, a, 0.7), expected[n],
                                   rtol=1e-15, atol=0)
    assert lines_factor(3, 4, 0.2, 0.6) == pytest.approx(0.8)
    assert lines_factor(0, 4, 0.2, 0.6) == 0.2
    assert lines_factor(None, 4, 0.2, 0.6) == 0.2


def test_lines_identity_is_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        update = torch.randn(4, 4, generator=g).to(dtype)
        for idx in (None, 0, 5):
            out = lines_scale(update, idx, 6, 1.0, 0.0)
            assert out.dtype == dtype and torch.equal(out, update)


def test_rescale_norms_equalises_to_the_mean() -> None:
    g = torch.Generator().manual_seed(5)
    tasks = [torch.randn(10, generator=g) * s for s in (0.1, 1.0, 5.0)]
    out = rescale_norms(tasks)
    norms = [float(torch.linalg.vector_norm(t.double())) for t in tasks]
    target = sum(norms) / 3
    for t, o, n in zip(tasks, out, norms, strict=True):
        assert float(torch.linalg.vector_norm(o.double())) == pytest.approx(target, rel=1e-6)
        torch.testing.assert_close(o.double(), t.double() * (target / n))  # direction kept
    # with whole-model norms given, each tensor gets its model's factor
    given = rescale_norms(tasks, [1.0, 2.0, 0.0])
    torch.testing.assert_close(given[0], tasks[0] * 1.0)
    torch.testing.assert_close(given[1], tasks[1] * 0.5)
    assert given[2] is tasks[2]  # a zero norm: left as it is


# --- the recipe key, end to end --------------------------------------------------------

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def _recipe(base: Path, tuned: list[Path], postprocess: list | None = None,
            method: str = "task_arithmetic") -> dict:
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(t), "parameters": {"weight": w, "density": 0.5}}
                         for t, w in zip(tuned, (1.0, 0.7, 0.4), strict=False)],
              "parameters": {"lambda": 0.8}}
    if method == "task_arithmetic":
        for m in recipe["models"]:
            del m["parameters"]["density"]
    if postprocess is not None:
        recipe["postprocess"] = postprocess
    return recipe


def _run(tmp_path: Path, name: str, recipe: dict) -> dict[str, torch.Tensor]:
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    proc = run_cli("run", path, "-o", tmp_path / name, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return load_state(tmp_path / name)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_run_with_svc_and_lines_equals_dense_reference(
        tmp_path: Path, hf_models: Callable[..., tuple[Path, list[Path]]], method: str) -> None:
    base_dir, tuned_dirs = hf_models("llama", 3)
    plain = _run(tmp_path, "plain", _recipe(base_dir, tuned_dirs, method=method))
    steps = [{"svc": {"alpha": 0.1}}, {"lines": {"b": 0.6}}]
    post = _run(tmp_path, "post", _recipe(base_dir, tuned_dirs, steps, method))
    base = load_state(base_dir)
    tuned = [load_state(t) for t in tuned_dirs]
    # the dense reference on the plain merge's output: SVC per matrix (not the vocabulary
    # matrices), then LiNeS with a from the whole-model L1 norms, L = num_hidden_layers = 2
    updates: dict[str, torch.Tensor] = {}
    for name, b in base.items():
        delta = plain[name].double() - b.double()
        if delta.dim() == 2 and name not in VOCAB:
            delta = svc_reference(b, [t[name] for t in tuned], b.double() + delta, 0.1) \
                - b.double()
        updates[name] = delta
    summed = sum(float(sum(t[n].double() - base[n].double() for t in tuned).abs().sum())
                 for n in base)
    a = summed / sum(float(u.abs().sum()) for u in updates.values()) / 3
    reference = lines_reference(updates, a, 0.6, 2)
    assert set(post) == set(base)
    for name, b in base.items():
        torch.testing.assert_close(post[name].double(), b.double() + reference[name],
                                   rtol=2e-5, atol=2e-6, msg=name)
    # and the steps did something: layer 1's update is a + 0.6, layer 0's a
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(post[q1], plain[q1])
    assert not torch.allclose(post[q0], plain[q0])


def test_lines_identity_leaves_the_merge_bit_for_bit(
        tmp_path: Path, hf_models: Callable[..., tuple[Path, list[Path]]]) -> None:
    base_dir, tuned_dirs = hf_models("gpt2", 2)
    plain = _run(tmp_path, "plain", _recipe(base_dir, tuned_dirs, method="ties"))
    same = _run(tmp_path, "same", _recipe(base_dir, tuned_dirs, [{"lines": {"a": 1.0, "b": 0.0}}],
                                         "ties"))
    assert set(same) == set(plain)
    for name in plain:
        assert torch.equal(same[name], plain[name]), name


def test_rescale_norms_equalises_before_the_merge(
        tmp_path: Path, hf_models: Callable[..., tuple[Path, list[Path]]]) -> None:
    base_dir, tuned_dirs = hf_models("bert", 2)
    out = _run(tmp_path, "out", _recipe(base_dir, tuned_dirs, ["rescale_norms"]))
    base = load_state(base_dir)
    tuned = [load_state(t) for t in tuned_dirs]
    # the merged tensors: floating ones that are not buffers (bert's position_ids is int)
    names = [n for n, b in base.items() if b.dtype.is_floating_point]
    norms = [math.sqrt(sum(float(((t[n].double() - base[n].double()) ** 2).sum())
                           for n in names)) for t in tuned]
    target = sum(norms) / 2
    for n in names:
        tau = [(t[n].double() - base[n].double()) * (target / s)
               for t, s in zip(tuned, norms, strict=True)]
        expected = base[n].double() + 0.8 * (1.0 * tau[0] + 0.7 * tau[1])
        torch.testing.assert_close(out[n].double(), expected, rtol=1e-5, atol=1e-6, msg=n)


def test_dry_run_shows_the_step_plan_and_blocks(
        tmp_path: Path, hf_models: Callable[..., tuple[Path, list[Path]]]) -> None:
    base_dir, tuned_dirs = hf_models("llama", 2)
    path = write_recipe(tmp_path / "r.yaml", _recipe(
        base_dir, tuned_dirs, ["rescale_norms", {"svc": {}}, {"lines": {"b": 0.5}}]))
    proc = run_cli("run", path, "-o", tmp_path / "out", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["pass_names"] == ["task-vector norms", "LiNeS norms", "merge"]
    post = info["postprocess"]
    assert post["blocks"] == 2 and post["num_tasks"] == 2
    assert post["block_of"]["model.layers.1.mlp.up_proj.weight"] == 1
    assert post["block_of"]["model.layers.0.input_layernorm.weight"] == 0
    assert post["block_of"]["lm_head.weight"] is None
    assert [s["svc"]["alpha"] for s in post["steps"] if "svc" in s] == [0.1]
    text = run_cli("run", path, "-o", tmp_path / "out", "--dry-run")
    assert "postprocess[2] lines" in text.stdout and "block 1: 9 tensors" in text.stdout
    assert not (tmp_path / "out").exists()
    # a layers pattern of our own: only the MLPs are in blocks, numbered by their layer
    recipe = _recipe(base_dir, tuned_dirs, [{"lines": {"b": 0.5, "layers": r"layers\.(\d+)\.mlp"}}])
    path = write_recipe(tmp_path / "r2.yaml", recipe)
    info = json.loads(run_cli("run", path, "-o", tmp_path / "out", "--dry-run",
                              "--json").stdout)
    blocks = info["postprocess"]["block_of"]
    assert blocks["model.layers.1.mlp.up_proj.weight"] == 1
    assert blocks["model.layers.1.self_attn.q_proj.weight"] is None


@pytest.mark.parametrize("steps,message", [
    ([{"lines": {"b": 1, "c": 2}}], "unknown key 'postprocess[0].lines.c'"),
    ([{"calibrate": {}}], "unknown key 'postprocess[0].calibrate'"),
    ([{"svc": {}}, "rescale_norms"], "postprocess[1]: rescale_norms acts on the task vectors"),
    ([{"lines": {"b": 1}}, {"lines": {"b": 2}}], "postprocess[1]: one lines step"),
    ([{"svc": {"alpha": -1}}], "'postprocess[0].svc.alpha'"),
])
def test_bad_steps_one_line_exit_2(tmp_path: Path, steps: list, message: str) -> None:
    recipe = {"merge_method": "task_arithmetic", "base_model": "nowhere-base",
              "models": [{"model": "nowhere-ft"}], "postprocess": steps}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cli("run", path, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_postprocess_needs_a_base(tmp_path: Path) -> None:
    recipe = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}],
              "postprocess": [{"lines": {"b": 0.5}}]}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cli("run", path, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 2 and "postprocess: the steps act on merged − base" in proc.stderr


@pytest.mark.parametrize("method", ["task_arithmetic", "pcb"])
def test_streamed_in_slices_as_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     hf_models: Callable[..., tuple[Path, list[Path]]],
                                     method: str) -> None:
    """Elementwise merges (task arithmetic, global PCB) stream large tensors in slices:
    LiNeS scales each slice, SVC takes its matrices whole; the result is the same (up to
    the last bits of a, whose float64 sums follow the parts)."""
    from mergekit_pcb.engine import merge_recipe_file, stream

    base_dir, tuned_dirs = hf_models("llama", 2)
    recipe = _recipe(base_dir, tuned_dirs, [{"svc": {"alpha": 0.2}}, {"lines": {"b": 0.3}}],
                     method="task_arithmetic")
    if method == "pcb":
        recipe = {**recipe, "merge_method": "pcb", "parameters": {"scope": "global"}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    merge_recipe_file(path, tmp_path / "whole")
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    merge_recipe_file(path, tmp_path / "sliced")
    whole, sliced = load_state(tmp_path / "whole"), load_state(tmp_path / "sliced")
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-6, atol=1e-8, msg=name)


# --- inside the coefficient search -------------------------------------------------------

def test_coefficient_search_searches_lines_b(tmp_path: Path) -> None:
    """`search: {lines.b: null}` spans LiNeS's own range [0, 1] (the paper's validation
    grid), each candidate merges with its b, and the best recipe carries it."""
    from test_coefsearch import build_population, load, recipe_dict, search
    from test_coefsearch import write_recipe as write_search

    pop = build_population(tmp_path / "pop")
    merge = {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0},
             # the MLP's "0.weight", "2.weight": blocks 0 and 2 of L = 3 by this pattern
             "postprocess": [{"svc": {"alpha": 0.1}},
                             {"lines": {"b": 0.0, "layers": r"^(\d+)\."}}]}
    data = recipe_dict(pop, merge=merge, search={"lines.b": None, "lambda": [0.5, 1.5]},
                       budget=5, grid={"lines.b": [0.2, 0.9]})
    data["fitness"].pop("report")
    path = write_search(pop, data)
    _, space, _ = load(path)
    b = next(v for v in space.variables if v.param == "lines.b")
    assert (b.low, b.high, b.default, b.member) == (0.0, 1.0, 0.0, None)
    assert not space.fast  # the fast path has no post-processing: full merges
    point = [0.7 if v.param == "lines.b" else 1.1 for v in space.variables]
    candidate = space.merge_data(point)
    assert candidate["postprocess"][1]["lines"] == {"b": 0.7, "layers": r"^(\d+)\."}
    assert candidate["postprocess"][0] == {"svc": {"alpha": 0.1, "vocabulary": False}}
    assert candidate["parameters"]["lambda"] == 1.1
    # the merge of a point is the plain merge post-processed with that b
    from mergekit_pcb.engine import build_plan, merge_in_memory

    plans = [build_plan(space.merge_recipe(p, 0), "") for p in
             ([0.0, 1.0], [0.9, 1.0])]
    outs = [merge_in_memory(p) for p in plans]
    a = plans[0].postprocess.lines_a  # type: ignore[union-attr]
    for p in plans:
        p.close()
    assert a is not None and a == pytest.approx(plans[1].postprocess.lines_a)  # type: ignore[union-attr]
    base = load_state(pop / "base")
    for name, layer in (("0.weight", 0), ("2.weight", 2)):
        d0, d9 = outs[0][name] - base[name], outs[1][name] - base[name]
        # same calibrated update, scaled by a + 0.9·ℓ/2 instead of a
        torch.testing.assert_close(d9, d0 * ((a + 0.9 * layer / 2) / a), rtol=1e-5, atol=1e-6)
    # the search runs: the grid's two b, and the search's own points, each scored
    summary = search(path, pop / "out")
    doc = json.loads((pop / "out" / "search.json").read_text())
    grid = [e["point"]["lines.b"] for e in doc["evaluations"] if e["phase"] == "grid"]
    assert grid == [0.2, 0.9]
    scores = {e["point"]["lines.b"]: e["select"] for e in doc["evaluations"]}
    assert len(set(scores.values())) > 1  # b changes the merge and so the loss
    best = yaml.safe_load((pop / "out" / "best_recipe.yaml").read_text())
    assert best["postprocess"][1]["lines"]["b"] == summary["best"]["point"]["lines.b"] \
        or summary["best"]["phase"] == "default"


def test_population_search_merges_with_the_steps(tmp_path: Path) -> None:
    """An evolution's inner merge with `postprocess:`: its output is the final population's
    task arithmetic, calibrated and LiNeS-scaled, recomputed here from the functions."""
    from safetensors.torch import load_file
    from test_evolve_engine import build_population, recipe_dict
    from test_evolve_engine import write_recipe as write_evolution

    from mergekit_pcb.evolve.run import evolve

    pop = build_population(tmp_path / "pop")
    data = recipe_dict(pop, generations=1)
    data["merge"] = {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5},
                     "postprocess": [{"svc": {}}, {"lines": {"b": 0.4, "layers": r"^(\d+)\."}}]}
    out = pop / "out"
    summary = evolve(write_evolution(pop, data), out, trust_code=True)
    doc = json.loads((out / "evolution.json").read_text())
    members = [load_file(str(summary.run_dir / "members" / m)) for m in doc["final"]["members"]]
    base = load_file(str(pop / "base" / "model.safetensors"))
    result = load_file(str(out / "model.safetensors"))
    updates = {}
    for name, b in base.items():
        taus = [m[name].double() - b.double() for m in members]
        updates[name] = svc(0.5 * sum(taus), taus, 0.1) if b.dim() == 2 else 0.5 * sum(taus)
    summed = sum(float(sum(m[n].double() - base[n].double() for m in members).abs().sum())
                 for n in base)
    a = lines_alpha(summed, sum(float(u.abs().sum()) for u in updates.values()), 3)
    for name, b in base.items():
        layer = int(name.split(".")[0])
        expected = b.double() + updates[name] * lines_factor(layer, 3, a, 0.4)
        torch.testing.assert_close(result[name].double(), expected, rtol=1e-5, atol=1e-6,
                                   msg=name)
