"""`pcbmerge analyze`: each statistic against a hand-computed case or a float64 dense
reference written here from the definitions (numpy, not the package's code)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_pcb.analysis import metrics
from mergekit_pcb.analysis.metrics import (
    cosine_from_gram,
    effective_rank,
    gram,
    iso_rank,
    norm_ratio,
    projected_energy,
    sign_counts,
    singular_interference,
    tensor_stats,
    trimmed,
)

# --- hand-computed cases ------------------------------------------------------------------

HAND = [torch.tensor([3.0, -1.0, 0.0, 2.0]), torch.tensor([-2.0, 1.0, 0.0, 5.0]),
        torch.tensor([1.0, 0.0, 4.0, -6.0])]


def test_trim_keeps_each_tasks_top_magnitudes() -> None:
    kept = trimmed(HAND, [0.5, 0.5, 0.5])
    assert [k.tolist() for k in kept] == [[3, 0, 0, 2], [-2, 0, 0, 5], [0, 0, 4, -6]]


def test_sign_counts_by_hand() -> None:
    # entry 0: +3 and −2 (conflict, 2 tasks); entry 1: nobody; entry 2: task 3 alone;
    # entry 3: +2, +5, −6 (conflict, 3 tasks). Sums elect + everywhere.
    counts = sign_counts(trimmed(HAND, [0.5] * 3))
    assert counts.used_by == [1, 1, 1, 1]
    assert counts.conflicts == 2 and counts.overlap == 2
    assert counts.kept == [2, 2, 2]
    assert counts.elected == [2, 1, 1]
    # weight 2 on task 2: entry 0 sums 3 − 4 < 0 and elects −, which task 2 holds
    weighted = sign_counts(trimmed(HAND, [0.5] * 3), [1.0, 2.0, 1.0])
    assert weighted.elected == [1, 2, 1]


def test_cosine_and_norm_ratio_by_hand() -> None:
    g = gram([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.zeros(2)])
    assert g.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    cos = cosine_from_gram(g)
    assert cos[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert cos[2].tolist() == [0, 0, 0]  # a zero task vector: no direction, cosine 0
    assert norm_ratio([1.0, 5.0, 2.0]) == 5.0
    assert norm_ratio([0.0, 1.0]) is None


def test_effective_rank_by_hand() -> None:
    # p = (3/4, 1/4): H = −(¾ ln ¾ + ¼ ln ¼)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(h))
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_interference_by_hand() -> None:
    e1, e2 = torch.eye(3, dtype=torch.float64)[0], torch.eye(3, dtype=torch.float64)[1]
    apart = [torch.linalg.svd(2 * torch.outer(e1, e1)), torch.linalg.svd(3 * torch.outer(e2, e2))]
    assert singular_interference(apart, k=1) == (pytest.approx(0.0), pytest.approx(5.0))
    # the same direction twice: (UᵀU − I) = ±[[0,1],[1,0]], likewise V: |M| sums to 2 + 3
    same = [torch.linalg.svd(2 * torch.outer(e1, e1)), torch.linalg.svd(3 * torch.outer(e1, e1))]
    assert singular_interference(same, k=1)[0] == pytest.approx(5.0)


def test_iso_alignment_by_hand() -> None:
    s = torch.tensor([5.0, 1.0, 0.0])
    assert iso_rank(s) == 2  # 1/26 of the energy left outside the top 1 is over 0.05² = 1/400
    assert iso_rank(torch.tensor([10.0, 0.1, 0.0])) == 1
    assert iso_rank(torch.zeros(3)) == 0
    tau = torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    u = torch.eye(3)[:, :1]
    assert projected_energy(u, tau) == pytest.approx(5.0)  # row 0: 1 + 4, of 30 in all


# --- float64 dense references -------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _ref_keep(tau: np.ndarray, density: float) -> np.ndarray:
    """Top-⌊density·n⌋ magnitudes by a full sort (no ties in random data)."""
    flat = np.abs(tau).reshape(-1)
    k = max(1, int(density * flat.size))
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(tau.shape)


def _ref_sti(mats: list[np.ndarray]) -> float:
    r = min(mats[0].shape)
    k = max(1, r // len(mats))
    us, ss, vs = [], [], []
    for m in mats:
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    eye = np.eye(u.shape[1])
    return float(np.abs((u.T @ u - eye) @ np.diag(s) @ (v.T @ v - eye)).sum())


@pytest.fixture
def random_deltas() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 9, generator=g, dtype=torch.float64)
    shared = torch.randn(12, 9, generator=g, dtype=torch.float64)
    deltas = [0.5 * shared + torch.randn(12, 9, generator=g, dtype=torch.float64) * s
              for s in (0.3, 1.0, 2.5)]
    return base, deltas


@pytest.mark.parametrize("slice_size", [metrics.SLICE, 7])  # slices crossing the entries
def test_tensor_stats_against_dense(random_deltas: tuple[torch.Tensor, list[torch.Tensor]],
                                    monkeypatch: pytest.MonkeyPatch, slice_size: int) -> None:
    monkeypatch.setattr(metrics, "SLICE", slice_size)
    base, deltas = random_deltas
    densities = [0.3, 0.5, 0.2]
    st = tensor_stats("w", base, deltas, densities, weights=[1.0, 0.5, 2.0])
    taus = [_np(d) for d in deltas]
    norms = [np.linalg.norm(t) for t in taus]
    np.testing.assert_allclose(np.sqrt(st.norm2), norms, rtol=1e-12)
    cos = cosine_from_gram(st.gram).numpy()
    for i in range(3):
        for j in range(3):
            ref = float((taus[i] * taus[j]).sum() / (norms[i] * norms[j]))
            assert cos[i, j] == pytest.approx(ref, rel=1e-12)
    keeps = [_ref_keep(t, d) for t, d in zip(taus, densities, strict=True)]
    used = sum(k.astype(int) for k in keeps)
    pos = sum((k & (t > 0)).astype(int) for k, t in zip(keeps, taus, strict=True))
    neg = sum((k & (t < 0)).astype(int) for k, t in zip(keeps, taus, strict=True))
    assert st.signs.used_by == [int((used == k).sum()) for k in range(4)]
    assert st.signs.conflicts == int(((pos > 0) & (neg > 0)).sum())
    assert st.signs.kept == [int(k.sum()) for k in keeps]
    total = sum(w * np.where(k, t, 0) for w, k, t in zip([1.0, 0.5, 2.0], keeps, taus,
                                                         strict=True))
    gamma = np.where(total >= 0, 1, -1)
    assert st.signs.elected == [int((k & (np.sign(t) == gamma)).sum())
                                for k, t in zip(keeps, taus, strict=True)]
    for i, t in enumerate(taus):
        s = np.linalg.svd(t, compute_uv=False)
        p = s / s.sum()
        assert st.effective_rank is not None
        assert st.effective_rank[i] == pytest.approx(math.exp(-(p * np.log(p)).sum()),
                                                     rel=1e-10)
    assert st.interference == pytest.approx(_ref_sti(taus), rel=1e-9)
    assert st.base_norm2 == pytest.approx(float((_np(base) ** 2).sum()), rel=1e-12)


def test_after_merge_against_dense(random_deltas: tuple[torch.Tensor, list[torch.Tensor]]
                                   ) -> None:
    base, deltas = random_deltas
    st = tensor_stats("w", base, deltas, [0.3] * 3)
    merged = sum(deltas) / 3  # a merged update: the mean
    metrics.after_merge(st, merged, deltas)
    m = _np(merged)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    energy = s ** 2
    k = next(k for k in range(1, len(s) + 1) if energy[k:].sum() <= 0.05 ** 2 * energy.sum())
    assert st.iso_rank == k
    assert st.aligned_energy is not None and st.distance2 is not None
    for i, d in enumerate(deltas):
        t = _np(d)
        assert st.aligned_energy[i] == pytest.approx(float(((u[:, :k].T @ t) ** 2).sum()),
                                                     rel=1e-10)
        assert st.distance2[i] == pytest.approx(float(((m - t) ** 2).sum()), rel=1e-12)
    assert st.merged_norm2 == pytest.approx(float((m ** 2).sum()), rel=1e-12)


def test_one_dimensional_tensors_get_no_spectral_figures() -> None:
    st = tensor_stats("b", torch.zeros(5), [torch.ones(5), -torch.ones(5)], [1.0, 1.0])
    assert st.effective_rank is None and st.interference is None
    assert st.signs.conflicts == 5 and st.signs.used_by == [0, 0, 5]
