"""Tensor operations shared by several methods: trimming, dropping, sign election."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import numpy as np
import torch

from mergekit_pcb.methods.base import TensorInputs
from mergekit_pcb.methods.compiled import FUSE_MIN, flat_array, fusable, fused_kernels
from mergekit_pcb.methods.selection import StreamingSelect, kth_smallest
from mergekit_pcb.methods.side_by_side import start as start_side_by_side
from mergekit_pcb.methods.sort_order import descending_top, descending_top_bits


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the max(1, ⌊density·numel⌋) entries of largest magnitude (TIES trim).

    Bit-compatible with mergekit: the threshold is an exact order statistic (histogram
    selection, no full sort), and only when equal magnitudes straddle it does the choice
    among them follow mergekit's own rule, `argsort(descending=True)[:k]` (torch's sort
    order: deterministic for a given input, not index order), found by `sort_order` without
    a full sort. float64 magnitudes are ranked in float64.
    """
    return magnitude_trim_all([delta], [density])[0]


def magnitude_trim_all(deltas: Sequence[torch.Tensor], densities: Sequence[float]
                       ) -> list[torch.Tensor]:
    """`magnitude_trim` of each delta. The tie-breaks run side by side, each started as soon
    as its model needs it (each runs on one core), and equal magnitudes at the cut are
    common in large tensors (two of three models' 4M-entry embeddings in the 30M bench;
    most bf16 tensors)."""
    out: list[torch.Tensor | None] = []
    tied: list[tuple[int, Callable[[], torch.Tensor]]] = []
    for delta, density in zip(deltas, densities, strict=True):
        if density >= 1.0:
            out.append(delta)
            continue
        if density <= 0.0 or delta.numel() == 0:
            out.append(torch.zeros_like(delta))
            continue
        n = delta.numel()
        k = min(n, max(1, int(density * n)))
        trimmed = _fused_trim(delta, k)
        if trimmed is not None:
            out.append(trimmed)
            continue
        magnitude = delta.abs().reshape(-1)
        if magnitude.dtype in (torch.float16, torch.bfloat16):
            # mergekit ranks these upcast to float32, which keeps their order; so do the
            # bits of a magnitude (no sign bit): one exact 2¹⁵-bin histogram finds the cut
            magnitude = magnitude.contiguous().view(torch.int16)
            cum = torch.bincount(magnitude, minlength=1 << 15).cumsum(0)
            threshold: torch.Tensor | float = int(
                torch.searchsorted(cum, torch.tensor(n - k, device=cum.device), right=True))
        elif magnitude.dtype == torch.float32:
            threshold = kth_smallest(magnitude, n - k, nonnegative=True)
        else:
            threshold = torch.kthvalue(magnitude, n - k + 1).values
        keep = magnitude >= threshold
        # (count_nonzero: a bool tensor's sum() is 40× slower on 11.5M entries)
        if int(torch.count_nonzero(keep)) != k:  # ties straddle the cut: mergekit's sort decides
            top = start_side_by_side(lambda m=magnitude, d=delta.dtype, k=k: (
                descending_top_bits(m, d, k) if m.dtype == torch.int16
                else descending_top(m, k)))
            tied.append((len(out), top))
            out.append(None)
            continue
        out.append(delta * _as_mask(keep, delta))
    for i, top in tied:
        keep = torch.zeros(deltas[i].numel(), dtype=torch.bool, device=deltas[i].device)
        keep[top().to(keep.device)] = True
        delta = deltas[i]
        out[i] = delta * _as_mask(keep, delta)
    return [t for t in out if t is not None]


def _as_mask(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`keep` (bool) as 0/1 in `like`'s dtype and shape; through bytes, which torch converts
    to bf16 14× faster than bools (the same values)."""
    return keep.reshape(like.shape).view(torch.uint8).to(like.dtype)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator,
                rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale survivors by 1/density.

    The mask is drawn on the CPU from `generator`, so the same seed gives the same mask on
    any machine and device.
    """
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    out = delta * keep.to(device=delta.device, dtype=delta.dtype)
    return out / density if rescale and density > 0 else out


def combine_weighted(inputs: TensorInputs, deltas: Sequence[torch.Tensor], *,
                     sign_consensus: bool) -> torch.Tensor:
    """`combine_task_vectors` with the per-model `weight` and the `lambda` and `normalize`
    parameters of `inputs`: the last step of every sparsify-then-combine method."""
    assert inputs.base is not None
    return combine_task_vectors(
        inputs.base, deltas, [p["weight"] for p in inputs.model_params],
        lambda_=inputs.params["lambda"], normalize=inputs.params["normalize"],
        sign_consensus=sign_consensus)


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    sign_consensus: bool = False,
) -> torch.Tensor:
    """θ₀ + λ · mix(wᵢτᵢ), mergekit's generalized task arithmetic.

    With `sign_consensus`, each entry elects γ = sign(Σᵢ wᵢτᵢ) (zero elects +) and only the
    weighted deltas agreeing with γ are summed; `normalize` divides by the sum of the
    weights that contributed (a zero divisor becomes 1).

    Every step is elementwise, so on the CPU a large tensor is combined in cache-sized
    chunks: the dozen passes over the stacked deltas then run from cache instead of memory
    (3.6× faster on 10M entries × 3 models, measured), with the same bits.
    """
    fused = _fused_combine(base, deltas, weights, lambda_, normalize, sign_consensus)
    if fused is not None:
        return fused
    n = base.numel()
    chunk = COMBINE_CHUNK * max(1, torch.get_num_threads())
    if base.device.type != "cpu" or n <= chunk:
        return _combine(base, deltas, weights, lambda_, normalize, sign_consensus)
    flat_base = base.reshape(-1)
    flat = [d.reshape(-1) for d in deltas]
    out: torch.Tensor | None = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = _combine(flat_base[start:stop], [d[start:stop] for d in flat], weights,
                        lambda_, normalize, sign_consensus)
        if out is None:
            out = torch.empty(n, dtype=part.dtype)
        out[start:stop] = part
    assert out is not None
    return out.reshape(base.shape)


# Entries per thread in one chunk of `combine_task_vectors`: the stacked deltas and the
# temporaries of a 64K chunk (a few MB for 3 models) stay in a core's cache.
COMBINE_CHUNK = 1 << 16


def _combine(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float],
             lambda_: float, normalize: bool, sign_consensus: bool) -> torch.Tensor:
    weighted = torch.stack(list(deltas), dim=0)
    w = torch.tensor(list(weights), dtype=weighted.dtype, device=weighted.device)
    w = w.reshape((-1,) + (1,) * (weighted.dim() - 1))
    weighted.mul_(w)  # in place: the stack is ours (the same values as mergekit's product)
    if sign_consensus:
        # (bool tensors viewed as bytes: torch converts those several times faster)
        majority = (weighted.sum(dim=0) >= 0).view(torch.uint8).to(weighted.dtype).mul_(2).sub_(1)
        agree = (weighted.sign() == majority).view(torch.uint8).to(weighted.dtype)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = weighted.mul_(agree).sum(dim=0)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


# ---------------------------------------------------------------------------------------
# The fused kernels (`fused_kernel`, numba): the same bits as the torch code above, in one
# pass over the task vectors instead of a dozen. Used for float32 on the CPU once loaded.
# ---------------------------------------------------------------------------------------

# torch sums 16 or more rows in a cascade the kernel does not reproduce.
FUSE_MAX_MODELS = 15


def _fused_combine(base: torch.Tensor, deltas: Sequence[torch.Tensor],
                   weights: Sequence[float], lambda_: float, normalize: bool,
                   sign_consensus: bool) -> torch.Tensor | None:
    """`combine_task_vectors` by the fused kernel, or None where it does not apply.

    Only on one torch thread: with more, torch splits a sum's columns among its threads,
    and the columns it adds in another order (`fused_kernel._tail_sum`) move with the
    split."""
    if not 0 < len(deltas) <= FUSE_MAX_MODELS or torch.get_num_threads() != 1 \
            or not fusable([base, *deltas]):
        return None
    kernel = FUSED.ready()
    if kernel is None:
        FUSED.count(base.numel() * len(deltas))
        return None
    return _run_combine(kernel, base, deltas, weights, lambda_, normalize, sign_consensus)


def _run_combine(kernel: ModuleType, base: torch.Tensor, deltas: Sequence[torch.Tensor],
                 weights: Sequence[float], lambda_: float, normalize: bool,
                 sign_consensus: bool) -> torch.Tensor:
    n = base.numel()
    w = torch.tensor(list(weights), dtype=torch.float32)
    divisor = w.reshape((-1,) + (1,) * base.dim()).sum(dim=0).reshape(-1)
    divisor[divisor.abs() < 1e-8] = 1  # as `_combine` (without a consensus)
    out = np.empty(n, dtype=np.float32)
    kernel.weighted_combine(tuple(flat_array(d) for d in deltas), w.numpy(), flat_array(base),
                            sign_consensus,
                            normalize, np.float32(divisor.item()), lambda_ != 1,
                            np.float32(lambda_), tail_start(n), out)
    return torch.from_numpy(out).reshape(base.shape)


@functools.cache
def tail_group() -> int | None:
    """How many columns torch's sum over dim 0 takes per group (4 × the vector width): the
    columns past the last whole group are summed in another order (`fused_kernel._tail_sum`).
    Read off a probe whose columns sum to 0 in row order and to 2⁻²³ in the tail's order;
    None when the pattern is not one the kernels reproduce."""
    n = 4096 + 255  # × 5 rows: below torch's grain, so summed on this thread alone
    rows = torch.zeros(5, n)
    rows[0], rows[1], rows[2], rows[4] = 1.0, 2.0**-24, 2.0**-24, -1.0
    tail = int(torch.count_nonzero(rows.sum(dim=0)))
    group = tail + 1  # 255 mod g = g − 1 for a power of two g ≤ 256
    return group if group & (group - 1) == 0 and tail < 256 else None


def tail_start(n: int) -> int:
    """Where the columns summed in the tail's order start, in a sum of n columns."""
    group = tail_group()
    assert group is not None
    return n - n % group


def _fused_trim(delta: torch.Tensor, k: int, kernel: ModuleType | None = None
                ) -> torch.Tensor | None:
    """The TIES trim of a float32 delta by the fused kernel, or None where it does not
    apply or equal magnitudes straddle the cut (the caller's tie-break decides those)."""
    if not fusable([delta]):
        return None
    kernel = kernel or FUSED.ready()
    if kernel is None:
        FUSED.count(delta.numel())
        return None
    flat = flat_array(delta)
    bits = kernel.magnitude_rank_bits(flat, flat.size - k)
    out = np.empty_like(flat)
    if kernel.keep_from(flat, np.array([bits], np.int32).view(np.float32)[0], out) != k:
        return None
    return torch.from_numpy(out).reshape(delta.shape)


def _fused_matches_torch(kernel: ModuleType) -> bool:
    """The kernels against the torch code on probes: zeros, equal magnitudes, a wide range of
    exponents (where a different summation order would show), negative weights."""
    group = tail_group()
    if group is None:
        return False
    # The torch side runs on the loader's thread, which may have several torch threads; at
    # fewer than 32768 entries (torch's grain) it sums on this thread alone, as the kernel
    # stands in for.
    g = torch.Generator().manual_seed(0)
    n = 3000
    base = torch.randn(n, generator=g)
    deltas = [torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))
              for _ in range(9)]
    for d in deltas:
        d[d.abs() < 0.3] = 0
    weight_sets = ([1.0] * 9, [0.7, -1.3, 2.0, 0.0, 1e-3, 1.0, -0.5, 0.25, 3.0])
    for m, size in ((2, n), (5, n - 9), (9, n - 31), (4, 2 * group)):
        for weights in weight_sets:
            for lambda_, normalize, consensus in ((1.0, True, True), (0.8, False, True),
                                                  (1.0, False, False), (1.5, True, False)):
                args = ([d[:size] for d in deltas[:m]], weights[:m], lambda_, normalize,
                        consensus)
                fused = _run_combine(kernel, base[:size], *args)
                expected = _combine(base[:size], *args)
                if not torch.equal(fused.view(torch.int32), expected.view(torch.int32)):
                    return False
    n = 3 * FUSE_MIN + 17
    wide = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))
    bumpy = torch.randint(-50, 50, (n,), generator=g).float() / 8  # ties at every cut
    for d in (wide, bumpy):
        for k in (1, n // 3, n - 1):
            threshold = kth_smallest(d.abs(), n - k, nonnegative=True)
            expected = d * (d.abs() >= threshold).float()
            fused = _fused_trim(d, k, kernel)
            counted = int(torch.count_nonzero(d.abs() >= threshold))
            if (fused is None) != (counted != k):
                return False
            if fused is not None and not torch.equal(fused.view(torch.int32),
                                                     expected.view(torch.int32)):
                return False
    return True


FUSED = fused_kernels("fused-kernels", _fused_matches_torch)


# ---------------------------------------------------------------------------------------
# mergekit 0.1.5 sparsifiers and helpers for the methods ported from it. Each mirrors the
# operation order of mergekit's `sparsify.py` so that results match it bit for bit.
# ---------------------------------------------------------------------------------------

L1_RESCALE_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` tolerance


def l1_rescale(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """`masked` scaled so that its L1 norm equals `delta`'s (mergekit's `rescale`).

    Either norm below 1e-7 leaves `masked` as it is, as mergekit does.
    """
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < L1_RESCALE_EPS or after < L1_RESCALE_EPS:
        return masked
    return masked * (before / after)


def ranking_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened as mergekit ranks it: upcast to float32 on the CPU (float64 too)."""
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def magnitude_outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: keep ⌊density·n⌋ entries after dropping the ⌊gamma·n⌋ largest.

    The kept entries are ranks [n_bot, n_bot + target) of |delta| in ascending order, with
    n_bot = max(0, n − target − ⌊gamma·n⌋) (so the outlier cut shrinks when the two do not
    fit). The window's ends are exact order statistics; only when equal magnitudes straddle
    an end does the choice fall back to mergekit's own `torch.sort` order.
    """
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if target == 0:
        return keep.reshape(delta.shape)
    w = ranking_magnitudes(delta)
    low = torch.kthvalue(w, n_bot + 1).values
    high = torch.kthvalue(w, n_bot + target).values
    keep = (w >= low) & (w <= high)
    if int(torch.count_nonzero(keep)) != target:  # ties at an end of the window
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        keep[torch.sort(w, descending=False).indices[n_bot:n_bot + target]] = True
    return keep.reshape(delta.shape)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float,
                       rescale: bool = False) -> torch.Tensor:
    """mergekit's `magnitude_outliers` sparsifier (density ≥ 1 keeps everything, gamma too)."""
    if density >= 1:
        return delta
    masked = delta * magnitude_outliers_mask(delta, density, gamma).to(delta.dtype)
    return l1_rescale(delta, masked) if rescale else masked


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities: density − ε + 2ε·(rank − 1)/(m − 1) along dim 1.

    As mergekit: a 1-D tensor is one row; ranks of |delta| run along dim 1 (the input
    features of a 2-D weight), ties broken by `argsort` order; computed in float32 on the
    CPU (bfloat16 stays bfloat16).
    """
    work = delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 \
        else torch.float32
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_magprune(delta: torch.Tensor, density: float, epsilon: float,
                   generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """mergekit's `della_magprune`, with the Bernoulli draws taken from `generator`.

    Each entry survives with its `della_probabilities` probability (one float32 uniform per
    entry, drawn on the CPU, so the mask does not depend on the device); survivors are then
    L1-rescaled when `rescale`, as mergekit does (not by 1/p as in the DELLA paper).
    """
    if density >= 1:
        return delta
    probs = della_probabilities(delta, density, epsilon)
    draws = torch.rand(probs.shape, generator=generator, dtype=torch.float32)
    mask = (draws.to(probs.device) < probs).to(probs.dtype)
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    work = rows.to(probs.dtype)
    masked = work * mask
    out = l1_rescale(work, masked) if rescale else masked
    return out.to(delta.dtype).reshape(delta.shape)


def della_magprune_in_rows(base: torch.Tensor, model: torch.Tensor, density: float,
                           epsilon: float, generator: torch.Generator,
                           rescale: bool = True) -> torch.Tensor:
    """`della_magprune(model - base, ...)` of a large tensor (2-D or more), built a block of
    rows (along dim 0) at a time: each row's ranks are its own and the draws come in the
    whole tensor's order, so only the result is a whole tensor's worth (with one more for
    the L1 norm, a whole-tensor sum that must be torch's own); the same bits."""
    if density >= 1:
        return model - base
    shape = base.shape
    row = math.prod(shape[1:])
    rows = max(1, SLICE_ELEMENTS // max(1, row))
    out: torch.Tensor | None = None
    for r in range(0, shape[0], rows):
        delta = model[r:r + rows] - base[r:r + rows]
        probs = della_probabilities(delta, density, epsilon)
        draws = torch.rand(probs.shape, generator=generator, dtype=torch.float32)
        mask = (draws.to(probs.device) < probs).to(probs.dtype)
        part = delta.to(probs.dtype).mul_(mask)
        if out is None:
            out = torch.empty(shape, dtype=probs.dtype)
        out[r:r + rows] = part
        del delta, probs, draws, mask, part
    assert out is not None
    if rescale:
        before = torch.sub(model, base).to(out.dtype).abs_().sum()
        after = out.abs().sum()
        if not (before < L1_RESCALE_EPS or after < L1_RESCALE_EPS):
            out.mul_(before / after)  # `l1_rescale`'s product, in place
    return out.to(base.dtype)


def uniform_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The one "other" operand of a two-model method given several models: their uniform
    mean (a single model is returned as it is, so mergekit's own case stays exact)."""
    if len(tensors) == 1:
        return tensors[0]
    return torch.stack(list(tensors), dim=0).mean(dim=0)


# ---------------------------------------------------------------------------------------
# Large tensors in slices. A per-tensor trim (TIES, Breadcrumbs) ranks a whole task vector,
# and DARE draws its mask from one generator per tensor, so the engine cannot stream these
# methods in slices of its own; but all they need of the whole tensor is an order
# statistic (found by streaming histograms, `StreamingSelect`) or the generator's next
# draws. So a large tensor is trimmed and combined here one slice at a time, from the
# inputs the engine read: the scratch is a slice's, not several copies of the tensor, and
# the bits are the whole tensor's (see `slice_bounds`).
# ---------------------------------------------------------------------------------------

# Entries per slice per torch thread (the engine streams elementwise methods in slices of
# 1M entries too).
SLICE_ELEMENTS = 1 << 20


def slice_bounds(n: int) -> list[tuple[int, int]] | None:
    """[start, stop) slices of a flat tensor of n entries, or None when it is small enough
    to merge whole.

    Every slice but the last is a multiple of `combine_task_vectors`'s chunk at this thread
    count (and so of the column group its sums take): the chunks, and the columns past the
    last whole group, fall where they fall in the whole tensor, and so do the bits."""
    chunk = COMBINE_CHUNK * max(1, torch.get_num_threads())
    size = chunk * max(1, SLICE_ELEMENTS // COMBINE_CHUNK)
    if n <= size:
        return None
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def sliceable(inputs: TensorInputs) -> list[tuple[int, int]] | None:
    """The slices to merge `inputs` in (`slice_bounds`), or None: a small tensor, another
    device than the CPU, or a dtype the streamed selection does not rank (float64)."""
    base = inputs.base
    if base is None or base.device.type != "cpu" or base.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        return None
    return slice_bounds(base.numel())


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _slice_deltas(base: torch.Tensor, model: torch.Tensor, bounds: list[tuple[int, int]]
                  ) -> Iterator[torch.Tensor]:
    """The task vector `model - base`, slice by slice (flat)."""
    flat_base, flat_model = _flat(base), _flat(model)
    for a, b in bounds:
        yield flat_model[a:b] - flat_base[a:b]


class SliceMask:
    """Which entries of one task vector survive, decided over the whole tensor and applied
    slice by slice: every entry (`everything`), the order-statistic window
    `low <= |τ| <= high` (on the int16 bits of a float16/bfloat16 magnitude when `bits`), or
    an explicit flat `keep` mask where equal magnitudes straddled an end of the window."""

    def __init__(self, low: float | int | None = None, high: float | int | None = None,
                 bits: bool = False, keep: torch.Tensor | None = None) -> None:
        self.low, self.high, self.bits, self.keep = low, high, bits, keep

    @property
    def everything(self) -> bool:
        return self.low is None and self.high is None and self.keep is None

    def apply(self, delta: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """`delta` (the slice [a, b) of the task vector) with the trimmed entries zeroed,
        as `delta * mask` (the whole tensor's product, so the same signed zeros)."""
        if self.everything:
            return delta
        if self.keep is not None:
            return delta * _as_mask(self.keep[a:b], delta)
        magnitude = delta.abs()
        if self.bits:
            magnitude = magnitude.view(torch.int16)
        elif magnitude.dtype != torch.float32:
            magnitude = magnitude.float()
        keep = magnitude >= self.low if self.low is not None else None
        if self.high is not None:
            below = magnitude <= self.high
            keep = below if keep is None else keep.logical_and_(below)
        assert keep is not None
        return delta * _as_mask(keep, delta)


def _streamed_select(base: torch.Tensor, model: torch.Tensor, bounds: list[tuple[int, int]],
                     ks: list[int]) -> StreamingSelect:
    """The exact ks-th smallest |model - base| (float32, as `ranking_magnitudes` ranks
    them), in two streamed passes over the slices."""
    select = StreamingSelect(ks, nonnegative=True)
    for delta in _slice_deltas(base, model, bounds):
        select.observe_high(delta.abs_())
    select.finish_high()
    for delta in _slice_deltas(base, model, bounds):
        select.observe_low(delta.abs_())
    select.finish_low()
    return select


def _whole_magnitude(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """|model - base| of the whole tensor, flat (one tensor's worth, for a tie-break)."""
    return torch.sub(_flat(model), _flat(base)).abs_()


def _keep_positions(n: int, positions: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[positions] = True
    return keep


def trim_mask(base: torch.Tensor, model: torch.Tensor, density: float,
              bounds: list[tuple[int, int]]) -> SliceMask:
    """`magnitude_trim`'s choice for the task vector `model - base`, found with one slice's
    scratch: the same order statistic (a 2¹⁵-bin histogram of a float16/bfloat16 magnitude's
    bits, an exact streamed selection for float32), and where equal magnitudes straddle the
    cut, the same tie-break (`descending_top`, on the whole magnitude of this one model)."""
    n = base.numel()
    if density >= 1.0:
        return SliceMask()
    k = min(n, max(1, int(density * n)))
    if base.dtype in (torch.float16, torch.bfloat16):
        counts = torch.zeros(1 << 15, dtype=torch.int64)
        for delta in _slice_deltas(base, model, bounds):
            counts += torch.bincount(delta.abs_().view(torch.int16), minlength=1 << 15)
        cum = counts.cumsum(0)
        threshold = int(torch.searchsorted(cum, torch.tensor(n - k), right=True))
        if n - (int(cum[threshold - 1]) if threshold > 0 else 0) == k:
            return SliceMask(low=threshold, bits=True)
        # the magnitude is partitioned in place (made again if torch's sort must run)
        def bits() -> torch.Tensor:
            return _whole_magnitude(base, model).view(torch.int16)
        return SliceMask(keep=_keep_positions(n, descending_top_bits(bits(), base.dtype, k,
                                                                     again=bits)))
    select = _streamed_select(base, model, bounds, [n - k])
    if n - select.counts_below[0] == k:
        return SliceMask(low=select.values[0])
    return SliceMask(keep=_keep_positions(n, descending_top(
        _whole_magnitude(base, model), k, again=lambda: _whole_magnitude(base, model))))


def outliers_mask(base: torch.Tensor, model: torch.Tensor, density: float, gamma: float,
                  bounds: list[tuple[int, int]]) -> SliceMask:
    """`magnitude_outliers_mask`'s window for `model - base` with one slice's scratch: its
    two ends as streamed order statistics, and where equal magnitudes straddle an end, the
    same `torch.sort` order (on the whole magnitude of this one model)."""
    n = base.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    if target == 0:
        return SliceMask(keep=torch.zeros(n, dtype=torch.bool))
    select = _streamed_select(base, model, bounds, [n_bot, n_bot + target - 1])
    kept = select.counts_below[1] + select.counts_equal[1] - select.counts_below[0]
    if kept == target:
        return SliceMask(low=select.values[0], high=select.values[1])
    w = ranking_magnitudes(_whole_magnitude(base, model))
    return SliceMask(keep=_keep_positions(
        n, torch.sort(w, descending=False).indices[n_bot:n_bot + target]))


def combine_in_slices(inputs: TensorInputs, bounds: list[tuple[int, int]],
                      trim: Callable[[int, torch.Tensor, int, int], torch.Tensor], *,
                      sign_consensus: bool) -> torch.Tensor:
    """`combine_weighted` of the task vectors `trim(i, τᵢ[a:b], a, b)`, one slice [a, b)
    at a time, into one output tensor; `trim` is called for each model in order within a
    slice and slices in order (a generator it draws from advances as over the whole)."""
    base = inputs.base
    assert base is not None
    flat_base = _flat(base)
    flat_models = [_flat(m) for m in inputs.models]
    weights = [p["weight"] for p in inputs.model_params]
    out: torch.Tensor | None = None
    for a, b in bounds:
        deltas = [trim(i, m[a:b] - flat_base[a:b], a, b) for i, m in enumerate(flat_models)]
        part = combine_task_vectors(flat_base[a:b], deltas, weights,
                                    lambda_=inputs.params["lambda"],
                                    normalize=inputs.params["normalize"],
                                    sign_consensus=sign_consensus)
        if out is None:
            out = torch.empty(base.numel(), dtype=part.dtype)
        out[a:b] = part
        del deltas, part
    assert out is not None
    return out.reshape(base.shape)
