"""`slerp`: spherical linear interpolation from the base (t = 0) to the other model (t = 1).

As mergekit 0.1.5: each tensor is flattened; the angle comes from the dot product of the
two unit vectors (norms ≤ 1e-8 count as 1); where |cos θ| > `DOT_THRESHOLD` the two are
nearly collinear and plain linear interpolation is used. Work is in float32 (float64 for
float64 inputs), in chunks of 2²⁰ entries, with the same reductions as mergekit (norms of
per-chunk norms, sums of per-chunk dot products), so results are bit-identical, given
mergekit's thread count: past 32,768 entries torch sums in one partial sum per thread, and
mergekit sums with all of its process's threads, so the engine does too
(`thread_count_reductions`). The result is stored in the inputs' dtype, as mergekit's is.

A tensor over 2²⁰ entries streams in slices that are those chunks (`slice_elements`):
`SlerpStats` takes each chunk's norms in a first pass and its share of the dot product in
a second, then each slice is interpolated on its own; the sums are the same, in the same
order, so the bits are the whole tensor's. Smaller tensors are merged whole, without the
passes.

Plan mapping: mergekit's slerp takes exactly two inputs, one of them `base_model`. Here
`requires_base` holds the base apart (`inputs.base` = v0) and `inputs.models` holds the
other (v1), whether or not the recipe also lists the base under `models:`.
Where mergekit refuses, two extensions (documented, not mergekit): more than one model
besides the base interpolates towards their uniform mean, and `t` defaults to 0.5 (mergekit
requires it) so that every method runs with its defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergekit_pcb.methods.base import (
    WEIGHT_RANGE,
    GlobalStats,
    MergeMethod,
    ParamSpec,
    TensorInputs,
)
from mergekit_pcb.methods.ops import uniform_mean

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
CHUNK = 1 << 20  # mergekit's _CHUNK_ELEMENTS: chunking changes the reductions' rounding

T = ParamSpec("t", 0.5, "interpolation factor: 0 is the base, 1 the other model (a list is a "
              "gradient over the layers)", bounds=WEIGHT_RANGE)


def _dtype(v0: torch.Tensor) -> torch.dtype:
    return torch.float64 if v0.dtype == torch.float64 else torch.float32


def _spans(n: int) -> list[tuple[int, int]]:
    return [(s, s + CHUNK) for s in range(0, n, CHUNK)]


def chunk_norm(chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One of mergekit's chunks' norms, as its kernel computes it (a row of a batch of one)."""
    return torch.linalg.vector_norm(chunk.reshape(1, -1).to(dtype), dim=1, keepdim=True)


def total_norm(chunk_norms: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """The vector's norm from its chunks' norms, stacked (chunks × 1 × 1; ≤ `eps` counts as
    1)."""
    norm = torch.linalg.vector_norm(chunk_norms, dim=0)
    return torch.where(norm > eps, norm, 1)


def chunk_dot(a: torch.Tensor, b: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """One chunk's share of the unit vectors' dot product (unit vectors before the product:
    the raw dot could overflow)."""
    return ((a.reshape(1, -1).to(dtype) / norm_a) * (b.reshape(1, -1).to(dtype) / norm_b)) \
        .sum(dim=1, keepdim=True)


def coefficients(t: float, chunk_dots: torch.Tensor, dtype: torch.dtype,
                 dot_threshold: float = DOT_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """The two vectors' factors (1×1) from the chunks' dot products, stacked (chunks × 1 ×
    1)."""
    # mergekit packs t as a float32 (float64) tensor: its rounding is part of the result.
    tt = torch.tensor([t], dtype=dtype, device=chunk_dots.device).reshape(-1, 1)
    dot = chunk_dots.sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def interpolate(coef_a: torch.Tensor, coef_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """coef_a·a + coef_b·b, entry by entry, in `a`'s dtype (as mergekit's `out[:, s:e]`)."""
    flat = (coef_a * a.reshape(1, -1).to(dtype) + coef_b * b.reshape(1, -1).to(dtype))
    return flat.to(a.dtype).reshape(a.shape)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor,
          dot_threshold: float = DOT_THRESHOLD, eps: float = NORM_EPS) -> torch.Tensor:
    """SLERP of two same-shape tensors, as a single flattened vector (mergekit's kernel,
    with a batch of one)."""
    dtype = _dtype(v0)
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    if a.numel() == 0:
        tt = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
        return ((1 - tt) * a.reshape(1, -1) + tt * b.reshape(1, -1)).reshape(v0.shape) \
            .to(v0.dtype)
    spans = _spans(a.numel())
    norm_a = total_norm(torch.stack([chunk_norm(a[s:e], dtype) for s, e in spans]), eps)
    norm_b = total_norm(torch.stack([chunk_norm(b[s:e], dtype) for s, e in spans]), eps)
    coef_a, coef_b = coefficients(t, torch.stack(
        [chunk_dot(a[s:e], b[s:e], norm_a, norm_b, dtype) for s, e in spans]), dtype,
        dot_threshold)
    out = torch.empty_like(a)
    for s, e in spans:
        out[s:e] = interpolate(coef_a, coef_b, a[s:e], b[s:e], dtype)
    return out.reshape(v0.shape)


class SlerpStats(GlobalStats):
    """Each sliced tensor's norms (pass 1) and unit vectors' dot product (pass 2), chunk by
    chunk: the engine's slices are mergekit's chunks (both 2²⁰ entries from the start), so
    the per-chunk sums and their sums are the whole tensor's, bit for bit.

    Each chunk's number is kept as a Python float (a float32 or float64 value, exactly),
    not as a 1×1 tensor: small tensors kept between the slices' buffers pin the allocator's
    heap (measured: a 128k-vocabulary embedding's passes grew the process by a slice per
    slice, 600 MiB)."""

    pass_names = ("slerp norms", "slerp angle")
    per_tensor = True

    def __init__(self) -> None:
        self.norms: dict[str, list[tuple[int, float, float]]] = {}
        self.dots: dict[str, list[tuple[int, float]]] = {}
        self.dtypes: dict[str, tuple[torch.dtype, torch.device]] = {}
        self.totals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.done: dict[str, torch.Tensor] = {}

    def _stacked(self, name: str, values: list[float]) -> torch.Tensor:
        dtype, device = self.dtypes[name]
        return torch.tensor(values, dtype=dtype, device=device).reshape(-1, 1, 1)

    def observe(self, pass_index: int, inputs: TensorInputs) -> None:
        assert inputs.base is not None and inputs.start is not None
        assert inputs.start % CHUNK == 0 and inputs.base.numel() <= CHUNK
        a, b = inputs.base, uniform_mean(inputs.models)
        dtype = _dtype(a)
        self.dtypes[inputs.name] = (dtype, a.device)
        if pass_index == 0:
            self.norms.setdefault(inputs.name, []).append(
                (inputs.start, chunk_norm(a, dtype).item(), chunk_norm(b, dtype).item()))
        else:
            norm_a, norm_b = self.totals[inputs.name]
            self.dots.setdefault(inputs.name, []).append(
                (inputs.start, chunk_dot(a, b, norm_a, norm_b, dtype).item()))

    def finish(self, pass_index: int) -> None:
        if pass_index == 0:
            for name, parts in self.norms.items():
                parts.sort(key=lambda p: p[0])
                self.totals[name] = (total_norm(self._stacked(name, [p[1] for p in parts])),
                                     total_norm(self._stacked(name, [p[2] for p in parts])))
            self.norms.clear()
        else:
            for name, parts in self.dots.items():
                parts.sort(key=lambda p: p[0])
                self.done[name] = self._stacked(name, [p[1] for p in parts])
            self.dots.clear()
            self.totals.clear()


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation between the base and one other model"
    params = (T,)
    pairwise = True
    thread_count_reductions = True  # the norms and the dot product
    slice_elements = CHUNK  # each slice one of mergekit's chunks: the same sums

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return True  # given each tensor's norms and angle (`SlerpStats`)

    def global_stats(self, num_models: int, total_numel: int, params: Mapping[str, Any],
                     model_params: Sequence[Mapping[str, Any]]) -> GlobalStats | None:
        return SlerpStats()

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        t = float(inputs.params["t"])
        if inputs.start is None:
            return slerp(t, inputs.base, uniform_mean(inputs.models))
        assert isinstance(inputs.stats, SlerpStats)
        dtype = _dtype(inputs.base)
        coef_a, coef_b = coefficients(t, inputs.stats.done[inputs.name], dtype)
        return interpolate(coef_a, coef_b, inputs.base, uniform_mean(inputs.models), dtype)
