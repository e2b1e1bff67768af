"""Post-processing steps (methods.postprocess) against float64 references written from the
official code's steps: FusionBench's `subspace_consistency_spectral_calibration` (one
singular direction at a time, explicit dot products) and LiNeS's `LiNeS_scaling` /
`create_task_vector` (block keys `.{i}.`, a = ‖Σ τ‖₁ / ‖τ_merged‖₁ / K)."""

from __future__ import annotations

import pytest
import torch

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
