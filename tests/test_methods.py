"""Value checks for the baseline merge methods (linear, task_arithmetic, ties, dare_*).

Three kinds of check:
1. the package against an independent dense reference (tests/dense_reference.py);
2. small cases computed by hand and written out as literals;
3. properties (reductions between methods, exact trim counts, DARE seeding).
Plus: each registry class with its declared defaults equals its pure function.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from dense_reference import (
    ref_dare,
    ref_linear,
    ref_task_arithmetic,
    ref_ties,
    ref_ties_global,
    ref_trim,
)

from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods import REGISTRY, TensorInputs, get_method
from mergekit_pcb.methods.dare import DareLinear, DareTies, dare_merge
from mergekit_pcb.methods.linear import Linear, linear_merge
from mergekit_pcb.methods.ops import magnitude_trim, magnitude_trim_all, random_drop
from mergekit_pcb.methods.task_arithmetic import TaskArithmetic, task_arithmetic_merge
from mergekit_pcb.methods.ties import Ties, ties_merge
from mergekit_pcb.threads import torch_threads

DTYPES = [torch.float32, torch.float64]
SHAPES = [(), (1,), (7,), (5, 6), (2, 3, 4), (17, 9)]
# (weights, densities, lambda_): uniform, non-uniform, negative weights; densities 0.1–1.
CONFIGS = [
    ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 1.0),
    ([0.3, 0.7, 1.2], [0.1, 0.5, 1.0], 0.7),
    ([1.0, -0.5, 0.8], [0.9, 0.25, 0.6], 1.5),
    ([2.0, 0.5], [0.3, 0.3], -0.4),
    ([0.25], [0.45], 2.0),
]
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _rand_models(shape, dtype, n, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = [base + spread * torch.randn(shape, generator=g, dtype=torch.float64)
              for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def _gens(seed, name, n):
    return [tensor_generator(seed, name, f"model{i}") for i in range(n)]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, inputs, dtype) -> None:
    """|actual − expected| ≤ rtol·(|expected| + scale): relative error at the inputs' scale."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == dtype
    a = actual.to(torch.float64)
    scale = max([float(t.abs().max()) if t.numel() else 0.0 for t in inputs]
                + [float(expected.abs().max()) if expected.numel() else 0.0, 1e-30])
    rtol = RTOL[dtype]
    err = (a - expected).abs()
    bound = rtol * (expected.abs() + scale)
    assert bool((err <= bound).all()), (
        f"max err {float(err.max()):.3e} > bound; actual={a.reshape(-1)[:8].tolist()} "
        f"expected={expected.reshape(-1)[:8].tolist()}"
    )


# --------------------------------------------------------------------------------------
# 1. package vs. the independent dense reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(dtype, shape, cfg, normalize):
    weights, _, _ = CONFIGS[cfg]
    _, models = _rand_models(shape, dtype, len(weights), seed=11 + cfg)
    out = linear_merge(models, weights, normalize=normalize)
    assert_matches(out, ref_linear(models, weights, normalize), models, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic_matches_reference(dtype, shape, cfg, normalize):
    weights, _, lam = CONFIGS[cfg]
    base, models = _rand_models(shape, dtype, len(weights), seed=23 + cfg)
    out = task_arithmetic_merge(base, models, weights, lambda_=lam, normalize=normalize)
    ref = ref_task_arithmetic(base, models, weights, lam, normalize)
    assert_matches(out, ref, [base, *models], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(dtype, shape, cfg, normalize):
    weights, densities, lam = CONFIGS[cfg]
    base, models = _rand_models(shape, dtype, len(weights), seed=37 + cfg)
    out = ties_merge(base, models, weights, densities, lambda_=lam, normalize=normalize)
    ref = ref_ties(base, models, weights, densities, lam, normalize)
    assert_matches(out, ref, [base, *models], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3), (40,)])
def test_ties_matches_reference_with_zero_and_tied_task_vectors(dtype, shape):
    # Integer-valued task vectors: many equal magnitudes (tie-breaking in the trim) and
    # exact zeros (which never agree with the elected sign). θ₀ is dyadic so that τ = θ − θ₀
    # is exactly an integer in either dtype and the ties are real ties.
    g = torch.Generator().manual_seed(5)
    base = (torch.randint(-40, 40, shape, generator=g) / 8).to(dtype)
    models = [base + torch.randint(-2, 3, shape, generator=g).to(dtype) for _ in range(4)]
    weights, densities = [1.0, 0.5, -0.75, 2.0], [0.5, 0.3, 1.0, 0.75]
    for normalize in (True, False):
        out = ties_merge(base, models, weights, densities, lambda_=1.3, normalize=normalize)
        ref = ref_ties(base, models, weights, densities, 1.3, normalize)
        assert_matches(out, ref, [base, *models], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_global_scope_matches_reference(dtype, normalize):
    # Tensors of very different task-vector scales, so that a global trim keeps far more of
    # "a" than a per-tensor trim would; the engine's statistics passes are driven by hand,
    # visiting the tensors in a different order in each pass.
    shapes = {"a": (6, 5), "b": (7,), "c": (), "d": (2, 3, 4)}
    scales = {"a": 3.0, "b": 0.05, "c": 1.0, "d": 0.5}
    g = torch.Generator().manual_seed(21)
    bases = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    models = [{n: (bases[n] + scales[n] * torch.randn(shapes[n], generator=g,
                                                      dtype=torch.float64)).to(dtype)
               for n in shapes} for _ in range(3)]
    bases = {n: b.to(dtype) for n, b in bases.items()}
    w, d = [1.0, -0.4, 0.7], [0.3, 0.1, 0.55]
    pm = [{"weight": wi, "density": di} for wi, di in zip(w, d, strict=True)]
    top = dict(_defaults(Ties)[1], **{"lambda": 1.3, "normalize": normalize, "scope": "global"})
    method = Ties()
    total = sum(b.numel() for b in bases.values())
    stats = method.global_stats(3, total, top, pm)
    assert stats is not None
    orders = [list(shapes), list(reversed(shapes))]
    for p in range(len(stats.pass_names)):
        for name in orders[p % 2]:
            stats.observe(p, TensorInputs(name, bases[name], [m[name] for m in models], pm, top))
        stats.finish(p)
    ref = ref_ties_global(bases, models, w, d, 1.3, normalize)
    differs_from_tensor_scope = False
    for name in shapes:
        inputs = TensorInputs(name, bases[name], [m[name] for m in models], pm, top,
                              stats=stats)
        out = method.merge(inputs)
        assert_matches(out, ref[name], [bases[name], *inputs.models], dtype)
        per_tensor = ties_merge(bases[name], inputs.models, w, d, 1.3, normalize)
        differs_from_tensor_scope |= not torch.equal(out, per_tensor)
    assert differs_from_tensor_scope


def _masks_of(seed, name, shape, densities):
    """The keep-masks DARE draws for (seed, name, model i), read off by dropping a tensor of
    ones (rescale off): 1 where kept, 0 where dropped."""
    masks = []
    for i, d in enumerate(densities):
        g = tensor_generator(seed, name, f"model{i}")
        ones = torch.ones(shape, dtype=torch.float64)
        masks.append(random_drop(ones, d, g, rescale=False) != 0)
    return masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("sign_consensus", [False, True])
@pytest.mark.parametrize("normalize,rescale", [(False, True), (True, True), (True, False)])
def test_dare_matches_reference_for_its_masks(dtype, shape, cfg, sign_consensus, normalize,
                                              rescale):
    weights, densities, lam = CONFIGS[cfg]
    base, models = _rand_models(shape, dtype, len(weights), seed=53 + cfg)
    name = f"layer.{cfg}.weight"
    out = dare_merge(base, models, weights, densities, _gens(7, name, len(weights)),
                     sign_consensus=sign_consensus, lambda_=lam, normalize=normalize,
                     rescale=rescale)
    masks = _masks_of(7, name, shape, densities)
    ref = ref_dare(base, models, weights, densities, masks, sign_consensus=sign_consensus,
                   lambda_=lam, normalize=normalize, rescale=rescale)
    assert_matches(out, ref, [base, *models], dtype)


# --------------------------------------------------------------------------------------
# 2. hand-computed cases
# --------------------------------------------------------------------------------------

# 3 models × 4 entries. θ₀ = [0.5, −1, 2, 0], θᵢ = θ₀ + τᵢ with
#   τ1 = [ 4, −1,  2,  1]  density 0.5  -> k=2: keep 4, 2     -> [ 4,  0,  2, 0]
#   τ2 = [ 3,  2, −6, −1]  density 0.75 -> k=3: keep −6, 3, 2 -> [ 3,  2, −6, 0]
#   τ3 = [−2, −3,  1,  5]  density 0.5  -> k=2: keep 5, −3    -> [ 0, −3,  0, 5]
# weights [1, 0.5, 2] -> weighted: [4, 0, 2, 0], [1.5, 1, −3, 0], [0, −6, 0, 10]
#   sums [5.5, −5, −1, 10] -> γ = [+, −, −, +]
#   agreeing: e0: 4 (w1) + 1.5 (w.5) = 5.5 / 1.5 | e1: −6 (w2) -> /2 | e2: −3 (w.5) -> /.5
#             e3: 10 (w2) -> /2
#   normalize: [11/3, −3, −6, 5]; λ=0.5 -> [11/6, −1.5, −3, 2.5]; + θ₀ -> [7/3, −2.5, −1, 2.5]
#   no normalize: [5.5, −6, −3, 10] · 0.5 = [2.75, −3, −1.5, 5]; + θ₀ -> [3.25, −4, 0.5, 5]
HAND_BASE = [0.5, -1.0, 2.0, 0.0]
HAND_TAUS = [[4.0, -1.0, 2.0, 1.0], [3.0, 2.0, -6.0, -1.0], [-2.0, -3.0, 1.0, 5.0]]
HAND_W = [1.0, 0.5, 2.0]
HAND_D = [0.5, 0.75, 0.5]


def _hand_inputs(dtype):
    base = torch.tensor(HAND_BASE, dtype=dtype)
    return base, [base + torch.tensor(t, dtype=dtype) for t in HAND_TAUS]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_hand_computed(dtype):
    base, models = _hand_inputs(dtype)
    out = ties_merge(base, models, HAND_W, HAND_D, lambda_=0.5, normalize=True)
    torch.testing.assert_close(out, torch.tensor([7 / 3, -2.5, -1.0, 2.5], dtype=dtype))
    out = ties_merge(base, models, HAND_W, HAND_D, lambda_=0.5, normalize=False)
    assert torch.equal(out, torch.tensor([3.25, -4.0, 0.5, 5.0], dtype=dtype))


def test_ties_hand_computed_edge_rules():
    z = torch.zeros(2, dtype=torch.float64)
    # Zero sum elects +: Σ = 0 in both entries; only the positive model agrees -> 1/1, 2/1.
    out = ties_merge(z, [torch.tensor([1.0, 2.0]).double(), torch.tensor([-1.0, -2.0]).double()],
                     [1.0, 1.0], [1.0, 1.0])
    assert torch.equal(out, torch.tensor([1.0, 2.0], dtype=torch.float64))
    # Weight applies before the election: w=[1, −1], τ=[1, 1] -> weighted [1, −1], Σ=0 -> +,
    # only model 1 agrees -> 1/1 = 1.
    one = torch.ones(1, dtype=torch.float64)
    out = ties_merge(torch.zeros(1, dtype=torch.float64), [one, one], [1.0, -1.0], [1.0, 1.0])
    assert torch.equal(out, one)
    # Agreeing weights summing to 0 divide by 1: w=[0.5, −0.5], τ=[2, −2] -> weighted [1, 1]
    # both agree, divisor 0 -> 1, merged 2; θ₀ = 3 -> 5.
    b = torch.tensor([3.0], dtype=torch.float64)
    out = ties_merge(b, [b + 2, b - 2], [0.5, -0.5], [1.0, 1.0], normalize=True)
    assert torch.equal(out, torch.tensor([5.0], dtype=torch.float64))
    # All trimmed away / all zero: τ = 0 everywhere -> divisor 0 -> 1, result θ₀, no NaN.
    out = ties_merge(b, [b.clone(), b.clone()], [1.0, 1.0], [0.5, 0.5])
    assert torch.equal(out, b)
    # Trim ties as mergekit (torch argsort; here entries 0, 1): |τ| all 1, density 0.5 of 4.
    t = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert torch.equal(magnitude_trim(t, 0.5), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    out = ties_merge(torch.zeros(4), [t], [1.0], [0.5])
    assert torch.equal(out, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_trim_keeps_at_least_one_entry_unless_density_zero():
    # ⌊0.2·3⌋ = 0, but 0 < density: the largest |τ| survives (the package's documented rule;
    # mergekit refuses this trim). density 0 keeps nothing; a 0-d tensor keeps its value.
    t = torch.tensor([0.3, -2.0, 1.0])
    assert magnitude_trim(t, 0.2).tolist() == [0.0, -2.0, 0.0]
    assert magnitude_trim(t, 0.0).tolist() == [0.0, 0.0, 0.0]
    assert magnitude_trim(torch.tensor(5.0), 0.5).item() == 5.0
    # In TIES: θ₀ = [1, 1, 1], one model τ = t, λ = 2 -> [1, 1 − 4, 1]
    out = ties_merge(torch.ones(3), [torch.ones(3) + t], [1.0], [0.2], lambda_=2.0)
    assert out.tolist() == [1.0, -3.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_trims_side_by_side_are_mergekits_rule_one_at_a_time(dtype):
    # Magnitudes on a coarse grid: every cut falls among equal magnitudes, so each model
    # takes the sort fallback, and the three sorts run side by side on two threads. Each
    # must keep exactly mergekit's choice: argsort(|τ| as float32, descending)[:k].
    g = torch.Generator().manual_seed(3)
    deltas = [(torch.randint(-50, 51, (200_000,), generator=g).float() / 100).to(dtype)
              for _ in range(3)]
    densities = [0.5, 0.7, 0.3]
    with torch_threads(2):
        together = magnitude_trim_all(deltas, densities)
    for delta, density, trimmed in zip(deltas, densities, together, strict=True):
        k = int(density * delta.numel())
        w = delta.abs().float()
        assert int((w >= w.sort(descending=True).values[k - 1]).sum()) != k  # ties at the cut
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[torch.argsort(w, descending=True)[:k]] = True
        assert torch.equal(trimmed, delta * keep.to(dtype))
        assert torch.equal(trimmed, magnitude_trim(delta, density))


def test_linear_hand_computed():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0])
    # Σwθ = 1·[1, 2] + 3·[3, −4] = [10, −10]; / Σw = 4 -> [2.5, −2.5]
    assert torch.equal(linear_merge([a, b], [1.0, 3.0]), torch.tensor([2.5, -2.5]))
    assert torch.equal(linear_merge([a, b], [1.0, 3.0], normalize=False),
                       torch.tensor([10.0, -10.0]))


def test_task_arithmetic_hand_computed():
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    m1, m2 = torch.tensor([2.0, 0.0]).double(), torch.tensor([1.0, 3.0]).double()
    # τ1 = [1, −1], τ2 = [0, 2]; w = [0.5, 2]: Σwτ = [0.5, 3.5]; λ = 0.5 -> [0.25, 1.75]
    out = task_arithmetic_merge(base, [m1, m2], [0.5, 2.0], lambda_=0.5)
    assert torch.equal(out, torch.tensor([1.25, 2.75], dtype=torch.float64))
    # normalize: / Σw = 2.5 -> [0.2, 1.4]; λ -> [0.1, 0.7]; + 1 -> [1.1, 1.7]
    out = task_arithmetic_merge(base, [m1, m2], [0.5, 2.0], lambda_=0.5, normalize=True)
    torch.testing.assert_close(out, torch.tensor([1.1, 1.7], dtype=torch.float64))
    # normalize with Σw = 0 divides by 1 (mergekit): w = [1, −1] -> τ1 − τ2 = [1, −3]
    out = task_arithmetic_merge(base, [m1, m2], [1.0, -1.0], lambda_=0.5, normalize=True)
    assert torch.equal(out, torch.tensor([1.5, -0.5], dtype=torch.float64))
    out = dare_merge(base, [m1, m2], [1.0, -1.0], [1.0, 1.0], _gens(0, "x", 2),
                     sign_consensus=False, lambda_=0.5, normalize=True)
    assert torch.equal(out, torch.tensor([1.5, -0.5], dtype=torch.float64))


def test_dare_density_zero_returns_base_without_nan():
    base, models = _hand_inputs(torch.float32)
    for consensus in (False, True):
        out = dare_merge(base, models, HAND_W, [0.0, 0.0, 0.0], _gens(0, "x", 3),
                         sign_consensus=consensus, normalize=True)
        assert torch.equal(out, base)


# --------------------------------------------------------------------------------------
# 3. properties
# --------------------------------------------------------------------------------------


def _no_conflict(shape, n, seed, dtype=torch.float64):
    """Models whose task vectors share one sign per entry (and are never zero)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    models = [base + sign * (0.1 + torch.rand(shape, generator=g, dtype=torch.float64))
              for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_density_one_without_conflict_equals_task_arithmetic(dtype):
    base, models = _no_conflict((6, 5), 3, seed=1, dtype=dtype)
    ones = [1.0, 1.0, 1.0]
    # normalize=False, any positive weights: every weighted delta agrees -> plain Σwτ.
    w = [0.3, 1.1, 0.6]
    out = ties_merge(base, models, w, ones, lambda_=1.7, normalize=False)
    assert torch.equal(out, task_arithmetic_merge(base, models, w, lambda_=1.7))
    # normalize=True: divisor is Σw of all models -> task arithmetic with normalize.
    out = ties_merge(base, models, w, ones, lambda_=1.7, normalize=True)
    assert torch.equal(out, task_arithmetic_merge(base, models, w, lambda_=1.7, normalize=True))
    # normalize=True with weights 1: the mean of task vectors = task arithmetic with w = 1/n.
    out = ties_merge(base, models, ones, ones, lambda_=1.0, normalize=True)
    ta = task_arithmetic_merge(base, models, [1 / 3] * 3, lambda_=1.0)
    torch.testing.assert_close(out, ta, rtol=RTOL[dtype] * 4, atol=RTOL[dtype] * 4)


def test_ties_with_conflict_differs_from_task_arithmetic():
    base = torch.zeros(3, dtype=torch.float64)
    models = [torch.tensor([1.0, 2.0, -3.0]).double(), torch.tensor([-0.5, 2.0, 1.0]).double()]
    ties = ties_merge(base, models, [1.0, 1.0], [1.0, 1.0], normalize=False)
    ta = task_arithmetic_merge(base, models, [1.0, 1.0])
    # entry 0: Σ = 0.5 -> + -> 1 (TA 0.5); entry 1 agrees -> 4 both; entry 2: Σ = −2 -> −3
    assert torch.equal(ties, torch.tensor([1.0, 4.0, -3.0], dtype=torch.float64))
    assert torch.equal(ta, torch.tensor([0.5, 4.0, -2.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_linear_of_identical_models_returns_the_model(dtype):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4096, generator=g).to(dtype)
    # Weight sets for which every partial sum is exact in binary floating point.
    for w in ([1.0, 1.0], [0.5, 0.5], [2.0, 2.0], [0.5, 0.25, 0.25], [1.0] * 4, [4.0]):
        assert torch.equal(linear_merge([t] * len(w), w), t), w
    # Arbitrary weights: within a few ulps in the compute dtype...
    for w in ([0.2, 0.3, 0.5], [1.0, 1.0, 1.0], [0.1] * 7, [3.0, -1.0]):
        out = linear_merge([t] * len(w), w)
        ulp = torch.finfo(dtype).eps
        assert bool(((out - t).abs() <= 8 * ulp * t.abs()).all()), w
    # ... and exact again once a bf16 model merged in float32 is cast back to bf16.
    tb = t.to(torch.bfloat16)
    for w in ([0.2, 0.3, 0.5], [1.0, 1.0, 1.0], [0.1] * 7, [3.0, -1.0]):
        out = linear_merge([tb.float()] * len(w), w).to(torch.bfloat16)
        assert torch.equal(out, tb), w


def test_trim_ties_follow_mergekit_argsort():
    # No ties at the cut: exactly the entries above it, whatever the rule.
    s = torch.tensor([[2.0, 7.0, 2.0], [9.0, 2.0, 2.0]])
    assert magnitude_trim(s, 2 / 6).tolist() == [[0.0, 7.0, 0.0], [9.0, 0.0, 0.0]]
    # Ties straddling the cut: mergekit keeps argsort(descending=True)[:k]; so do we.
    g = torch.Generator().manual_seed(3)
    for n in (5, 40, 1000):
        t = torch.randint(1, 4, (n,), generator=g).float() * torch.where(
            torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        for density in (0.1, 0.37, 0.5):
            k = max(1, int(density * n))
            expected = torch.zeros(n, dtype=torch.bool)
            expected[torch.argsort(t.abs(), descending=True)[:k]] = True
            assert torch.equal(magnitude_trim(t, density) != 0, expected), (n, density)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.1, 0.25, 0.3, 0.5, 0.77, 0.9, 0.999, 1.0])
def test_magnitude_trim_keeps_exactly_floor_density_n_with_ties(density):
    g = torch.Generator().manual_seed(9)
    n = 1000
    # magnitudes in {1, 2, 3}, random signs, no zeros: ties everywhere.
    mags = torch.randint(1, 4, (n,), generator=g).double()
    delta = torch.where(torch.rand(n, generator=g) < 0.5, -mags, mags)
    out = magnitude_trim(delta, density)
    k = n if density >= 1 else 0 if density <= 0 else math.floor(density * n)
    assert int((out != 0).sum()) == k
    kept = out != 0
    if 0 < k < n:
        assert float(delta[kept].abs().min()) >= float(delta[~kept].abs().max())
    assert torch.equal(out[kept], delta[kept])
    assert out.tolist() == ref_trim(delta.tolist(), density, torch.float64)


def test_magnitude_trim_respects_float64_magnitudes():
    # Two float64 magnitudes that round to the same float32: the larger one must be kept.
    delta = torch.tensor([1.0, 1.0 + 2.0**-40, -(1.0 + 2.0**-41), 0.5], dtype=torch.float64)
    out = magnitude_trim(delta, 0.5)
    assert out.tolist() == [0.0, 1.0 + 2.0**-40, -(1.0 + 2.0**-41), 0.0]


def test_dare_same_seed_same_output_different_seed_different():
    base, models = _rand_models((64, 32), torch.float32, 3, seed=2)
    w, d = [1.0, 0.5, 0.8], [0.3, 0.5, 0.7]
    for consensus in (False, True):
        a = dare_merge(base, models, w, d, _gens(42, "w", 3), sign_consensus=consensus)
        b = dare_merge(base, models, w, d, _gens(42, "w", 3), sign_consensus=consensus)
        c = dare_merge(base, models, w, d, _gens(43, "w", 3), sign_consensus=consensus)
        e = dare_merge(base, models, w, d, _gens(42, "w2", 3), sign_consensus=consensus)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert not torch.equal(a, e)
    # Different models under the same (seed, name) draw different masks.
    m0, m1 = _masks_of(42, "w", (64, 32), [0.5, 0.5])
    assert not torch.equal(m0, m1)


def test_dare_mask_independent_of_tensor_processing_order():
    shapes = {"a.weight": (8, 5), "b.bias": (13,), "c.weight": (4, 4, 2), "d.scale": ()}
    w, d = [1.0, -0.5, 0.7], [0.4, 0.6, 0.2]
    data = {n: _rand_models(s, torch.float32, 3, seed=i) for i, (n, s) in enumerate(shapes.items())}

    def run(order):
        results = {}
        for name in order:
            base, models = data[name]
            gens = [tensor_generator(99, name, f"model{i}") for i in range(3)]
            results[name] = dare_merge(base, models, w, d, gens, sign_consensus=True,
                                       lambda_=1.2)
        return results

    forward = run(list(shapes))
    backward = run(list(reversed(shapes)))
    interleaved = run(["c.weight", "a.weight", "d.scale", "b.bias", "a.weight"])
    for name in shapes:
        assert torch.equal(forward[name], backward[name]), name
        assert torch.equal(forward[name], interleaved[name]), name


def test_dare_mask_same_whatever_the_compute_dtype():
    base, models = _rand_models((32, 16), torch.float64, 2, seed=4)
    args = ([1.0, 1.0], [0.5, 0.5])
    out64 = dare_merge(base, models, *args, _gens(1, "t", 2), sign_consensus=False)
    out32 = dare_merge(base.float(), [m.float() for m in models], *args, _gens(1, "t", 2),
                       sign_consensus=False)
    assert torch.equal(out64 == base, out32 == base.float())
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)


def test_tensor_generator_independent_of_python_hash_seed():
    code = ("import torch; from mergekit_pcb.engine.rng import tensor_generator; "
            "print(torch.rand(4, generator=tensor_generator(5, 'x.weight', 'm1')).tolist())")
    here = torch.rand(4, generator=tensor_generator(5, "x.weight", "m1")).tolist()
    env = dict(os.environ, PYTHONHASHSEED="12345")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, check=True)
    assert res.stdout.strip() == str(here)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9])
def test_dare_keep_fraction_and_rescale(density):
    n = 200_000
    g = torch.Generator().manual_seed(8)
    delta = 0.1 + torch.rand(n, generator=g)  # never zero
    out = random_drop(delta, density, tensor_generator(3, f"big.{density}", "m"))
    kept = out != 0
    count = int(kept.sum())
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(count - n * density) <= 5 * sigma, (count, n * density, sigma)
    torch.testing.assert_close(out[kept], delta[kept] / density, rtol=1e-6, atol=0)
    # Without rescale the survivors are untouched.
    raw = random_drop(delta, density, tensor_generator(3, f"big.{density}", "m"), rescale=False)
    assert torch.equal(raw != 0, kept)
    assert torch.equal(raw[kept], delta[kept])


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_density_one_equals_task_arithmetic_and_ties(normalize):
    base, models = _rand_models((9, 7), torch.float32, 3, seed=6)
    w, ones = [0.6, -0.3, 1.1], [1.0, 1.0, 1.0]
    lin = dare_merge(base, models, w, ones, _gens(0, "t", 3), sign_consensus=False,
                     lambda_=0.8, normalize=normalize)
    assert torch.equal(lin, task_arithmetic_merge(base, models, w, 0.8, normalize))
    ties = dare_merge(base, models, w, ones, _gens(0, "t", 3), sign_consensus=True,
                      lambda_=0.8, normalize=normalize)
    assert torch.equal(ties, ties_merge(base, models, w, ones, 0.8, normalize))


# --------------------------------------------------------------------------------------
# 4. registry classes with their declared defaults
# --------------------------------------------------------------------------------------


def _defaults(cls):
    per_model = {p.name: p.default for p in cls.params if p.per_model}
    top = {p.name: p.default for p in cls.params if not p.per_model}
    return per_model, top


def test_registry_names_and_mergekit_defaults():
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert isinstance(get_method(name), cls)
    with pytest.raises(RecipeError):
        get_method("no_such_method")
    # mergekit: linear normalize=True; task_arithmetic normalize=False; ties normalize=True;
    # dare_* normalize=False, rescale=True; lambda 1; weight/density per model, density 1.
    expect = {
        "linear": {"normalize": True},
        "task_arithmetic": {"normalize": False, "lambda": 1.0},
        "ties": {"normalize": True, "lambda": 1.0, "scope": "tensor"},
        "dare_linear": {"normalize": False, "rescale": True, "lambda": 1.0},
        "dare_ties": {"normalize": False, "rescale": True, "lambda": 1.0},
    }
    for name, top in expect.items():
        per_model, declared = _defaults(REGISTRY[name])
        for k, v in top.items():
            assert declared[k] == v, (name, k)
        assert "weight" in per_model
        if name != "linear" and name != "task_arithmetic":
            assert per_model["density"] == 1.0
    assert Linear.requires_base is False
    # mergekit's passthrough takes one model and its karcher mean needs no base
    no_base = {"linear", "passthrough", "karcher"}
    assert all(REGISTRY[n].requires_base for n in REGISTRY if n not in no_base)
    assert not any(REGISTRY[n].requires_base for n in no_base)
    assert DareLinear.uses_rng and DareTies.uses_rng and not Ties.uses_rng


def _inputs(cls, base, models, per_model_override=None, top_override=None, gens=None):
    per_model, top = _defaults(cls)
    model_params = [dict(per_model, **(per_model_override[i] if per_model_override else {}))
                    for i in range(len(models))]
    top = dict(top, **(top_override or {}))
    return TensorInputs(name="t", base=base, models=models, model_params=model_params,
                        params=top, generators=gens)


@pytest.mark.parametrize("dtype", DTYPES)
def test_registry_defaults_equal_pure_functions(dtype):
    base, models = _rand_models((6, 4), dtype, 3, seed=12)
    ones = [1.0, 1.0, 1.0]
    out = Linear().merge(_inputs(Linear, None, models))
    assert torch.equal(out, linear_merge(models, ones, normalize=True))
    out = TaskArithmetic().merge(_inputs(TaskArithmetic, base, models))
    assert torch.equal(out, task_arithmetic_merge(base, models, ones, 1.0, False))
    out = Ties().merge(_inputs(Ties, base, models))
    assert torch.equal(out, ties_merge(base, models, ones, ones, 1.0, True))
    for cls, consensus in ((DareLinear, False), (DareTies, True)):
        out = cls().merge(_inputs(cls, base, models, gens=_gens(4, "t", 3)))
        expect = dare_merge(base, models, ones, ones, _gens(4, "t", 3),
                            sign_consensus=consensus, lambda_=1.0, normalize=False,
                            rescale=True)
        assert torch.equal(out, expect)
    # And the defaults agree with the independent reference.
    assert_matches(Ties().merge(_inputs(Ties, base, models)),
                   ref_ties(base, models, ones, ones, 1.0, True), [base, *models], dtype)


def test_registry_passes_parameters_through():
    base, models = _rand_models((5, 5), torch.float64, 3, seed=13)
    w, d = [0.4, -0.2, 1.3], [0.3, 0.6, 0.9]
    pm = [{"weight": wi, "density": di} for wi, di in zip(w, d, strict=True)]
    out = Linear().merge(_inputs(Linear, None, models, pm, {"normalize": False}))
    assert torch.equal(out, linear_merge(models, w, normalize=False))
    out = TaskArithmetic().merge(
        _inputs(TaskArithmetic, base, models, pm, {"lambda": 0.6, "normalize": True}))
    assert torch.equal(out, task_arithmetic_merge(base, models, w, 0.6, True))
    out = Ties().merge(_inputs(Ties, base, models, pm, {"lambda": 0.6, "normalize": False}))
    assert torch.equal(out, ties_merge(base, models, w, d, 0.6, False))
    assert_matches(out, ref_ties(base, models, w, d, 0.6, False), [base, *models],
                   torch.float64)
    for cls, consensus in ((DareLinear, False), (DareTies, True)):
        top = {"lambda": 0.6, "normalize": True, "rescale": False}
        out = cls().merge(_inputs(cls, base, models, pm, top, gens=_gens(4, "t", 3)))
        expect = dare_merge(base, models, w, d, _gens(4, "t", 3), sign_consensus=consensus,
                            lambda_=0.6, normalize=True, rescale=False)
        assert torch.equal(out, expect)
        ref = ref_dare(base, models, w, d, _masks_of(4, "t", (5, 5), d),
                       sign_consensus=consensus, lambda_=0.6, normalize=True, rescale=False)
        assert_matches(out, ref, [base, *models], torch.float64)


def test_linear_zero_weight_sum_is_a_recipe_error():
    _, models = _rand_models((3,), torch.float32, 2, seed=0)
    with pytest.raises(RecipeError):
        Linear().merge(_inputs(Linear, None, models, [{"weight": 1.0}, {"weight": -1.0}]))
