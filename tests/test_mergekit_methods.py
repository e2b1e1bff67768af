"""The methods ported from mergekit 0.1.5, against references written from their formulas.

1. hand-computed small cases, written out as literals;
2. a float64 dense reference per method (plain Python/torch loops from the formula, no code
   shared with the package), checked through the method directly and through `pcbmerge run`
   on a tiny Llama;
3. random methods (DELLA): same seed same bits, keep fractions, expectation over seeds;
4. the recipe rules (arity, base handling, parameter combinations) and the flags added to
   existing methods (`ties` rescale, `int8_mask`).
Bit parity with mergekit itself is `scripts/mergekit_parity.py` (it needs mergekit's venv).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import finetune_like, save_hf, tiny_model, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_pcb.cli import app
from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.methods import REGISTRY, TensorInputs
from mergekit_pcb.methods.ops import della_probabilities

NEW = ("slerp", "passthrough", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
       "model_stock", "sce", "nearswap", "multislerp", "karcher", "nuslerp", "arcee_fusion",
       "ram", "ramplus_tl")
D = torch.float64


# ------------------------------------------------------------------------ references
def unit(x: torch.Tensor) -> torch.Tensor:
    n = float(x.norm())
    return x / n if n > 0 else x


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a64, b64 = a.to(D).flatten(), b.to(D).flatten()
    cos = max(-1.0, min(1.0, float(unit(a64) @ unit(b64))))
    if abs(cos) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        th = math.acos(cos)
        out = (math.sin((1 - t) * th) * a64 + math.sin(t * th) * b64) / math.sin(th)
    return out.reshape(a.shape)


def ref_sparsify_breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    if density >= 1:
        return tau.to(D)
    flat = tau.to(D).flatten()
    n = flat.numel()
    order = sorted(range(n), key=lambda i: abs(float(flat[i])))  # ascending magnitude
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    out = torch.zeros(n, dtype=D)
    for i in order[bottom:bottom + target]:
        out[i] = flat[i]
    return out.reshape(tau.shape)


def ref_gta(base: torch.Tensor, taus: Sequence[torch.Tensor], weights: Sequence[float],
            lam: float, normalize: bool, ties: bool) -> torch.Tensor:
    """θ₀ + λ·mix(wᵢτᵢ), entry by entry; TIES elects sign(Σ wᵢτᵢ) (0 elects +)."""
    b = base.to(D).flatten()
    rows = [(w * t.to(D)).flatten() for t, w in zip(taus, weights, strict=True)]
    out = torch.empty_like(b)
    for j in range(b.numel()):
        vals = [float(r[j]) for r in rows]
        if ties:
            sign = 1.0 if sum(vals) >= 0 else -1.0
            agree = [i for i, v in enumerate(vals) if (v > 0) - (v < 0) == sign]
            mix = sum(vals[i] for i in agree)
            div = sum(weights[i] for i in agree) or 1.0
        else:
            mix = sum(vals)
            div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out[j] = b[j] + lam * (mix / div if normalize else mix)
    return out.reshape(base.shape)


def ref_model_stock(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    b = base.to(D).flatten()
    offs = [m.to(D).flatten() - b for m in models]
    cos = [float(offs[i] @ offs[j]) / max(float(offs[i].norm() * offs[j].norm()), 1e-6)
           for i in range(len(offs)) for j in range(i + 1, len(offs))]
    c, k = sum(cos) / len(cos), len(models)
    t = k * c / (1 + (k - 1) * c)
    avg = sum(m.to(D).flatten() for m in models) / k
    return (t * avg + (1 - t) * b).reshape(base.shape)


def ref_sce(base: torch.Tensor, models: Sequence[torch.Tensor], topk: float) -> torch.Tensor:
    taus = torch.stack([(m.to(D) - base.to(D)).flatten() for m in models])
    if topk < 1:
        var = taus.var(dim=0, unbiased=False)
        k = int(int((var != 0).sum()) * topk)
        keep = torch.zeros_like(var)
        keep[sorted(range(var.numel()), key=lambda i: -float(var[i]))[:k]] = 1
        taus = taus * keep
    energy = taus.square().mean(dim=1)
    w = energy / energy.sum()
    out = base.to(D).flatten().clone()
    for j in range(out.numel()):
        col = taus[:, j]
        sign = 1.0 if float(col.sum()) >= 0 else -1.0
        agree = [i for i in range(len(models)) if float(torch.sign(col[i])) == sign]
        num = sum(float(w[i] * col[i]) for i in agree)
        den = max(sum(float(w[i]) for i in agree), 1e-6)
        out[j] += num / den
    return out.reshape(base.shape)


def ref_nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    a, b = base.to(D), other.to(D)
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def ref_multislerp(base: torch.Tensor, models: Sequence[torch.Tensor],
                   weights: Sequence[float]) -> torch.Tensor:
    taus = [(m.to(D) - base.to(D)).flatten() for m in models]
    w = [x / sum(weights) for x in weights]
    units = [unit(t) for t in taus]
    mean = unit(sum(wi * u for wi, u in zip(w, units, strict=True)))
    tangent = sum(wi * (u - float(u @ mean) * mean) for wi, u in zip(w, units, strict=True))
    tn = float(tangent.norm())
    point = mean * math.cos(tn) + tangent * (math.sin(tn) / tn if tn > 0 else 1.0)
    scale = sum(wi * float(t.norm()) for wi, t in zip(w, taus, strict=True))
    return base.to(D) + (point * scale).reshape(base.shape)


def ref_karcher(models: Sequence[torch.Tensor], iters: int = 200) -> torch.Tensor:
    """The Karcher mean iterated to convergence (the method stops after 10 steps or at a
    step under 1e-5, so they agree to about that)."""
    xs = [m.to(D).flatten() for m in models]
    us = [unit(x) for x in xs]
    mean = unit(sum(us) / len(us))
    for _ in range(iters):
        tangent = torch.zeros_like(mean)
        for u in us:
            c = max(-1.0, min(1.0, float(mean @ u)))
            th = math.acos(c)
            if th > 1e-12:
                tangent += (th / math.sin(th)) * (u - c * mean) / len(us)
        tn = float(tangent.norm())
        if tn < 1e-14:
            break
        mean = unit(math.cos(tn) * mean + math.sin(tn) * tangent / tn)
    return (mean * sum(float(x.norm()) for x in xs) / len(xs)).reshape(models[0].shape)


def ref_arcee(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    # Scores in the inputs' precision: a float64 score moves entries that sit on the
    # threshold across it, which tests rounding, not the rule.
    a, b = base, model
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    score = (b - a).abs() * (p * (p / q).log()).sum(dim=-1, keepdim=True)
    s = sorted(score.flatten().tolist())
    q1, med, q3 = (s[int(f * (len(s) - 1))] for f in (0.25, 0.5, 0.75))
    return torch.where(score >= med + 1.5 * (q3 - q1), b, a).to(D)


def ref_ram(base: torch.Tensor, models: Sequence[torch.Tensor], eps: float,
            plus: tuple[float, float] | None = None) -> torch.Tensor:
    taus = [(m.to(D) - base.to(D)).flatten() for m in models]
    n = taus[0].numel()
    counts = [sum(abs(float(t[j])) > eps for t in taus) for j in range(n)]
    boosts = [1.0] * len(taus)
    if plus is not None:
        r, alpha = plus
        for i, t in enumerate(taus):
            shared = sum(abs(float(t[j])) > eps and counts[j] > 1 for j in range(n))
            uniq = sum(abs(float(t[j])) > eps and counts[j] == 1 for j in range(n))
            boosts[i] = 1 + r * min(max(shared / max(uniq, eps), 0), alpha)
    out = base.to(D).flatten().clone()
    for j in range(n):
        for i, t in enumerate(taus):
            if abs(float(t[j])) > eps:
                out[j] += float(t[j]) * (boosts[i] if counts[j] == 1 else 1 / counts[j])
    return out.reshape(base.shape)


def reference(method: str, base: torch.Tensor, models: Sequence[torch.Tensor],
              params: dict[str, Any], model_params: Sequence[dict[str, Any]]
              ) -> torch.Tensor:
    """The dense reference for the recipes of `CASES` (deterministic methods)."""
    w = [p.get("weight", 1.0) for p in model_params]
    if method == "slerp":
        return ref_slerp(params["t"], base, models[0])
    if method == "passthrough":
        return models[0].to(D) * model_params[0].get("scale", 1.0)
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        taus = [ref_sparsify_breadcrumbs(m.to(D) - base.to(D), p["density"], p["gamma"])
                for m, p in zip(models, model_params, strict=True)]
        return ref_gta(base, taus, w, params.get("lambda", 1.0), False,
                       method == "breadcrumbs_ties")
    if method == "model_stock":
        return ref_model_stock(base, models)
    if method == "sce":
        return ref_sce(base, models, params.get("select_topk", 1.0))
    if method == "nearswap":
        return ref_nearswap(params["t"], base, models[0])
    if method == "multislerp":
        return ref_multislerp(base, models, w)
    if method == "karcher":
        return ref_karcher(models)
    if method == "nuslerp":
        t = w[1] / (w[0] + w[1])
        return base.to(D) + ref_slerp(t, models[0].to(D) - base.to(D),
                                      models[1].to(D) - base.to(D))
    if method == "arcee_fusion":
        return ref_arcee(base, models[0])
    if method == "ram":
        return ref_ram(base, models, params.get("epsilon", 1e-5))
    if method == "ramplus_tl":
        return ref_ram(base, models, params.get("epsilon", 1e-5),
                       (params.get("r", 0.1), params.get("alpha", 0.2)))
    raise KeyError(method)


# (method, top-level parameters, per-model parameters; their count is the model count)
CRUMBS = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}, {"weight": 0.6, "density": 0.3,
                                                           "gamma": 0.05}]
CASES: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
    ("slerp", {"t": 0.3}, [{}]),
    ("passthrough", {}, [{"scale": 0.5}]),
    ("breadcrumbs", {"lambda": 0.9}, CRUMBS),
    ("breadcrumbs_ties", {}, CRUMBS),
    ("model_stock", {}, [{}, {}, {}]),
    ("sce", {"select_topk": 0.4}, [{}, {}, {}]),
    ("nearswap", {"t": 0.01}, [{}]),
    ("multislerp", {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]),
    ("karcher", {}, [{}, {}, {}]),
    ("nuslerp", {}, [{"weight": 0.3}, {"weight": 0.7}]),
    ("arcee_fusion", {}, [{}]),
    ("ram", {"epsilon": 0.01}, [{}, {}, {}]),
    ("ramplus_tl", {"epsilon": 0.01, "r": 0.5, "alpha": 0.4}, [{}, {}, {}]),
]
# float32 against the float64 reference; karcher's stopping rule (tol 1e-5) adds its own.
TOL = {"karcher": 1e-4}


def call(method: str, base: torch.Tensor | None, models: Sequence[torch.Tensor],
         params: dict[str, Any], model_params: Sequence[dict[str, Any]], seed: int = 0,
         name: str = "x") -> torch.Tensor:
    """The registered method, directly, with its declared defaults filled in."""
    cls = REGISTRY[method]
    top = {p.name: params.get(p.name, p.default) for p in cls.params if not p.per_model}
    per = [{p.name: mp.get(p.name, p.default) for p in cls.params if p.per_model}
           for mp in model_params]
    gens = [tensor_generator(seed, name, str(i)) for i in range(len(models))]
    return cls().merge(TensorInputs(name=name, base=base, models=list(models),
                                    model_params=per, params=top, generators=gens))


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    scale = max(float(want.abs().max()), 1e-12)
    err = float((got.to(D) - want).abs().max())
    assert err <= rel * scale, (err, scale)


# ------------------------------------------------------------------------ hand cases
def test_slerp_hand() -> None:
    base, other = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = math.sqrt(0.5)
    assert_close(call("slerp", base, [other], {"t": 0.5}, [{}]), torch.tensor([h, h], dtype=D))
    assert torch.equal(call("slerp", base, [other], {"t": 0.0}, [{}]), base)
    # collinear: plain linear interpolation
    got = call("slerp", torch.tensor([1.0, 2.0]), [torch.tensor([2.0, 4.0])], {"t": 0.25}, [{}])
    assert_close(got, torch.tensor([1.25, 2.5], dtype=D))


def test_breadcrumbs_hand() -> None:
    # |τ| = 1..10: 10 entries, density .5 → keep 5, gamma .2 → drop the 2 largest:
    # ascending ranks 3..7 survive, i.e. the values 4..8.
    tau = torch.tensor([3.0, -10, 1, 8, -4, 9, 2, -7, 5, 6])
    out = call("breadcrumbs", torch.zeros(10), [tau], {}, [{"density": 0.5, "gamma": 0.2}])
    assert out.tolist() == [0, 0, 0, 8, -4, 0, 0, -7, 5, 6]
    # density 1 keeps everything (gamma ignored), as in mergekit
    assert torch.equal(call("breadcrumbs", torch.zeros(10), [tau], {}, [{"gamma": 0.5}]), tau)


def test_model_stock_hand() -> None:
    base = torch.zeros(2)
    # orthogonal offsets: cos 0 → t 0 → the base; equal offsets: cos 1 → t 1 → the mean
    assert torch.equal(call("model_stock", base, [torch.tensor([1.0, 0]),
                                                  torch.tensor([0, 1.0])], {}, [{}, {}]), base)
    same = torch.tensor([1.0, 2.0])
    assert_close(call("model_stock", base, [same, same], {}, [{}, {}]), same.to(D))


def test_nearswap_hand() -> None:
    base, other = torch.zeros(3), torch.tensor([0.005, 0.02, 1.0])
    # weights clamp(0.01/|d|, 0, 1) = 1, 0.5, 0.01
    assert_close(call("nearswap", base, [other], {"t": 0.01}, [{}]),
                 torch.tensor([0.005, 0.01, 0.01], dtype=D))


def test_multislerp_and_karcher_hand() -> None:
    base = torch.zeros(2)
    h = math.sqrt(0.5)
    got = call("multislerp", base, [torch.tensor([1.0, 0]), torch.tensor([0, 1.0])], {},
               [{}, {}])
    assert_close(got, torch.tensor([h, h], dtype=D))
    # Karcher: the direction of the equal-weight geodesic midpoint, times the mean norm 3
    got = call("karcher", None, [torch.tensor([2.0, 0]), torch.tensor([0, 4.0])], {}, [{}, {}])
    assert_close(got, torch.tensor([3 * h, 3 * h], dtype=D))


def test_nuslerp_hand() -> None:
    base = torch.ones(2)
    got = call("nuslerp", base, [torch.tensor([2.0, 1]), torch.tensor([1.0, 2])], {},
               [{"weight": 1.0}, {"weight": 1.0}])
    h = math.sqrt(0.5)  # slerp(½, e₁, e₂) = (e₁ + e₂)·sin(π/4)/sin(π/2)
    assert_close(got, torch.tensor([1 + h, 1 + h], dtype=D))


def test_ram_hand() -> None:
    base = torch.zeros(3)
    m1, m2 = torch.tensor([1.0, 0, 1]), torch.tensor([0.0, 0, 3])
    assert call("ram", base, [m1, m2], {}, [{}, {}]).tolist() == [1.0, 0.0, 2.0]
    # model 1: one shared, one unique entry → ρ 1, capped at α .2 → boost 1 + .1·.2
    got = call("ramplus_tl", base, [m1, m2], {}, [{}, {}])
    assert_close(got, torch.tensor([1.02, 0, 2], dtype=D))


def test_passthrough_hand() -> None:
    x = torch.tensor([1.0, -2.0])
    assert call("passthrough", None, [x], {}, [{}]) is x  # no scale: untouched
    assert call("passthrough", None, [x], {}, [{"scale": -0.5}]).tolist() == [-0.5, 1.0]


# ------------------------------------------------------------------ dense references
@pytest.mark.parametrize(("method", "params", "model_params"), CASES,
                         ids=[c[0] for c in CASES])
@pytest.mark.parametrize("shape", [(7,), (6, 9), (3, 4, 5)])
def test_method_matches_dense_reference(method: str, params: dict[str, Any],
                                        model_params: list[dict[str, Any]],
                                        shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(hash((method, shape)) % 2**31)
    base = torch.randn(shape, generator=g)
    models = [base + 0.1 * torch.randn(shape, generator=g) for _ in model_params]
    needs_base = REGISTRY[method].requires_base
    got = call(method, base if needs_base else None, models, params, model_params)
    want = reference(method, base, models, params, model_params)
    assert got.shape == base.shape
    assert_close(got, want, TOL.get(method, 1e-5))


# ------------------------------------------------------------------ through the CLI
@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk-methods")
    base = tiny_model("llama", seed=0)
    paths = {"base": save_hf(base, root / "base")}
    for i in range(3):
        paths[f"ft{i}"] = save_hf(finetune_like(base, seed=20 + i), root / f"ft{i}")
    return paths


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_cli(tmp_path: Path, recipe: dict[str, Any]) -> tuple[int, str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    res = CliRunner().invoke(app, ["run", str(path), "-o", str(out), "--quiet"])
    return res.exit_code, res.output, out


def cli_recipe(method: str, llama: dict[str, Path], params: dict[str, Any],
               model_params: list[dict[str, Any]], base: bool = True) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "merge_method": method, "parameters": params, "seed": 7,
        "models": [{"model": str(llama[f"ft{i}"]), **({"parameters": p} if p else {})}
                   for i, p in enumerate(model_params)]}
    if base:
        recipe["base_model"] = str(llama["base"])
    return recipe


@pytest.mark.parametrize(("method", "params", "model_params"), CASES,
                         ids=[c[0] for c in CASES])
def test_cli_matches_method_and_reference(llama: dict[str, Path], tmp_path: Path, method: str,
                                          params: dict[str, Any],
                                          model_params: list[dict[str, Any]]) -> None:
    needs_base = REGISTRY[method].requires_base
    code, output, out = run_cli(tmp_path, cli_recipe(method, llama, params, model_params,
                                                     needs_base))
    assert code == 0, output
    merged = load_dir(out)
    base = load_dir(llama["base"])
    models = [load_dir(llama[f"ft{i}"]) for i in range(len(model_params))]
    for name, got in merged.items():
        ins = [m[name] for m in models]
        direct = call(method, base[name] if needs_base else None, ins, params, model_params)
        assert torch.equal(got, direct.to(got.dtype)), name  # the engine adds nothing
        if name.endswith("weight") and got.dim() == 2:  # the reference is slow: weights only
            assert_close(got, reference(method, base[name], ins, params, model_params),
                         TOL.get(method, 1e-5))


def test_every_new_method_is_registered() -> None:
    assert set(NEW) <= set(REGISTRY)
    for name in NEW:
        for spec in REGISTRY[name].params:
            assert spec.kind is bool or spec.kind is str or spec.bounds is not None


# ------------------------------------------------------------------ random: DELLA
def test_della_seeded_bits_and_cli(llama: dict[str, Path], tmp_path: Path) -> None:
    mp = [{"density": 0.4, "epsilon": 0.2, "weight": 1.0}, {"density": 0.6, "weight": 0.5}]
    a = run_cli(tmp_path / "a", cli_recipe("della", llama, {}, mp))
    b = run_cli(tmp_path / "b", cli_recipe("della", llama, {}, mp))
    assert a[0] == 0 and b[0] == 0, a[1] + b[1]
    first, second = load_dir(a[2]), load_dir(b[2])
    assert all(torch.equal(first[n], second[n]) for n in first)
    base = load_dir(llama["base"])
    models = [load_dir(llama[f"ft{i}"]) for i in range(2)]
    for name, got in first.items():  # the CLI draws what the method draws for (7, name, i)
        direct = call("della", base[name], [m[name] for m in models], {}, mp, seed=7,
                      name=name)
        assert torch.equal(got, direct), name
    other = run_cli(tmp_path / "c", {**cli_recipe("della", llama, {}, mp), "seed": 8})
    assert other[0] == 0
    assert any(not torch.equal(first[n], load_dir(other[2])[n]) for n in first)


@pytest.mark.parametrize(("density", "epsilon"), [(0.3, 0.1), (0.5, 0.45), (0.8, 0.15)])
def test_della_keep_fraction_and_probabilities(density: float, epsilon: float) -> None:
    tau = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    out = call("della_linear", torch.zeros_like(tau), [tau], {"rescale": False},
               [{"density": density, "epsilon": epsilon}], name="big")
    kept = out != 0
    assert abs(float(kept.float().mean()) - density) < 0.005
    assert torch.equal(out[kept], tau[kept])  # no rescale: survivors untouched
    # per rank: the smallest magnitude of each row at density − ε, the largest at + ε
    order = tau.abs().argsort(dim=1)
    low = kept.gather(1, order[:, :32]).float().mean()
    high = kept.gather(1, order[:, -32:]).float().mean()
    assert abs(float(low) - (density - epsilon + epsilon / 16)) < 0.03
    assert abs(float(high) - (density + epsilon - epsilon / 16)) < 0.03
    probs = della_probabilities(tau, density, epsilon)
    assert math.isclose(float(probs.min()), density - epsilon, rel_tol=1e-6)
    assert math.isclose(float(probs.max()), density + epsilon, rel_tol=1e-6)


def test_della_expected_value_over_seeds() -> None:
    """Without rescale E[τ̃] = p·τ entry by entry; with it, the L1 norm is kept exactly."""
    tau = torch.randn(4, 40, generator=torch.Generator().manual_seed(2))
    zero = torch.zeros_like(tau)
    mp = [{"density": 0.5, "epsilon": 0.3}]
    runs = torch.stack([call("della_linear", zero, [tau], {"rescale": False}, mp, seed=s)
                        for s in range(3000)])
    p = della_probabilities(tau, 0.5, 0.3)
    assert float((runs.mean(0) - p * tau).abs().max()) < 0.06
    rescaled = call("della_linear", zero, [tau], {}, mp, seed=1)
    assert math.isclose(float(rescaled.abs().sum()), float(tau.abs().sum()), rel_tol=1e-5)


# ------------------------------------------------------------------ recipe rules
@pytest.mark.parametrize(("method", "params", "model_params", "base", "expect"), [
    ("della", {}, [{"density": 0.1, "epsilon": 0.15}], True, "density ± epsilon"),
    ("model_stock", {}, [{}], True, "at least two models besides the base"),
    ("multislerp", {}, [{"weight": 1.0}, {"weight": -1.0}], True, "sum to zero"),
    ("ties", {"rescale": True, "scope": "global"}, [{"density": 0.5}], True, "scope: tensor"),
    ("slerp", {"t": 0.5}, [{}], False, "base_model: required by slerp"),
])
def test_refused(llama: dict[str, Path], tmp_path: Path, method: str, params: dict[str, Any],
                 model_params: list[dict[str, Any]], base: bool, expect: str) -> None:
    code, output, out = run_cli(tmp_path, cli_recipe(method, llama, params, model_params, base))
    assert code == 2 and expect in output, output
    assert not out.exists()


@pytest.mark.parametrize("method", ["multislerp", "nuslerp"])
def test_optional_base_interpolates_the_models_themselves(llama: dict[str, Path],
                                                         tmp_path: Path, method: str) -> None:
    """mergekit's optional base: without `base_model` the models themselves are the points
    (the dense reference with the origin at zero); with one, their task vectors."""
    mp = [{"weight": 1.0}, {"weight": 2.0}]
    code, output, out = run_cli(tmp_path / "none", cli_recipe(method, llama, {}, mp, base=False))
    assert code == 0, output
    code, output, based = run_cli(tmp_path / "base", cli_recipe(method, llama, {}, mp))
    assert code == 0, output
    got, with_base = load_dir(out), load_dir(based)
    models = [load_dir(llama["ft0"]), load_dir(llama["ft1"])]
    # Two fine-tunes of one base are nearly parallel (cos ≈ 1): a float32 slerp at that
    # small angle keeps fewer digits than the float64 reference (mergekit's float32 math
    # does the same; `scripts/mergekit_parity.py` compares the bits with mergekit).
    rel = 1e-3 if method == "nuslerp" else 1e-5
    for name, tensor in got.items():
        zero = torch.zeros_like(models[0][name])
        assert_close(tensor, reference(method, zero, [m[name] for m in models], {}, mp), rel)
    assert any(not torch.equal(got[n], with_base[n]) for n in got)


def test_base_listed_among_models_is_the_same_recipe(llama: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """mergekit's slerp names its base among the two models; listed or not, same result."""
    plain = cli_recipe("slerp", llama, {"t": [0.0, 1.0]}, [{}])
    listed = {**plain, "models": [{"model": str(llama["base"])}, *plain["models"]]}
    a, b = run_cli(tmp_path / "a", plain), run_cli(tmp_path / "b", listed)
    assert a[0] == 0 and b[0] == 0
    ta, tb = load_dir(a[2]), load_dir(b[2])
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    base = load_dir(llama["base"])
    # t gradient [0, 1] over 2 layers: layer 0 (and tensors outside the layers) is the base
    assert torch.equal(ta["model.layers.0.mlp.up_proj.weight"],
                       base["model.layers.0.mlp.up_proj.weight"])


def test_extensions_beyond_mergekit_arity() -> None:
    """Documented extensions: several 'other' models → their mean; nuslerp folds."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 6, generator=g)
    ms = [base + torch.randn(5, 6, generator=g) for _ in range(3)]
    mean = torch.stack(ms).mean(0)
    for method, params in (("slerp", {"t": 0.4}), ("nearswap", {"t": 0.3}),
                           ("arcee_fusion", {})):
        assert torch.equal(call(method, base, ms, params, [{}] * 3),
                           call(method, base, [mean], params, [{}]))
    w = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}]
    two = call("nuslerp", base, ms[:2], {}, w[:2])
    three = call("nuslerp", base, [two, ms[2]], {}, [{"weight": 3.0}, {"weight": 3.0}])
    assert_close(call("nuslerp", base, ms, {}, w), three.to(D))


# ------------------------------------------------------------------ flags on old methods
def test_ties_rescale_keeps_l1_norm_and_default_is_unchanged() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(40, generator=g)
    m = base + torch.randn(40, generator=g)
    tau = m - base
    got = call("ties", base, [m], {"rescale": True}, [{"density": 0.3}]) - base
    assert math.isclose(float(got.abs().sum()), float(tau.abs().sum()), rel_tol=1e-5)
    assert int((got != 0).sum()) == 12
    plain = call("ties", base, [m], {}, [{"density": 0.3}])
    off = call("ties", base, [m], {"rescale": False}, [{"density": 0.3}])
    assert torch.equal(plain, off)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "dare_ties", "ties",
                                    "breadcrumbs_ties", "della", "sce"])
def test_int8_mask_changes_nothing(method: str) -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 8, generator=g)
    ms = [base + torch.randn(8, 8, generator=g) for _ in range(3)]
    mp = [{"density": 0.5}] * 3 if REGISTRY[method].param_spec("density") else [{}] * 3
    assert torch.equal(call(method, base, ms, {"int8_mask": True}, mp),
                       call(method, base, ms, {"int8_mask": False}, mp))
