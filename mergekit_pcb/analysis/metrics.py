"""Diagnostics of a merge, as pure functions of one tensor's task vectors.

Each function takes the task vectors τᵢ = θᵢ − θ₀ of one tensor (upcast before the
subtraction, `methods.spectral.task_matrices`) and returns numbers, or the sufficient
statistics of `TensorStats` from which a layer's or the whole model's figure follows
exactly (sums of squares, Gram matrices, counts): a layer's cosine is that of the layer's
concatenated task vectors, not a mean of the tensors' cosines.

The quantities, as the papers define them (design/methods.md, design/spectral.md):

- sign conflict (TIES, PCB): among the entries two or more tasks keep after the TIES trim
  at the recipe's density (the top-density magnitudes of each task, every entry tied at
  the cut kept), those where the kept values have both signs;
- used by k tasks (TALL masks / Consensus merging): how many entries k tasks keep, for
  k = 0…n (k = 0: nobody's; k = 1: one task's own);
- elected: each task's kept entries whose sign agrees with TIES's elected sign
  γ = sign(Σᵢ wᵢ·trimmed τᵢ) (a zero sum elects +), the entries a TIES merge takes from it;
- effective rank (Roy & Vetterli 2007): exp of the entropy of the singular values
  normalised to sum 1;
- task singular interference (TSV, Gargiulo et al. 2025):
  ‖(UᵀU − I) Σ (VᵀV − I)‖₁ (entrywise) with U = [U₁ … U_T], V = [V₁ … V_T] the tasks'
  singular vectors side by side and Σ their singular values, each task's top ⌊r/T⌋
  triplets (the rank TSV-M merges at, which keeps UᵀU at most r × r);
- alignment (Iso, Marczak et al. 2025): the share of a task's energy ‖Π τᵢ‖²/‖τᵢ‖² inside
  the merged update's top-k left singular subspace Π, with k the least rank that leaves
  at most ε = 5% of the merged update's norm outside (the paper's subspace alignment ratio
  is the square root of this share);
- relative distance of the merged update from each task's, ‖Δ − τᵢ‖/‖τᵢ‖;
- the spectra of one chosen matrix: the singular values of each τᵢ, of their sum Σᵢ τᵢ
  (task arithmetic at λ = 1) and of the merged update Δ, where singular-value
  over-counting (SVC) and a task drowned by another's norm show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mergekit_pcb.methods.selection import kth_smallest
from mergekit_pcb.methods.spectral import kept

# Elementwise reductions run over slices of this many entries, upcast to float64 there:
# the float64 copies of a large embedding would cost twice its float32 size.
SLICE = 1 << 20
# Iso's tolerance: the merged update's top-k subspace leaves at most this fraction of its
# Frobenius norm outside.
ISO_EPSILON = 0.05
# Task-vector norms this far apart: spectral and sign-based merges collapse (WUDI on
# ViT-B/32: 85.5 → 49.2 at 5–7×). The report's warning and the spectrum's pick use it.
NORM_RATIO_LIMIT = 5.0


def _flat_slices(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    n = tensors[0].numel()
    return [(a, min(a + SLICE, n)) for a in range(0, n, SLICE)] or [(0, 0)]


def gram(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gᵢⱼ = ⟨τᵢ, τⱼ⟩ summed in float64 (n × n): the norms are √Gᵢᵢ and the cosines
    Gᵢⱼ/√(GᵢᵢGⱼⱼ), of this tensor or of any union of tensors whose Grams are added."""
    flat = [d.reshape(-1) for d in deltas]
    out = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for a, b in _flat_slices(flat):
        block = torch.stack([f[a:b] for f in flat]).to(device="cpu", dtype=torch.float64)
        out += block @ block.T
    return out


def cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity from a Gram matrix; 0 for a task vector that is zero."""
    norms = g.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / torch.where(denom > 0, denom, 1.0),
                       torch.zeros_like(g))


def norm_ratio(norms: Sequence[float]) -> float | None:
    """Largest over smallest task-vector norm; None when one task vector is zero (the
    ratio is unbounded: a model that did not move is its own warning)."""
    low = min(norms)
    return max(norms) / low if low > 0 else None


def squared_distance(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """‖a − b‖² (‖a‖² without `b`) summed in float64, slice by slice."""
    fa = a.reshape(-1)
    fb = None if b is None else b.reshape(-1)
    total = 0.0
    for s, e in _flat_slices([fa]):
        diff = fa[s:e].to(device="cpu", dtype=torch.float64)
        if fb is not None:
            diff = diff - fb[s:e].to(device="cpu", dtype=torch.float64)
        total += float(torch.dot(diff, diff))
    return total


def trimmed(deltas: Sequence[torch.Tensor], densities: Sequence[float]) -> list[torch.Tensor]:
    """Each task vector with only its top-density magnitudes left (the TIES trim: at least
    one entry kept, density ≥ 1 keeps all). Every entry tied with the k-th largest magnitude
    is kept, as the global-scope trim does: mergekit's choice among equal magnitudes at the
    cut (`methods.ops.magnitude_trim`) costs several copies of the tensor and moves a count
    by a few entries at most. One task at a time, so the scratch is one tensor's."""
    out = []
    for delta, density in zip(deltas, densities, strict=True):
        n = delta.numel()
        if density >= 1.0 or n == 0:
            out.append(delta)
            continue
        k = min(n, max(1, int(density * n))) if density > 0 else 0
        if k == 0:
            out.append(torch.zeros_like(delta))
            continue
        magnitude = delta.abs()
        flat = magnitude.reshape(-1)
        threshold = (kth_smallest(flat, n - k, nonnegative=True)
                     if flat.dtype == torch.float32
                     else float(torch.kthvalue(flat.cpu(), n - k + 1).values))
        out.append(delta * (magnitude >= threshold))
        del magnitude, flat
    return out


@dataclass
class SignCounts:
    """How the tasks' kept entries of one tensor meet."""

    numel: int
    kept: list[int]  # entries each task keeps (non-zero after the trim)
    used_by: list[int]  # used_by[k]: entries exactly k tasks keep, k = 0 … n
    conflicts: int  # entries kept with both signs
    elected: list[int]  # each task's kept entries that agree with the elected sign

    @property
    def overlap(self) -> int:
        """Entries two or more tasks keep: where a sign conflict can happen."""
        return sum(self.used_by[2:])


def sign_counts(kept_deltas: Sequence[torch.Tensor],
                weights: Sequence[float] | None = None) -> SignCounts:
    """Conflicts, the used-by-k histogram and the elected entries of trimmed task vectors
    (zero where a task does not keep an entry). `weights` multiply the trimmed values
    before the election, as mergekit's `ties` does (default 1); the election sums in the
    task vectors' dtype, as the merge does."""
    n = len(kept_deltas)
    flat = [d.reshape(-1) for d in kept_deltas]
    w = list(weights) if weights is not None else [1.0] * n
    count_dtype = torch.uint8 if n < 255 else torch.int32
    used_by = torch.zeros(n + 1, dtype=torch.int64)
    kept_counts = [0] * n
    elected = [0] * n
    conflicts = 0
    for a, b in _flat_slices(flat):
        parts = [f[a:b] for f in flat]
        positive = [p > 0 for p in parts]
        negative = [p < 0 for p in parts]
        pos = torch.zeros(b - a, dtype=count_dtype, device=flat[0].device)
        neg = torch.zeros_like(pos)
        total = torch.zeros_like(parts[0])
        for i, part in enumerate(parts):
            pos += positive[i]
            neg += negative[i]
            kept_counts[i] += int(torch.count_nonzero(positive[i])) + int(
                torch.count_nonzero(negative[i]))
            total.add_(part, alpha=w[i])
        used = (pos + neg).to(torch.int64)
        used_by += torch.bincount(used, minlength=n + 1)[: n + 1].cpu()
        conflicts += int(torch.count_nonzero((pos > 0) & (neg > 0)))
        up = total >= 0  # the elected sign: a zero sum elects + (mergekit)
        down = ~up
        for i in range(n):
            if w[i] == 0:
                continue  # a zero-weight entry has no sign to agree with
            # the sign the election sees is that of wᵢ·τᵢ
            agree_pos, agree_neg = (up, down) if w[i] > 0 else (down, up)
            elected[i] += int(torch.count_nonzero(positive[i] & agree_pos)) + int(
                torch.count_nonzero(negative[i] & agree_neg))
    return SignCounts(flat[0].numel(), kept_counts, [int(x) for x in used_by], conflicts,
                      elected)


def effective_rank(s: torch.Tensor) -> float:
    """exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ (Roy & Vetterli); 0 for a zero matrix."""
    s = s.to(torch.float64).clamp(min=0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U, s, Vᵀ
# Below this fraction of the largest singular value a direction is noise: float32's
# epsilon (the checkpoints' precision) times the matrix's larger side, as
# `methods.spectral.default_rtol` gives for float32.
NOISE_EPS = float(torch.finfo(torch.float32).eps)


def spectrum(m: torch.Tensor, k: int | None = None) -> Svd:
    """All singular values of `m` (descending) and its top `k` (default all) singular
    vectors, in float64, from the eigendecomposition of the smaller Gram matrix (MMᵀ or
    MᵀM): about 4× faster than an SVD of a 768 × 2048 float32 matrix, and in float64 the
    squaring costs no precision the float32 inputs have. The vectors of the other side are
    M's image of these over σ; where σ is noise (`NOISE_EPS`) they are left zero."""
    d = m.to(torch.float64)
    wide = d.shape[0] <= d.shape[1]
    eigenvalues, q = torch.linalg.eigh(d @ d.T if wide else d.T @ d)
    s = eigenvalues.flip(0).clamp(min=0).sqrt()
    k = s.numel() if k is None else min(k, s.numel())
    q = q.flip(1)[:, :k]
    signal = s[:k] > NOISE_EPS * max(m.shape) * (s[0] if s.numel() else 0.0)
    other = (d.T @ q if wide else d @ q) / torch.where(signal, s[:k], 1.0)
    other = other * signal
    u, v = (q, other) if wide else (other, q)
    return u, s, v.T


def singular_interference(svds: Sequence[Svd], k: int | None = None) -> tuple[float, float]:
    """(TSV's interference, the sum of the singular values it weighs) over each task's top
    `k` triplets (default ⌊r/T⌋, at least 1); triplets at or below the rank threshold are
    left out (their vectors are arbitrary)."""
    m, n = svds[0][0].shape[0], svds[0][2].shape[1]
    k = max(1, min(m, n) // len(svds)) if k is None else k
    us, ss, vs = [], [], []
    for u, s, vh in svds:
        s_k = s[:k]
        keep = kept(s_k, s[0] if s.numel() else 0.0, NOISE_EPS * max(m, n))
        us.append(u[:, :k][:, keep])
        ss.append(s_k[keep])
        vs.append(vh[:k][keep].T)
    u_all, s_all, v_all = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    eye = torch.eye(u_all.shape[1], dtype=u_all.dtype, device=u_all.device)
    m = (u_all.T @ u_all - eye) @ torch.diag(s_all) @ (v_all.T @ v_all - eye)
    return float(m.abs().sum()), float(s_all.sum())


def iso_rank(s: torch.Tensor, epsilon: float = ISO_EPSILON) -> int:
    """The least k with Σ_{i>k} σᵢ² ≤ ε²·Σ σᵢ² (0 for a zero matrix)."""
    energy = s.to(torch.float64) ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0
    tail = total - torch.cumsum(energy, 0)  # tail[k-1]: energy left outside the top k
    inside = torch.nonzero(tail <= epsilon ** 2 * total)
    return int(inside[0]) + 1 if inside.numel() else int(s.numel())


def projected_energy(u_top: torch.Tensor, delta: torch.Tensor) -> float:
    """‖U_kᵀ τ‖²: the energy of τ inside the span of the orthonormal columns U_k."""
    if u_top.shape[1] == 0:
        return 0.0
    p = u_top.T.to(torch.float64) @ delta.to(torch.float64)
    return float((p * p).sum())


@dataclass
class TensorStats:
    """One tensor's sufficient statistics (before and, once filled in, after the merge)."""

    name: str
    shape: list[int]
    density: list[float]
    gram: torch.Tensor  # float64 n × n
    signs: SignCounts
    base_norm2: float
    # 2-D tensors (the spectral figures), else None
    effective_rank: list[float] | None = None
    interference: float | None = None
    interference_mass: float | None = None
    # after the merge
    merged_norm2: float | None = None
    distance2: list[float] | None = None
    aligned_energy: list[float] | None = None  # 2-D: ‖Π τᵢ‖² inside the merged top-k
    iso_rank: int | None = None
    merge_kept: list[int] | None = None  # pcb: entries each task keeps (Sᵢ > 0)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def norm2(self) -> list[float]:
        return [float(x) for x in self.gram.diagonal()]


def tensor_stats(name: str, base: torch.Tensor, deltas: Sequence[torch.Tensor],
                 densities: Sequence[float], weights: Sequence[float] | None = None,
                 spectral: bool = True) -> TensorStats:
    """Everything measured before the merge, for one tensor."""
    signs = sign_counts(trimmed(deltas, densities), weights)
    stats = TensorStats(name, list(base.shape), list(densities), gram(deltas), signs,
                        squared_distance(base))
    if spectral and base.dim() == 2 and base.numel() > 0:
        # one SVD at a time, of which only the top ⌊r/T⌋ triplets the interference uses
        # are kept: about one matrix's worth in all, whatever the number of tasks
        k = max(1, min(base.shape) // len(deltas))
        svds, ranks = [], []
        for d in deltas:
            u, s, vh = spectrum(d, k)
            ranks.append(effective_rank(s))
            svds.append((u, s, vh))
        stats.effective_rank = ranks
        stats.interference, stats.interference_mass = singular_interference(svds, k)
    return stats


def after_merge(stats: TensorStats, merged: torch.Tensor, deltas: Sequence[torch.Tensor],
                spectral: bool = True) -> TensorStats:
    """Fill in what the merged update Δ (merged − base) says about each task."""
    stats.merged_norm2 = squared_distance(merged)
    stats.distance2 = [squared_distance(merged, d) for d in deltas]
    if spectral and merged.dim() == 2 and merged.numel() > 0:
        u, s, _ = spectrum(merged)
        k = iso_rank(s)
        stats.iso_rank = k
        stats.aligned_energy = [projected_energy(u[:, :k], d) for d in deltas]
    return stats


def singular_values(m: torch.Tensor) -> list[float]:
    """Every singular value of the matrix `m`, descending, by a float64 SVD: not `spectrum`'s
    Gram eigendecomposition, whose squaring loses the values below √ε of the largest, which
    a log-scale plot of the whole spectrum shows."""
    return [float(x) for x in torch.linalg.svdvals(m.to(torch.float64)).cpu()]


@dataclass
class Spectra:
    """The singular values of one matrix's task vectors, their sum and the merged update."""

    name: str
    shape: list[int]  # the tensor's
    matrix: list[int]  # the matrix the SVD is of (a conv kernel's (out, in·kh·kw))
    reason: str  # why this matrix: named by --spectrum, or the default pick's rule
    tasks: list[list[float]]
    sum: list[float]  # of Σᵢ τᵢ (task arithmetic at λ = 1, no weights)
    merged: list[float] | None = None  # of Δ = merged − base, when measured after a merge


def spectra(name: str, shape: Sequence[int], reason: str, deltas: Sequence[torch.Tensor],
            merged: torch.Tensor | None = None) -> Spectra:
    """`Spectra` of the matrices `deltas` (τᵢ) and `merged` (Δ), each summed and decomposed
    in float64, one at a time."""
    total = torch.zeros(deltas[0].shape, dtype=torch.float64, device=deltas[0].device)
    tasks = []
    for d in deltas:
        total += d.to(torch.float64)
        tasks.append(singular_values(d))
    return Spectra(name, list(shape), list(deltas[0].shape), reason, tasks,
                   singular_values(total),
                   None if merged is None else singular_values(merged))


def pick_spectrum(candidates: Sequence[TensorStats], limit: float = NORM_RATIO_LIMIT
                  ) -> tuple[str, str] | None:
    """The matrix whose spectra the report shows when none is named, and why: the largest
    task-vector norm ratio where one reaches `limit` (a task drowning the others is what
    the spectra show best), else the highest sign conflict, else the first matrix. Ties go
    to the first in the recipe's order. None without a candidate."""
    if not candidates:
        return None
    ratios = [(r, t) for t in candidates
              if (r := norm_ratio([math.sqrt(max(x, 0.0)) for x in t.norm2])) is not None]
    over = [(r, t) for r, t in ratios if r >= limit]
    if over:
        r, t = max(over, key=lambda p: p[0])
        return t.name, (f"the largest task-vector norm ratio among the matrices, {r:.1f}×, "
                        f"at or above the {limit:g}× warning threshold")
    conflicts = [(t.signs.conflicts / t.signs.overlap, t) for t in candidates
                 if t.signs.overlap]
    if conflicts:
        c, t = max(conflicts, key=lambda p: p[0])
        return t.name, (f"the highest sign conflict among the matrices, {c:.0%} of the "
                        f"entries several tasks keep, as no norm ratio reaches {limit:g}×")
    return candidates[0].name, (f"the first matrix, as no norm ratio reaches {limit:g}× and "
                                "no entry is kept by two tasks")


__all__ = ["ISO_EPSILON", "NORM_RATIO_LIMIT", "SignCounts", "Spectra", "TensorStats",
           "after_merge", "cosine_from_gram", "effective_rank", "gram", "iso_rank",
           "norm_ratio", "pick_spectrum", "projected_energy", "sign_counts",
           "singular_interference", "singular_values", "spectra", "squared_distance",
           "tensor_stats", "trimmed"]
