"""The spectral core shared by `tsv_m`, `iso_c`, `iso_cts`, `cart` and `wudi`.

Those methods merge each weight matrix through its singular values and vectors. What they
share lives here: task matrices upcast before the subtraction (a bf16 subtraction loses
most of a small Δ), thin and randomized SVDs, the polar factor with a rank threshold, a
Newton–Schulz polar factor, and the rules for the tensors a method does not decompose.

Rank threshold: singular directions with s ≤ rtol·s_ref, rtol = max(m, n)·eps of the
working dtype (numpy's `matrix_rank` rule), are numerically arbitrary: LAPACK may return
any orthonormal basis of a (near-)null space. A step that gives every direction weight
(a polar factor, Iso's flat spectrum) would turn them into noise of full weight, so they
are dropped there; for a full-rank matrix nothing is dropped and the result is the
official code's.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from mergekit_pcb.methods.base import WEIGHT_RANGE, MergeMethod, ParamSpec, Range, TensorInputs

# The scale of the merged task vector (the papers' α): searched on validation data over
# 0.1…3.0 in the TSV and Iso papers; 1.0 in their code.
ALPHA = ParamSpec("alpha", 1.0, "scale of the merged task vector (the papers' α)",
                  bounds=WEIGHT_RANGE, search_range=Range(0.0, 3.0))
VOCABULARY = ParamSpec(
    "vocabulary", False, "decompose vocabulary matrices (embeddings, LM head) too; by default "
    "they take the method's rule for tensors it does not decompose", kind=bool)
SVD_KIND = ParamSpec(
    "svd", "full", "how the top singular triplets are found: full thin SVD (the official "
    "code) or a seeded randomized SVD (an approximation, cheaper when few are kept)",
    kind=str, choices=("full", "randomized"))
# The official CART and WUDI code act on these tensors only (CLIP names; Llama's
# `self_attn.*_proj.weight` and `mlp.*_proj.weight` match too): the key holds `attn` or
# `mlp` and neither `ln` nor `bias`.
MATRICES = ParamSpec(
    "matrices", "attn_mlp", "which 2-D tensors the method acts on: attention and MLP weights "
    "(the official code) or every 2-D tensor (FusionBench)", kind=str,
    choices=("attn_mlp", "all_2d"))

# Conv kernels (out, in, k…) as out × (in·k…) matrices: an extension beyond the papers,
# which merge ViTs and LLMs and give every non-2-D tensor the fallback.
CONV = ParamSpec(
    "conv", "fallback", "conv kernels (3-D to 5-D weights): the fallback rule (the papers) or "
    "decomposed as out × (in·kernel) matrices (matrix; an extension beyond the papers)",
    kind=str, choices=("fallback", "matrix"))

RANDOMIZED_OVERSAMPLE = 10
RANDOMIZED_POWER_ITERS = 4


def working_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (reference runs), else float32: SVDs never run in
    half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64
                                for t in tensors) else torch.float32


def task_matrices(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Δᵢ = Wᵢ − W₀, upcast before the subtraction."""
    dtype = working_dtype(base, *models)
    b = base.to(dtype)
    return [m.to(dtype) - b for m in models]


def mean_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean, summed in the given order (the official code's running mean differs only
    in rounding)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total / len(tensors)


def default_rtol(shape: Sequence[int], dtype: torch.dtype) -> float:
    return max(shape) * torch.finfo(dtype).eps


def is_attn_mlp(name: str) -> bool:
    """The official CART/WUDI selection of the matrices they act on."""
    return ("attn" in name or "mlp" in name) and not ("ln" in name or "bias" in name)


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, s (descending), Vᵀ of the thin SVD. LAPACK's divide-and-conquer (gesdd) can fail
    to converge in float32 on a matrix with a large cluster of tiny singular values (Iso-CTS
    met one on a 2048×5632 bf16 task matrix with its common subspace projected out); such a
    matrix is decomposed again in float64, where it converges, and cast back."""
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError:
        if m.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
        return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def randomized_svd(m: torch.Tensor, k: int, generator: torch.Generator,
                   oversample: int = RANDOMIZED_OVERSAMPLE,
                   power_iters: int = RANDOMIZED_POWER_ITERS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k triplets by a randomized range finder (Halko, Martinsson and Tropp 2011,
    algorithm 4.4: power iterations re-orthonormalized each time). The Gaussian test matrix
    is drawn on the CPU from `generator`, so a seed gives the same draw on any device."""
    rows, cols = m.shape
    r = min(rows, cols)
    sketch = min(r, k + oversample)
    if sketch >= r:  # nothing to save: the exact thin SVD
        u, s, vh = thin_svd(m)
        return u[:, :k], s[:k], vh[:k]
    omega = torch.randn(cols, sketch, generator=generator, dtype=m.dtype).to(m.device)
    q = torch.linalg.qr(m @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(m.mT @ q).Q
        q = torch.linalg.qr(m @ q).Q
    ub, s, vh = thin_svd(q.mT @ m)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def top_svd(m: torch.Tensor, k: int, kind: str, generator: torch.Generator | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of `m`, exactly (`full`) or randomized."""
    if kind == "randomized":
        assert generator is not None
        return randomized_svd(m, k, generator)
    u, s, vh = thin_svd(m)
    return u[:, :k], s[:k], vh[:k]


def kept(s: torch.Tensor, reference: torch.Tensor | float, rtol: float) -> torch.Tensor:
    """True where a singular value is above the rank threshold rtol·reference (and
    positive: an all-zero matrix keeps nothing)."""
    ref = float(reference)
    return (s > rtol * ref) & (s > 0)


def polar(m: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """The polar factor P Qᵀ of m = P Σ Qᵀ (the nearest matrix with orthonormal columns),
    over the directions above the rank threshold (a partial isometry when m is
    rank-deficient, with no arbitrary directions)."""
    u, s, vh = thin_svd(m)
    if s.numel() == 0:
        return torch.zeros_like(m)
    keep = kept(s, s[0], default_rtol(m.shape, m.dtype) if rtol is None else rtol)
    return u[:, keep] @ vh[keep]


def newton_schulz_polar(m: torch.Tensor, max_iter: int = 100
                        ) -> tuple[torch.Tensor, bool]:
    """The polar factor by the cubic Newton–Schulz iteration X ← 1.5X − 0.5·X XᵀX, from
    X₀ = m/‖m‖_F (every singular value in (0, 1], inside the basin (0, √3)): matmuls only.
    Returns (X, converged); a zero singular value stays zero, a tiny one converges slowly,
    so an ill-conditioned m may not converge within `max_iter` (the caller then uses the
    SVD form, which computes the same factor)."""
    norm = torch.linalg.matrix_norm(m)
    if norm == 0:
        return torch.zeros_like(m), True
    x = m / norm
    tall = m.shape[0] >= m.shape[1]
    tol = 30 * torch.finfo(m.dtype).eps * min(m.shape) ** 0.5
    for _ in range(max_iter):
        # the cubic term through the smaller Gram matrix
        cubic = x @ (x.mT @ x) if tall else (x @ x.mT) @ x
        nxt = 1.5 * x - 0.5 * cubic
        step = torch.linalg.matrix_norm(nxt - x)
        x = nxt
        if step <= tol:
            return x, True
    return x, False


# The reasons a tensor takes a method's fallback rule, as `validate` and `--dry-run` say them.
NOT_2D = "not 2-D"
EMPTY = "empty matrix"
VOCABULARY_MATRIX = "vocabulary matrix, vocabulary: false"
NOT_ATTN_MLP = "not an attention/MLP weight, matrices: attn_mlp"
# CLIP's text projection: the official TSV/Iso code averages it (its task loop skips it).
TEXT_PROJECTION = "text_projection, vocabulary: false (the official code averages it)"


class SpectralMethod(MergeMethod):
    """What the five share: Δᵢ upcast, the matrices the method acts on go to
    `matrix_offset`, every other tensor to `other_offset`; the output is W₀ + offset.
    `fallback_reason` decides which, for the merge and for `rule_for` alike."""

    matrix_rule: ClassVar[str]  # what a matrix the method acts on gets

    @abstractmethod
    def matrix_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        """W − W₀ for a matrix the method acts on."""

    @abstractmethod
    def other_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        """W − W₀ for any other tensor (the method's stated rule)."""

    @classmethod
    def other_rule(cls, params: Mapping[str, Any]) -> str:
        """What `other_offset` computes, in words."""
        return "W₀ + α·mean(Δᵢ)"

    @classmethod
    def fallback_reasons(cls) -> tuple[str, ...]:
        return (NOT_2D, EMPTY, VOCABULARY_MATRIX, TEXT_PROJECTION)

    def fallback_reason(self, name: str, shape: Sequence[int], vocabulary: bool,
                        params: Mapping[str, Any]) -> str | None:
        """Why tensor `name` takes the fallback rule; None: the method decomposes it."""
        if len(shape) != 2 and not (3 <= len(shape) <= 5 and params.get("conv") == "matrix"):
            return NOT_2D
        if 0 in shape:  # an empty matrix has no spectrum
            return EMPTY
        if vocabulary and not params.get("vocabulary", False):
            return VOCABULARY_MATRIX
        if name.endswith(("text_projection", "text_projection.weight")) \
                and not params.get("vocabulary", False):
            return TEXT_PROJECTION
        return None

    def rule_for(self, name: str, shape: Sequence[int], vocabulary: bool,
                 params: Mapping[str, Any]) -> str | None:
        reason = self.fallback_reason(name, shape, vocabulary, params)
        if reason is None:
            return f"matrix: {self.matrix_rule}"
        return f"fallback ({reason}): {self.other_rule(params)}"

    @classmethod
    def rule_docs(cls) -> tuple[str, ...]:
        return (f"matrix: {cls.matrix_rule}",
                f"fallback ({'; '.join(cls.fallback_reasons())}): {cls.other_rule({})}")

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        deltas = task_matrices(inputs.base, inputs.models)
        base = inputs.base.to(deltas[0].dtype)
        if self.fallback_reason(inputs.name, base.shape, inputs.vocabulary,
                                inputs.params) is None:
            if base.dim() == 2:
                return base + self.matrix_offset(deltas, inputs)
            # a conv kernel under `conv: matrix`: one row per output channel
            rows = [d.reshape(base.shape[0], -1) for d in deltas]
            return base + self.matrix_offset(rows, inputs).reshape(base.shape)
        return base + self.other_offset(deltas, inputs)


class ScaledSpectralMethod(SpectralMethod):
    """TSV-M and Iso: W₀ + α·(merged task matrix); other tensors W₀ + α·mean(Δᵢ)."""

    @abstractmethod
    def task_matrix(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        """The merged task matrix, before α."""

    def matrix_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        return float(inputs.params["alpha"]) * self.task_matrix(deltas, inputs)

    def other_offset(self, deltas: list[torch.Tensor], inputs: TensorInputs) -> torch.Tensor:
        return float(inputs.params["alpha"]) * mean_of(deltas)


class SelectiveSpectralMethod(SpectralMethod):
    """CART and WUDI: act on the attention and MLP weights (`matrices: attn_mlp`, the
    official code) or on every 2-D tensor (`all_2d`)."""

    @classmethod
    def fallback_reasons(cls) -> tuple[str, ...]:
        return (*super().fallback_reasons(), NOT_ATTN_MLP)

    def fallback_reason(self, name: str, shape: Sequence[int], vocabulary: bool,
                        params: Mapping[str, Any]) -> str | None:
        reason = super().fallback_reason(name, shape, vocabulary, params)
        if reason is None and params.get("matrices", "attn_mlp") == "attn_mlp" \
                and not is_attn_mlp(name):
            return NOT_ATTN_MLP
        return reason
