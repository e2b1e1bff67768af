"""Value checks for the spectral merges (tsv_m, iso_c, iso_cts, cart, wudi).

1. Each method against a float64 reference written here from the official code's steps
   (literal loops over torch.linalg.svd, the official polar as U_u·V_u of a full SVD,
   torch.optim.Adam on the official loss through autograd), never calling the package's
   spectral core. The one change to the official steps: singular directions with s = 0
   (a zero or rank-deficient Δ) are zeroed, since LAPACK returns arbitrary vectors there
   and the official result is not defined by its inputs.
2. Properties: model order, linearity, reductions (one task, rank ratio 1), the WUDI
   optimum, the randomized SVD's error, the Newton–Schulz path.
3. `pcbmerge run` of each method on a tiny Llama, one tensor checked against the reference.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import finetune_like, run_cli, save_hf, tiny_model, write_recipe
from safetensors.torch import load_file

from mergekit_pcb.methods import REGISTRY, TensorInputs, get_method
from mergekit_pcb.methods.iso_c import iso_c_matrix
from mergekit_pcb.methods.spectral import newton_schulz_polar, polar, randomized_svd
from mergekit_pcb.methods.tsv_m import tsv_merge_matrix
from mergekit_pcb.methods.wudi import wudi_adam, wudi_closed_form, wudi_loss
from mergekit_pcb.threads import torch_threads

F64 = torch.float64
ZERO_REL = 1e-12  # float64: singular values this small (relative) are exact zeros
SPECTRAL = ("tsv_m", "iso_c", "iso_cts", "cart", "wudi")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny matrices: torch's thread pool costs 10-40× on a machine other jobs keep busy."""
    with torch_threads(1):
        yield


# ------------------------------------------------------------------ float64 references
def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(m, full_matrices=False)


def _nonzero(s: torch.Tensor, ref: float) -> torch.Tensor:
    return ((s > ZERO_REL * ref) & (s > 0)).to(s.dtype)


def ref_tsv(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """compute_and_sum_svd_mem_reduction, one key."""
    sv_reduction = 1 / len(deltas)
    sum_u = sum_s = sum_v = None
    for i, vec in enumerate(deltas):
        u, s, v = _svd(vec)
        nz = _nonzero(s, float(s[0]))
        u, s, v = u * nz, s * nz, v * nz[:, None]
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * sv_reduction)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    assert sum_u is not None and sum_s is not None and sum_v is not None
    u_u, _, v_u = _svd(sum_u)
    u_v, _, v_v = _svd(sum_v)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def ref_iso_c(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """iso_c, one key."""
    new = sum(deltas) / len(deltas) * len(deltas)
    u, s, v = _svd(new)
    nz = _nonzero(s, float(s[0])).bool()
    s_mean = torch.ones_like(s) * s.mean()
    return torch.linalg.multi_dot((u[:, nz], torch.diag(s_mean[nz]), v[nz]))


def ref_iso_cts(deltas: Sequence[torch.Tensor], fraction: float = 0.8) -> torch.Tensor:
    """iso_cts, one key."""
    shape_ = deltas[0].shape
    tasks = len(deltas)
    combined_w = sum(deltas)
    common = int(min(shape_) * fraction)
    total_ts = round((min(shape_) - common) / tasks) * tasks
    common = min(shape_) - total_ts
    u, s, v = _svd(combined_w)
    nz = _nonzero(s, float(s[0]))
    cu, cs, cv = (u * nz)[:, :common], (s * nz)[:common], (v * nz[:, None])[:common]
    per = int((min(shape_) - common) / tasks)
    for i, w in enumerate(deltas):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = _svd(w_ts)
        nzt = _nonzero(s_ts, float(torch.linalg.matrix_norm(w, ord=2)))
        u_ts, s_ts, v_ts = u_ts * nzt, s_ts * nzt, v_ts * nzt[:, None]
        if i == 0:
            all_u, all_s, all_v = (torch.zeros_like(u_ts), torch.zeros_like(s_ts),
                                   torch.zeros_like(v_ts))
        all_u[:, i * per:(i + 1) * per] = u_ts[:, :per]
        all_s[i * per:(i + 1) * per] = s_ts[:per]
        all_v[i * per:(i + 1) * per] = v_ts[:per]
    all_u[:, tasks * per:tasks * per + common] = cu
    all_s[tasks * per:tasks * per + common] = cs
    all_v[tasks * per:tasks * per + common] = cv
    # the official polar (U_u·V_u); zeroed slots only drop arbitrary directions
    pu, su, pvu = _svd(all_u)
    pv, sv, pvv = _svd(all_v)
    ku, kv = _nonzero(su, float(su[0])).bool(), _nonzero(sv, float(sv[0])).bool()
    return all_s.mean() * (pu[:, ku] @ pvu[ku]) @ (pv[:, kv] @ pvv[kv])


def ref_cart(base: torch.Tensor, deltas: Sequence[torch.Tensor], ratio: float,
             prior: float) -> torch.Tensor:
    """_merge_weights('CART'), one key it acts on: the merged weight."""
    theta_avg = base + (1.0 / len(deltas)) * sum(deltas)
    recon_sum = torch.zeros_like(base)
    for value in deltas:
        val = value + base - theta_avg
        u, s, v_t = _svd(val)
        dim = s.shape[0]
        parsed = dim if ratio == 1.0 else max(1, int(ratio * dim))
        recon_sum = recon_sum + (u[:, :parsed] * s[:parsed]) @ v_t[:parsed, :]
    return theta_avg + prior * recon_sum


def ref_wudi_adam(deltas: Sequence[torch.Tensor], iter_num: int = 300,
                  lr: float = 1e-5) -> torch.Tensor:
    """get_redundant_task_vector (official loss by autograd, torch.optim.Adam). A zero Δᵢ
    makes the official loss 0/0 (NaN); its term is left out, as it is zero."""
    vectors = torch.stack(list(deltas))
    merging = torch.nn.Parameter(torch.sum(vectors, dim=0))
    opt = torch.optim.Adam([merging], lr=lr, weight_decay=0)
    l2 = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    vectors, l2 = vectors[l2 > 0], l2[l2 > 0]
    for _ in range(iter_num):
        inner = torch.matmul(merging.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / l2.unsqueeze(-1).unsqueeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merging.data.detach()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(torch.linalg.vector_norm(b.to(F64)))
    return float(torch.linalg.vector_norm(a.to(F64) - b.to(F64))) / max(den, 1e-300)


# ------------------------------------------------------------------ cases
def make_case(tasks: int, shape: tuple[int, int], special: str, seed: int = 0
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and fine-tuned float32 matrices; `special`: '' | 'rank' (task 0's Δ has rank 3,
    exactly) | 'zero' (task 0's Δ is zero)."""
    g = torch.Generator().manual_seed(seed + 100 * tasks + shape[0])
    base = torch.randn(shape, generator=g)
    deltas = [0.05 * torch.randn(shape, generator=g) for _ in range(tasks)]
    if special == "rank":
        # exactly rank 3 in float32 too: small integers times powers of two, so that
        # neither the product, base + Δ nor the subtraction rounds
        base = torch.randint(-64, 65, shape, generator=g).float() / 32
        low = torch.randint(-3, 4, (shape[0], 3), generator=g).float()
        high = torch.randint(-3, 4, (3, shape[1]), generator=g).float()
        deltas[0] = (low @ high) / 256
    if special == "zero":
        deltas[0] = torch.zeros(shape)
    return base, [base + d for d in deltas]


def inputs_for(name: str, base: torch.Tensor, models: Sequence[torch.Tensor],
               is_vocabulary: bool = False, seed: int = 0, **params: Any) -> TensorInputs:
    """The method's view of one matrix; `is_vocabulary` says the engine marks it as a
    vocabulary matrix, `params` (the recipe's `vocabulary` among them) override defaults."""
    method = REGISTRY[name]
    full = {s.name: s.default for s in method.params} | params
    gens = [torch.Generator().manual_seed(seed) for _ in models]
    return TensorInputs(name="model.layers.0.mlp.up_proj.weight", base=base,
                        models=list(models), model_params=[{}] * len(models), params=full,
                        generators=gens, vocabulary=is_vocabulary)


def merge(name: str, base: torch.Tensor, models: Sequence[torch.Tensor], **params: Any
          ) -> torch.Tensor:
    return get_method(name).merge(inputs_for(name, base, models, **params))


def reference(name: str, base: torch.Tensor, models: Sequence[torch.Tensor],
              **params: Any) -> torch.Tensor:
    b = base.to(F64)
    deltas = [m.to(F64) - b for m in models]
    alpha = params.get("alpha", 1.0)
    if name == "tsv_m":
        return b + alpha * ref_tsv(deltas)
    if name == "iso_c":
        return b + alpha * ref_iso_c(deltas)
    if name == "iso_cts":
        return b + alpha * ref_iso_cts(deltas, params.get("common_space_fraction", 0.8))
    if name == "cart":
        return ref_cart(b, deltas, params.get("rank_ratio", 0.12), params.get("lambda", 2.0))
    assert name == "wudi"
    return b + ref_wudi_adam(deltas, params.get("steps", 300))


CASES = [(t, shape, special) for t in (2, 3, 4, 5) for shape in ((12, 8), (8, 12))
         for special in ("", "rank", "zero")]
# float32 against float64, relative to the merged task matrix: measured worst 2.6e-6
# (wudi's 300 Adam steps: 2.5e-7); the bound leaves rounding room across LAPACK builds.
TOL = 2e-5


@pytest.mark.parametrize("name", SPECTRAL)
def test_against_the_official_steps(name: str) -> None:
    worst = 0.0
    params: dict[str, Any] = {"matrices": "all_2d"} if name in ("cart", "wudi") else {}
    if name == "cart":
        params["rank_ratio"] = 0.3  # k = 2 of r = 8: a real truncation
    if name == "wudi":
        params["steps"] = 30  # 24 autograd references; the default 300 runs in the bf16 test
    for tasks, shape, special in CASES:
        base, models = make_case(tasks, shape, special)
        ours = merge(name, base, models, **params)
        ref = reference(name, base, models, **params)
        assert ours.dtype == torch.float32
        err = rel(ours - base, ref - base.to(F64))
        assert err < TOL, (name, tasks, shape, special, err)
        worst = max(worst, err)
    print(f"{name}: worst relative error against float64 {worst:.2e}")


@pytest.mark.parametrize("name", SPECTRAL)
def test_bf16_inputs_are_upcast_before_the_subtraction(name: str) -> None:
    base, models = make_case(3, (12, 8), "")
    base16, models16 = base.bfloat16(), [m.bfloat16() for m in models]
    params: dict[str, Any] = {"matrices": "all_2d"} if name in ("cart", "wudi") else {}
    ours = merge(name, base16, models16, **params)
    ref = reference(name, base16, models16, **params)  # float64 from the bf16 values
    assert rel(ours - base16.float(), ref - base16.double()) < TOL
    # a bf16 subtraction would round Δ to bf16 first: far outside that tolerance
    naive = [(m - base16).float() + base16.float() for m in models16]
    assert rel(reference(name, base16, naive, **params) - base16.double(),
               ref - base16.double()) > 10 * TOL


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("name", SPECTRAL)
def test_result_does_not_depend_on_model_order(name: str) -> None:
    base, models = make_case(4, (12, 8), "rank")
    params: dict[str, Any] = {"matrices": "all_2d"} if name in ("cart", "wudi") else {}
    first = merge(name, base, models, **params)
    for order in itertools.islice(itertools.permutations(range(4)), 1, 24, 5):
        other = merge(name, base, [models[i] for i in order], **params)
        assert rel(other - base, first - base) < 1e-5, order


def test_iso_c_scales_linearly_with_the_task_vectors() -> None:
    base, models = make_case(3, (8, 12), "")
    deltas = [m - base for m in models]
    once = iso_c_matrix([d.double() for d in deltas])
    for c in (2.5, -0.5, 1e-3):
        scaled = iso_c_matrix([c * d.double() for d in deltas])
        assert rel(scaled, c * once) < 1e-12, c


def test_tsv_of_one_task_with_k_equal_r_is_that_task() -> None:
    base, models = make_case(1, (12, 8), "")
    out = merge("tsv_m", base, models, alpha=1.0)
    assert rel(out - base, models[0] - base) < 2e-6


def test_cart_with_rank_ratio_one_is_the_average() -> None:
    base, models = make_case(4, (8, 12), "")
    avg = torch.stack([m.double() for m in models]).mean(0)
    out = merge("cart", base, models, rank_ratio=1.0, matrices="all_2d", **{"lambda": 1.7})
    assert rel(out, avg) < 1e-6


@pytest.mark.parametrize(("tasks", "shape"), [(4, (12, 8)), (2, (4, 12))])
def test_wudi_closed_form_zeroes_the_gradient_and_adam_lowers_the_loss(
        tasks: int, shape: tuple[int, int]) -> None:
    """(4, 12) with 2 tasks: A = Σ wᵢΔᵢᵀΔᵢ (12×12) has rank 8, the pseudo-inverse path."""
    base, models = make_case(tasks, shape, "rank")
    deltas = [(m - base).double() for m in models]
    start = sum(deltas)

    def loss_and_grad(x: torch.Tensor) -> tuple[float, float]:
        x = x.double().clone().requires_grad_(True)
        loss = wudi_loss(x, deltas)
        loss.backward()
        assert x.grad is not None
        return float(loss.detach()), float(torch.linalg.vector_norm(x.grad))

    l_start, g_start = loss_and_grad(start)
    l_closed, g_closed = loss_and_grad(wudi_closed_form(deltas))
    l_adam, _ = loss_and_grad(wudi_adam([d.float() for d in deltas]))
    assert g_closed < 1e-10 * g_start
    assert l_closed < l_adam < l_start
    # the solution nearest the start: no move along A's null space
    a = sum(d.mT @ d / d.square().sum() for d in deltas if d.abs().sum() > 0)
    evals, evecs = torch.linalg.eigh(a)
    null = evecs[:, evals < 1e-12 * evals.max()]
    ranks = sum(int(torch.linalg.matrix_rank(d)) for d in deltas)
    assert null.shape[1] == max(0, shape[1] - ranks)
    moved = (wudi_closed_form(deltas) - start) @ null
    assert moved.numel() == 0 or float(moved.abs().max()) < 1e-12
    print(f"wudi loss: sum {l_start:.4e}, adam {l_adam:.4e}, closed form {l_closed:.4e}")
    # the registry's solver option reaches it, and the closed form is not the default
    out = merge("wudi", base, models, solver="closed_form", matrices="all_2d")
    assert rel(out - base, wudi_closed_form(deltas)) < 1e-6
    assert rel(merge("wudi", base, models, matrices="all_2d") - base,
               wudi_closed_form(deltas)) > 1e-3


def test_randomized_svd_error_against_the_full_svd() -> None:
    """Top-k triplets of a 256×128 matrix with a decaying spectrum (a task matrix's is)."""
    g = torch.Generator().manual_seed(3)
    q1 = torch.linalg.qr(torch.randn(256, 128, generator=g)).Q
    q2 = torch.linalg.qr(torch.randn(128, 128, generator=g)).Q
    spectrum = 0.9 ** torch.arange(128, dtype=torch.float32)
    m = (q1 * spectrum) @ q2.mT
    k = 16
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    ur, sr, vhr = randomized_svd(m, k, torch.Generator().manual_seed(0))
    s_err = float((sr - s[:k]).abs().max() / s[0])
    rec_err = rel((ur * sr) @ vhr, (u[:, :k] * s[:k]) @ vh[:k])
    # in a merge: TSV-M of 8 tasks (k = 16 each) with svd: randomized against the full SVD
    deltas = [m.roll(3 * i, 0) for i in range(8)]
    full = tsv_merge_matrix(deltas)
    approx = tsv_merge_matrix(deltas, "randomized", torch.Generator().manual_seed(0))
    merge_err = rel(approx, full)
    print(f"randomized SVD, k={k}: singular values {s_err:.1e}, rank-k part {rec_err:.1e}, "
          f"TSV-M merge {merge_err:.1e}")
    assert s_err < 1e-5 and rec_err < 1e-4 and merge_err < 1e-4
    # seeded: the same draw gives the same bits
    again = tsv_merge_matrix(deltas, "randomized", torch.Generator().manual_seed(0))
    assert torch.equal(approx, again)


def test_newton_schulz_iso_c_equals_the_svd_form() -> None:
    for tasks, shape in ((2, (12, 8)), (5, (8, 12)), (3, (40, 40))):
        base, models = make_case(tasks, shape, "")
        svd = merge("iso_c", base, models, solver="svd")
        ns = merge("iso_c", base, models, solver="newton_schulz")
        assert rel(ns - base, svd - base) < 1e-5, (tasks, shape)
    q, ok = newton_schulz_polar(torch.randn(30, 20, generator=torch.Generator().manual_seed(1)))
    assert ok and rel(q.mT @ q, torch.eye(20)) < 1e-5


def test_rank_threshold_drops_the_arbitrary_directions() -> None:
    """A rank-2 sum: Iso-C's result lies in its row and column spaces (the official code
    would add r − 2 directions LAPACK picks, each of weight s̄)."""
    g = torch.Generator().manual_seed(5)
    left, right = torch.randn(12, 2, generator=g), torch.randn(2, 8, generator=g)
    deltas = [left @ right, 0.5 * left @ right]
    out = iso_c_matrix(deltas)
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    outside = out - u[:, :2] @ (u[:, :2].mT @ out)
    assert float(outside.abs().max()) < 1e-5 * float(out.abs().max())
    assert rel(out, s.mean() * u[:, :2] @ vh[:2]) < 1e-5
    p = polar(torch.cat([left, torch.zeros(12, 3)], dim=1))
    assert torch.linalg.matrix_rank(p) == 2


# ------------------------------------------------------------------ which tensors
@pytest.mark.parametrize("name", SPECTRAL)
def test_tensors_a_method_does_not_decompose(name: str) -> None:
    g = torch.Generator().manual_seed(9)
    base = torch.randn(16, generator=g)
    models = [base + 0.1 * torch.randn(16, generator=g) for _ in range(3)]
    mean_delta = torch.stack([m - base for m in models]).mean(0)
    expected = {"tsv_m": base + 2.0 * mean_delta, "iso_c": base + 2.0 * mean_delta,
                "iso_cts": base + 2.0 * mean_delta, "cart": base + mean_delta, "wudi": base}
    params: dict[str, Any] = {"alpha": 2.0} if name in ("tsv_m", "iso_c", "iso_cts") else {}
    out = merge(name, base, models, **params)
    assert torch.allclose(out, expected[name], atol=1e-6)
    if name == "wudi":
        assert torch.allclose(merge(name, base, models, rest="mean"), base + mean_delta,
                              atol=1e-6)
    # a vocabulary matrix takes the same rule unless the recipe opts in
    mat_base, mat_models = make_case(3, (12, 8), "")
    d = torch.stack([m - mat_base for m in mat_models]).mean(0)
    fallback = get_method(name).merge(inputs_for(name, mat_base, mat_models, is_vocabulary=True,
                                                 matrices="all_2d", **params))
    want = {"tsv_m": mat_base + 2.0 * d, "iso_c": mat_base + 2.0 * d,
            "iso_cts": mat_base + 2.0 * d, "cart": mat_base + d, "wudi": mat_base}[name]
    assert torch.allclose(fallback, want, atol=1e-6)
    opted = get_method(name).merge(inputs_for(name, mat_base, mat_models, is_vocabulary=True,
                                              matrices="all_2d", vocabulary=True, **params))
    assert rel(opted - mat_base, fallback - mat_base) > 1e-3


@pytest.mark.parametrize("name", SPECTRAL)
def test_conv_kernels_as_matrices_only_when_asked(name: str) -> None:
    base2, models2 = make_case(3, (8, 12), "")
    base4 = base2.reshape(8, 3, 2, 2)
    models4 = [m.reshape(8, 3, 2, 2) for m in models2]
    method = get_method(name)
    as_matrix = method.merge(inputs_for(name, base4, models4, conv="matrix"))
    assert torch.equal(as_matrix, merge(name, base2, models2).reshape(8, 3, 2, 2))
    assert rel(as_matrix.reshape(8, 12).double(), reference(name, base2, models2)) < TOL
    fallback = method.merge(inputs_for(name, base4, models4))  # conv: fallback, the papers
    d = torch.stack([m - base4 for m in models4]).mean(0)
    assert torch.allclose(fallback, {"cart": base4 + d, "wudi": base4}.get(name, base4 + d),
                          atol=1e-6)
    params = {s.name: s.default for s in REGISTRY[name].params}
    shape = (8, 3, 2, 2)
    assert method.rule_for("m.layers.0.mlp.conv.weight", shape, False,
                           params).startswith("fallback (not 2-D)")
    assert method.rule_for("m.layers.0.mlp.conv.weight", shape, False,
                           {**params, "conv": "matrix"}).startswith("matrix")


@pytest.mark.parametrize("name", ["cart", "wudi"])
def test_official_selection_of_matrices(name: str) -> None:
    base, models = make_case(3, (12, 8), "")
    outside = get_method(name).merge(TensorInputs(
        "visual.proj", base, models, [{}] * 3,
        {s.name: s.default for s in REGISTRY[name].params}))
    inside = merge(name, base, models)  # model.layers.0.mlp.up_proj.weight
    avg = torch.stack(models).mean(0)
    assert torch.allclose(outside, avg if name == "cart" else base, atol=1e-6)
    assert rel(inside, reference(name, base, models)) < TOL


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("spectral-llama")
    base = tiny_model("llama", seed=0)
    base_dir = save_hf(base, root / "base")
    return base_dir, [save_hf(finetune_like(base, seed=20 + i), root / f"ft{i}")
                      for i in range(3)]


def read_tensor(model_dir: Path, name: str) -> torch.Tensor:
    index = model_dir / "model.safetensors.index.json"
    shard = (json.loads(index.read_text())["weight_map"][name] if index.exists()
             else "model.safetensors")
    return load_file(str(model_dir / shard))[name]


@pytest.mark.parametrize("name", SPECTRAL)
def test_pcbmerge_run_matches_the_reference(name: str, llamas: tuple[Path, list[Path]],
                                            tmp_path: Path) -> None:
    base_dir, tuned = llamas
    params: dict[str, Any] = {"alpha": 1.3} if name in ("tsv_m", "iso_c", "iso_cts") else {}
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": name, "base_model": str(base_dir),
        "models": [{"model": str(t)} for t in tuned], "parameters": params})
    res = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    assert res.returncode == 0, res.stderr
    key = "model.layers.1.mlp.gate_proj.weight"  # 64×32: m > n
    base = read_tensor(base_dir, key)
    models = [read_tensor(t, key) for t in tuned]
    out = read_tensor(tmp_path / "out", key)
    assert rel(out - base, reference(name, base, models, **params) - base.double()) < TOL
    # the embedding takes the fallback (no vocabulary opt-in)
    emb = "model.embed_tokens.weight"
    b, ms = read_tensor(base_dir, emb), [read_tensor(t, emb) for t in tuned]
    mean_delta = torch.stack([m - b for m in ms]).mean(0)
    want = {"tsv_m": b + 1.3 * mean_delta, "iso_c": b + 1.3 * mean_delta,
            "iso_cts": b + 1.3 * mean_delta, "cart": b + mean_delta, "wudi": b}[name]
    assert torch.allclose(read_tensor(tmp_path / "out", emb), want, atol=1e-6)


# ------------------------------------------------------------------ which rule each tensor gets
# Llama's vocabulary-indexed matrices (named here, not taken from the engine's list).
LLAMA_VOCABULARY = {"model.embed_tokens.weight", "lm_head.weight"}
RULE_CASES = [(name, {}) for name in SPECTRAL] + [
    ("tsv_m", {"vocabulary": True}),
    ("cart", {"vocabulary": True}),  # 2-D, opted in, but outside `attn_mlp`
    ("wudi", {"vocabulary": True, "matrices": "all_2d", "rest": "mean"}),
]


def expected_rules(shapes: dict[str, list[int]], name: str, params: dict[str, Any]
                   ) -> dict[str, set[str]]:
    """Tensor names by the rule they should get, from the names and shapes alone."""
    selective = name in ("cart", "wudi") and params.get("matrices", "attn_mlp") == "attn_mlp"
    groups: dict[str, set[str]] = {}
    for key, shape in shapes.items():
        if len(shape) != 2:
            rule = "not 2-D"
        elif key in LLAMA_VOCABULARY and not params.get("vocabulary"):
            rule = "vocabulary matrix, vocabulary: false"
        elif selective and not (("attn" in key or "mlp" in key) and "ln" not in key):
            rule = "not an attention/MLP weight, matrices: attn_mlp"
        else:
            rule = "matrix"
        groups.setdefault(rule, set()).add(key)
    return groups


@pytest.mark.parametrize(("name", "params"), RULE_CASES)
def test_dry_run_groups_tensors_by_the_rule_they_get(
        name: str, params: dict[str, Any], llamas: tuple[Path, list[Path]],
        tmp_path: Path) -> None:
    base_dir, tuned = llamas
    shapes = {}
    for shard in base_dir.glob("*.safetensors"):
        shapes.update({k: list(v.shape) for k, v in load_file(str(shard)).items()})
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": name, "base_model": str(base_dir),
        "models": [{"model": str(t)} for t in tuned], "parameters": params})
    res = run_cli("run", recipe, "-o", tmp_path / "out", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    [route] = json.loads(res.stdout)["rules"]
    got: dict[str, set[str]] = {}
    for group in route["groups"]:
        rule = group["rule"]
        key = "matrix" if rule.startswith("matrix: ") else rule.split("(", 1)[1].split(")")[0]
        assert group["tensors"] == len(group["names"]) and key not in got
        got[key] = set(group["names"])
    assert got == expected_rules(shapes, name, params)
    # the fallback's formula follows the method (and WUDI's `rest`)
    fallback = next(g["rule"] for g in route["groups"] if g["rule"].startswith("fallback"))
    assert fallback.endswith({"tsv_m": "W₀ + α·mean(Δᵢ)", "iso_c": "W₀ + α·mean(Δᵢ)",
                              "iso_cts": "W₀ + α·mean(Δᵢ)", "cart": "W₀ + mean(Δᵢ)",
                              "wudi": "W₀ (rest: base)"}[name]
                             if name != "wudi" or not params else "W₀ + mean(Δᵢ) (rest: mean)")


def test_text_dry_run_and_methods_say_the_rules(llamas: tuple[Path, list[Path]],
                                                tmp_path: Path) -> None:
    base_dir, tuned = llamas
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "iso_c", "base_model": str(base_dir),
        "models": [{"model": str(t)} for t in tuned]})
    res = run_cli("run", recipe, "-o", tmp_path / "out", "--dry-run")
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    # 2 layers × (4 attention + 3 MLP) matrices; 2 × 2 layer norms + the final norm
    assert "matrix: W₀ + α·Iso-C(ΣΔᵢ): 14 tensors (model.layers.0." in text
    assert "fallback (not 2-D): W₀ + α·mean(Δᵢ): 5 tensors (" in text
    assert ("fallback (vocabulary matrix, vocabulary: false): W₀ + α·mean(Δᵢ): 2 tensors "
            "(lm_head.weight, model.embed_tokens.weight)") in text
    res = run_cli("methods", "--json")
    listing = json.loads(res.stdout)
    summaries = {k: v["summary"] for k, v in listing.items()}
    docs = {p["name"]: p["doc"] for p in listing["cart"]["parameters"]}
    assert "default range: [0, 3]" in docs["lambda"] and "default range: [0, 1]" in \
        docs["rank_ratio"] and "default range" not in docs["svd"]
    assert "matrix: W₀ + mean(Δᵢ) + λ·Σ LowRank_k" in summaries["cart"]
    assert "not an attention/MLP weight, matrices: attn_mlp" in summaries["wudi"]
    assert "not an attention/MLP weight" not in summaries["tsv_m"]


# ------------------------------------------------------------------ SVD non-convergence
@pytest.mark.parametrize("name", ("tsv_m", "iso_c", "iso_cts"))
def test_a_float32_svd_that_does_not_converge_is_redone_in_float64(
        name: str, float32_svd_fails: list[torch.dtype]) -> None:
    base, models = make_case(3, (12, 8), "")
    out = merge(name, base, models)
    assert out.dtype == torch.float32
    assert torch.float64 in float32_svd_fails and torch.float32 in float32_svd_fails
    ref = reference(name, base, models)
    assert rel(out - base, ref - base.to(F64)) < TOL


def test_a_method_failing_on_a_tensor_names_it(llamas: tuple[Path, list[Path]],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", never)
    base_dir, tuned = llamas
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "iso_c", "base_model": str(base_dir),
        "models": [{"model": str(t)} for t in tuned]})
    res = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    assert res.returncode == 1
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("internal error: MethodFailure: tensor model.layers.")
    assert ": iso_c: linalg.svd: The algorithm failed to converge" in line
    assert not (tmp_path / "out").exists()
