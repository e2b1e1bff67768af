"""`pcb`: Parameter Competition Balancing (Du et al., NeurIPS 2024), as in methods.md.

Per task row i over the scope (each tensor, or the whole model — the paper's default):
clip |τᵢ| between two order statistics, intra-balance Iᵢ = exp(n·minmax(Aᵢ)²),
inter-balance Eᵢ (consensus / normalized / pairwise), score Bᵢ = Iᵢ⊙Eᵢ, drop below the
order statistic tᵢ of the scores, soft weights Sᵢ, weighted mean of the clipped task vectors.

The math is split into `pcb_scores` and `pcb_combine`, pure functions of tensors plus the
row statistics. `scope: tensor` finds the statistics with `kthvalue` per tensor;
`scope: global` finds the same statistics over the whole model in streaming passes
(`PcbGlobalStats`), so the result equals the dense computation in a few tensors' memory.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import numpy as np
import torch

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods.base import (
    DENSITY,
    LAMBDA,
    SCOPE,
    WEIGHT,
    GlobalStats,
    MergeMethod,
    ParamSpec,
    PartStore,
    Range,
    TensorInputs,
)
from mergekit_pcb.methods.compiled import FUSE_MIN, flat_array, fusable, fused_kernels
from mergekit_pcb.methods.ops import FUSE_MAX_MODELS, sliceable, tail_group, tail_start
from mergekit_pcb.methods.selection import StreamingSelect, kth_smallest
from mergekit_pcb.threads import torch_threads

# One score in this many is sampled for the candidates' floors, in runs of SAMPLE_RUN.
SAMPLE_STRIDE = 32
SAMPLE_RUN = 64
INTER = ("consensus", "normalized", "pairwise")
# Scores reach n·exp(n) (pairwise inter-balancing) and their range twice that; beyond about
# 83 tasks that overflows float32 and the soft weights turn NaN.
MAX_MODELS = 80


def clip_indices(d: int, clip: float) -> tuple[int, int]:
    """0-based ranks of the clip bounds among d sorted |τ| (the authors' code's indexing)."""
    return int(d * clip), int(d * (1 - clip) - 1)


def drop_index(d: int, density: float) -> int:
    """0-based rank of the drop threshold among d sorted scores; density = fraction kept."""
    return min(int(d * (1 - density)), d - 1)


def minmax(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(x − low)/(high − low), and 0 where the range is empty (an all-zero task vector)."""
    span = high - low
    if not span > 0:
        return torch.zeros_like(x)
    return (x - low) / span


@dataclass(frozen=True)
class RowStats:
    """One task row's statistics over the scope."""

    clip_low: float
    clip_high: float
    abs_min: float
    abs_max: float
    drop_threshold: float = 0.0
    score_max: float = 0.0


def _balanced(tau: Sequence[torch.Tensor], stats: Sequence[RowStats]) -> list[torch.Tensor]:
    """ĥⱼ = sign(τⱼ)·minmax(|τⱼ|), for the normalized and pairwise inter-balancing."""
    return [t.sign() * minmax(t.abs(), s.abs_min, s.abs_max) for t, s in zip(tau, stats,
                                                                             strict=True)]


def pcb_scores(tau: Sequence[torch.Tensor], stats: Sequence[RowStats],
               inter: str) -> list[torch.Tensor]:
    """Bᵢ = exp(n·minmax(Aᵢ)²) ⊙ Eᵢ for each task, given each row's clip bounds.

    With consensus inter-balancing, by the fused kernels where they apply (float32 on the
    CPU, one torch thread, fewer than 16 tasks): all but `exp` and `tanh`, which stay
    torch's, in fewer passes; the same bits."""
    kernel = _kernel_for(tau) if inter == "consensus" and len(tau) <= FUSE_MAX_MODELS \
        and torch.get_num_threads() == 1 else None
    if kernel is not None:
        return _fused_scores(kernel, tau, stats)
    return _scores(tau, stats, inter)


def _scores(tau: Sequence[torch.Tensor], stats: Sequence[RowStats],
            inter: str) -> list[torch.Tensor]:
    n = len(tau)
    intra = []
    for t, s in zip(tau, stats, strict=True):
        a = t.abs().clamp(s.clip_low, s.clip_high)
        intra.append(torch.exp(n * minmax(a, s.clip_low, s.clip_high) ** 2))
    if inter == "consensus":
        total = torch.stack(list(tau)).sum(dim=0)
        inter_terms = [torch.tanh(t * total) for t in tau]
    elif inter == "normalized":
        h_total = torch.stack(_balanced(tau, stats)).sum(dim=0)
        inter_terms = [torch.tanh(t * h_total) for t in tau]
    elif inter == "pairwise":
        h = _balanced(tau, stats)
        inter_terms = [torch.stack([torch.tanh(hi * hj) for hj in h]).sum(dim=0) for hi in h]
    else:
        raise ValueError(f"unknown inter-balancing {inter!r}")
    return [i * e for i, e in zip(intra, inter_terms, strict=True)]


def pcb_combine(base: torch.Tensor, tau: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
                stats: Sequence[RowStats], weights: Sequence[float],
                lambda_: float) -> torch.Tensor:
    """θ₀ + λ · Σᵢ wᵢSᵢτ̃ᵢ / max(ΣᵢSᵢ, 1e-12), Sᵢ = minmax(max(Bᵢ, tᵢ)) over [tᵢ, max Bᵢ].

    By the fused kernel where it applies (float32 on the CPU, once loaded): the same bits."""
    kernel = _kernel_for([base, *tau, *scores])
    if kernel is not None and any(s.score_max - s.drop_threshold > 0 for s in stats):
        return _fused_combine(kernel, base, tau, scores, stats, weights, lambda_)
    return _combine(base, tau, scores, stats, weights, lambda_)  # (no task weighs: torch)


def _combine(base: torch.Tensor, tau: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
             stats: Sequence[RowStats], weights: Sequence[float],
             lambda_: float) -> torch.Tensor:
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base)
    for t, b, s, w in zip(tau, scores, stats, weights, strict=True):
        soft = minmax(b.clamp(min=s.drop_threshold), s.drop_threshold, s.score_max)
        clipped = t.sign() * t.abs().clamp(s.clip_low, s.clip_high)
        numerator += w * soft * clipped
        denominator += soft
    return base + lambda_ * numerator / denominator.clamp(min=1e-12)


# The fused scores and combine (`fused_kernel`, numba): loaded as `ops.FUSED` is, and
# checked against `_scores` and `_combine` on probes.
def _kernel_for(tensors: Sequence[torch.Tensor]) -> ModuleType | None:
    if not fusable(tensors):
        return None
    kernel = KERNELS.ready()
    if kernel is None:
        KERNELS.count(tensors[0].numel() * (len(tensors) - 1))
    return kernel


def _fused_combine(kernel: ModuleType, base: torch.Tensor, tau: Sequence[torch.Tensor],
                   scores: Sequence[torch.Tensor], stats: Sequence[RowStats],
                   weights: Sequence[float], lambda_: float) -> torch.Tensor:
    rows, kept = [], []
    for i, (s, w) in enumerate(zip(stats, weights, strict=True)):
        span = s.score_max - s.drop_threshold  # as `minmax`: in double, then float32
        if span > 0:  # an empty span gives Sᵢ = 0: nothing added to either sum
            rows.append((s.drop_threshold, span, s.clip_low, s.clip_high, w))
            kept.append(i)
    out = np.empty(base.numel(), dtype=np.float32)
    kernel.pcb_combine(flat_array(base), tuple(flat_array(tau[i]) for i in kept),
                       tuple(flat_array(scores[i]) for i in kept),
                       np.array(rows, dtype=np.float32).reshape(-1, 5), np.float32(lambda_),
                       out)
    return torch.from_numpy(out).reshape(base.shape)


def _fused_scores(kernel: ModuleType, tau: Sequence[torch.Tensor],
                  stats: Sequence[RowStats]) -> list[torch.Tensor]:
    """`_scores` with consensus: Σⱼτⱼ in torch's summation order, the products and the
    intra exponents by the kernels, `exp` and `tanh` by torch in place."""
    shape = tau[0].shape
    flat = tuple(flat_array(t) for t in tau)
    total_t = _task_sum(kernel, flat)
    scores = []
    for t, s in zip(flat, stats, strict=True):
        intra = _intra(kernel, t, s, len(tau))
        inter = torch.mul(torch.from_numpy(t), total_t).tanh_()
        scores.append(intra.mul_(inter).reshape(shape))
    return scores


def _task_sum(kernel: ModuleType, flat: Sequence[np.ndarray]) -> torch.Tensor:
    """Σⱼτⱼ in torch's summation order (`torch.stack(τ).sum(0)` on one thread)."""
    size = flat[0].size
    total = np.empty(size, dtype=np.float32)
    kernel.task_sum(tuple(flat), tail_start(size), total)
    return torch.from_numpy(total)


def _intra(kernel: ModuleType, t: np.ndarray, s: RowStats, n: int) -> torch.Tensor:
    """Iᵢ = exp(n·minmax(Aᵢ)²), flat: the exponent by the kernel, `exp` torch's."""
    span = s.clip_high - s.clip_low  # as `minmax`: in double, then float32
    if not span > 0:  # minmax is 0 everywhere: exp(0) = 1
        return torch.ones(t.size)
    exponent = np.empty(t.size, dtype=np.float32)
    kernel.intra_exponent(t, np.float32(s.clip_low), np.float32(s.clip_high),
                          np.float32(span), np.float32(n), exponent)
    return torch.from_numpy(exponent).exp_()


def _kernel_matches_torch(kernel: ModuleType) -> bool:
    """The fused combine against `_combine` on probes: scores below, at and above each
    threshold, zero and clipped entries, an empty span, negative weights."""
    g = torch.Generator().manual_seed(0)
    n = 2 * FUSE_MIN + 7
    base = torch.randn(n, generator=g)
    tau = [torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
           for _ in range(4)]
    tau[0][::5] = 0.0
    tau[1][::7] = -0.0
    scores = [torch.rand(n, generator=g) * 3 for _ in range(4)]
    stats = [RowStats(0.05, 2.0, 0.0, 9.0, 1.0, 2.9), RowStats(0.0, 0.5, 0.0, 9.0, 0.3, 3.0),
             RowStats(0.1, 1.0, 0.0, 9.0, 2.5, 2.5), RowStats(0.2, 4.0, 0.0, 9.0, 0.0, 2.99)]
    for weights, lambda_ in (([1.0] * 4, 1.0), ([0.5, -1.0, 2.0, 1.3], 0.7)):
        fused = _fused_combine(kernel, base, tau, scores, stats, weights, lambda_)
        expected = _combine(base, tau, scores, stats, weights, lambda_)
        if not torch.equal(fused.view(torch.int32), expected.view(torch.int32)):
            return False
    # the scores' sum runs on this thread alone below torch's grain (32768 entries)
    if tail_group() is None:
        return False
    if not _candidates_match_torch(kernel, tau, stats):
        return False
    for m in (2, 5, 9):
        size = 3000 - m
        parts = [(tau[i % 4][:size] * (1 + i)).contiguous() for i in range(m)]
        rows = [stats[i % 4] for i in range(m)]
        fused_scores = _fused_scores(kernel, parts, rows)
        for a, b in zip(fused_scores, _scores(parts, rows, "consensus"), strict=True):
            if not torch.equal(a.view(torch.int32), b.view(torch.int32)):
                return False
    return True


def _candidates_match_torch(kernel: ModuleType, tau: Sequence[torch.Tensor],
                            stats: Sequence[RowStats]) -> bool:
    """Candidate scores against `_scores` and `_combine` on probes: every entry left out
    scores below the floor, every candidate's score has torch's bits (its `tanh` and `exp`
    taken on a gathered few: torch gives each entry the bits it gives it in place), and the
    sparse combine gives the dense one's bits."""
    base = torch.linspace(-1, 1, tau[0].numel())
    tau = [t * 0.01 for t in tau]
    flat = [t.contiguous().numpy() for t in tau]
    dense = _scores(tau, stats, "consensus")
    total = _task_sum(kernel, flat).numpy()
    size = total.size
    part = _Candidates(flat, total, [_intra(kernel, t, s, len(tau)).numpy()
                                     for t, s in zip(flat, stats, strict=True)])
    floors = [kth_smallest(b, size // 2) for b in dense]
    _candidates(kernel, part, range(len(tau)), floors, stats)
    rows = []
    for i, (b, s, floor) in enumerate(zip(dense, stats, floors, strict=True)):
        where = torch.from_numpy(part.index[i]).long()
        left_out = torch.ones(size, dtype=torch.bool)
        left_out[where] = False
        scores = part.scores[i]
        assert scores is not None
        if bool((b[left_out] >= floor).any()) or not torch.equal(
                scores.view(torch.int32), b[where].view(torch.int32)):
            return False
        threshold = kth_smallest(b, min(size - 1, size // 2 + 7 * i))
        rows.append(RowStats(s.clip_low, s.clip_high, s.abs_min, s.abs_max, threshold,
                             float(b.max())))
    weights = [1.0, -0.5, 2.0, 0.7]
    sparse = _sparse_combine(kernel, base, part, rows, weights, 1.3)
    return torch.equal(sparse.view(torch.int32),
                       _combine(base, tau, dense, rows, weights, 1.3).view(torch.int32))


KERNELS = fused_kernels("pcb-kernels", _kernel_matches_torch)


def _kth(values: torch.Tensor, k: int, nonnegative: bool = False) -> float:
    return kth_smallest(values, k, nonnegative=nonnegative)


def pcb_tensor(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
               densities: Sequence[float], *, clip: float = 0.01, inter: str = "consensus",
               lambda_: float = 1.0) -> torch.Tensor:
    """PCB with every statistic taken over this one tensor (`scope: tensor`)."""
    tau = [m - base for m in models]
    if base.numel() == 0:
        return base.clone()
    stats, scores = tensor_rows(tau, densities, clip=clip, inter=inter)
    return pcb_combine(base, tau, scores, stats, weights, lambda_)


def tensor_rows(tau: Sequence[torch.Tensor], densities: Sequence[float], *, clip: float,
                inter: str) -> tuple[list[RowStats], list[torch.Tensor]]:
    """Each task row's statistics over one tensor (`scope: tensor`), and the scores: task
    i keeps the entries whose score is above its `drop_threshold` (`pcbmerge analyze`
    counts them)."""
    d = tau[0].numel()
    lo_k, hi_k = clip_indices(d, clip)
    stats = []
    for t in tau:
        a = t.abs()
        stats.append(RowStats(_kth(a, lo_k, True), _kth(a, hi_k, True), float(a.min()),
                              float(a.max())))
    scores = pcb_scores(tau, stats, inter)
    stats = [RowStats(s.clip_low, s.clip_high, s.abs_min, s.abs_max,
                      _kth(b, drop_index(d, r)), float(b.max()))
             for s, b, r in zip(stats, scores, densities, strict=True)]
    return stats, scores


def pcb_tensor_in_slices(base: torch.Tensor, models: Sequence[torch.Tensor],
                         weights: Sequence[float], densities: Sequence[float],
                         bounds: list[tuple[int, int]], *, clip: float = 0.01,
                         inter: str = "consensus", lambda_: float = 1.0) -> torch.Tensor:
    """`pcb_tensor` of a large tensor with a slice's scratch: its statistics by streamed
    selection over the slices (|τ| twice, the scores twice), then the merge slice by slice;
    the scores are computed again for each pass instead of held. The same bits: every
    step is elementwise but Σⱼτⱼ, whose columns `slice_bounds` keeps where they fall on
    one torch thread (with more, torch splits that sum's columns by the size of the tensor
    summed: the caller runs this on one)."""
    flat_base, flat_models = base.reshape(-1), [m.reshape(-1) for m in models]
    d = flat_base.numel()

    def taus() -> Iterator[tuple[int, int, torch.Tensor, list[torch.Tensor]]]:
        for a, b in bounds:
            part = flat_base[a:b].float()
            yield a, b, part, [m[a:b].float() - part for m in flat_models]

    lo_k, hi_k = clip_indices(d, clip)
    clips = [StreamingSelect([lo_k, hi_k], nonnegative=True) for _ in models]
    lows, highs = [math.inf] * len(models), [-math.inf] * len(models)
    for _, _, _, tau in taus():
        for i, t in enumerate(tau):
            a = t.abs_()
            low, high = torch.aminmax(a)
            lows[i], highs[i] = min(lows[i], float(low)), max(highs[i], float(high))
            clips[i].observe_high(a)
    for select in clips:
        select.finish_high()
    for _, _, _, tau in taus():
        for select, t in zip(clips, tau, strict=True):
            select.observe_low(t.abs_())
    for select in clips:
        select.finish_low()
    stats = [RowStats(c.values[0], c.values[1], lo, hi)
             for c, lo, hi in zip(clips, lows, highs, strict=True)]

    drops = [StreamingSelect([drop_index(d, r)]) for r in densities]
    tops = [-math.inf] * len(models)
    for _, _, _, tau in taus():
        for i, b in enumerate(pcb_scores(tau, stats, inter)):
            drops[i].observe_high(b)
            tops[i] = max(tops[i], float(b.max()))
    for select in drops:
        select.finish_high()
    for _, _, _, tau in taus():
        for select, b in zip(drops, pcb_scores(tau, stats, inter), strict=True):
            select.observe_low(b)
    for select in drops:
        select.finish_low()
    stats = [RowStats(s.clip_low, s.clip_high, s.abs_min, s.abs_max, sel.values[0], top)
             for s, sel, top in zip(stats, drops, tops, strict=True)]

    out = torch.empty(d, dtype=torch.float32)
    for a, b, part, tau in taus():
        out[a:b] = pcb_combine(part, tau, pcb_scores(tau, stats, inter), stats, weights,
                               lambda_)
    return out.reshape(base.shape)


Part = tuple[str, int | None]  # tensor name, slice start


class PcbGlobalStats(GlobalStats):
    """Each task's clip bounds, |τ| range and score threshold over the whole model.

    Passes: |τ| histograms (and min/max), |τ| refinement, score histograms (and max),
    score refinement. With `clip: 0` the bounds are the min and max and the first
    refinement pass is skipped. Every pass gathers counts, minima and maxima, so tensors
    may be observed on several threads at once.
    """

    concurrent = True

    def __init__(self, num_models: int, total: int, clip: float, inter: str,
                 densities: Sequence[float]) -> None:
        self.n = num_models
        self.total = total
        self.inter = inter
        self.clip = clip
        lo_k, hi_k = clip_indices(total, clip)
        self._clip_select = [StreamingSelect([lo_k, hi_k], nonnegative=True)
                             for _ in range(num_models)]
        self._drop_ranks = [drop_index(total, r) for r in densities]
        self._score_select = [StreamingSelect([k]) for k in self._drop_ranks]
        self._abs_min = [float("inf")] * num_models
        self._abs_max = [float("-inf")] * num_models
        self._score_max = [float("-inf")] * num_models
        self._lock = threading.Lock()
        self._kept: dict[Part, list[torch.Tensor]] = {}
        self._known: list[RowStats | None] = [None] * num_models  # see `reuse`
        # Candidate scores (`keep_parts`, consensus, the kernels loaded): see `_sample`.
        self._kernel: ModuleType | None = None
        self._candidates: dict[Part, _Candidates] = {}
        self._samples: list[list[torch.Tensor]] = [[] for _ in range(num_models)]
        self._floors = [float("-inf")] * num_models
        self._below = [0] * num_models
        self._stores: list[PartStore | None] = []  # see `reuse_parts`
        self.rows: list[RowStats] = []
        steps = [("pcb: |τ| histograms", self._observe_abs, self._finish_abs)]
        if clip > 0:
            steps.append(("pcb: clip refinement", self._observe_abs_low, self._finish_clip))
        steps += [("pcb: score histograms", self._observe_scores, self._finish_scores_high),
                  ("pcb: score refinement", self._observe_scores_low, self._finish_scores)]
        self._steps = steps
        self.pass_names = tuple(s[0] for s in steps)

    def observe(self, pass_index: int, inputs: TensorInputs) -> None:
        self._steps[pass_index][1](inputs)

    def model_results(self) -> list[RowStats]:
        """Each task's clip bounds and |τ| range: its own, whatever the other tasks."""
        return [RowStats(r.clip_low, r.clip_high, r.abs_min, r.abs_max) for r in self.rows]

    def reuse(self, known: Sequence[Any]) -> None:
        self._known = [k if isinstance(k, RowStats) else None for k in known]

    def reuse_parts(self, stores: Sequence[PartStore | None]) -> None:
        self._stores = list(stores)

    def _unknown(self, inputs: TensorInputs) -> list[tuple[int, torch.Tensor]]:
        """(task, |τ|) for the tasks whose clip bounds are not known from an earlier merge."""
        assert inputs.base is not None
        base = inputs.base.float()  # PCB computes in float32, whatever the recipe's dtype
        stores = self._part_stores()
        part = (inputs.name, inputs.start)
        return [(i, _kept_part(stores[i], "tau", part,
                               lambda m=m: (m.float() - base).reshape(-1)).abs())
                for i, m in enumerate(inputs.models) if self._known[i] is None]

    def _part_stores(self) -> list[PartStore | None]:
        """Each model's part store (`reuse_parts`), or None."""
        return self._stores if len(self._stores) == self.n else [None] * self.n

    def scores(self, inputs: TensorInputs, last_use: bool = False,
               tau: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The part's scores: derived now (from `tau` when the caller has it), or kept from
        an earlier pass (`keep_parts`)."""
        assert inputs.base is not None
        keep = self.keep_parts
        part = (inputs.name, inputs.start)
        kept = (self._kept.pop(part, None) if last_use else self._kept.get(part)) if keep \
            else None
        if kept is not None:
            return kept
        if tau is None:  # in float32, as the merge's (whatever the recipe's dtype)
            base = inputs.base.float()
            tau = [m.float() - base for m in inputs.models]
        scores = pcb_scores(tau, self.rows, self.inter)
        if keep and not last_use:
            with self._lock:
                self._kept[part] = scores
        return scores

    def finish(self, pass_index: int) -> None:
        self._steps[pass_index][2]()

    def _observe_abs(self, inputs: TensorInputs) -> None:
        for i, a in self._unknown(inputs):
            if a.numel():
                low, high = (float(x) for x in torch.aminmax(a))
                with self._lock:
                    self._abs_min[i] = min(self._abs_min[i], low)
                    self._abs_max[i] = max(self._abs_max[i], high)
            if self.clip > 0:
                self._clip_select[i].observe_high(a)

    def _finish_abs(self) -> None:
        if self.clip > 0:
            for sel, known in zip(self._clip_select, self._known, strict=True):
                if known is None:
                    sel.finish_high()
        else:
            self._finish_clip()

    def _observe_abs_low(self, inputs: TensorInputs) -> None:
        for i, a in self._unknown(inputs):
            self._clip_select[i].observe_low(a)

    def _finish_clip(self) -> None:
        self.rows = []
        for i, (sel, known) in enumerate(zip(self._clip_select, self._known, strict=True)):
            if known is not None:
                self.rows.append(known)
                continue
            if self.clip > 0:
                sel.finish_low()
                low, high = sel.values
            else:
                low, high = self._abs_min[i], self._abs_max[i]
            self.rows.append(RowStats(low, high, self._abs_min[i], self._abs_max[i]))
        if self.keep_parts and self.inter == "consensus" and self.n <= FUSE_MAX_MODELS \
                and torch.get_num_threads() == 1:
            self._kernel = KERNELS.ready()

    def _observe_scores(self, inputs: TensorInputs) -> None:
        if self._kernel is not None:
            self._sample(inputs)
            return
        for i, (sel, b) in enumerate(zip(self._score_select, self.scores(inputs),
                                         strict=True)):
            if b.numel():
                top = float(b.max())
                with self._lock:
                    self._score_max[i] = max(self._score_max[i], top)
            sel.observe_high(b)

    def _finish_scores_high(self) -> None:
        if self._kernel is not None:
            self._set_floors()
            return
        for sel in self._score_select:
            sel.finish_high()

    def _observe_scores_low(self, inputs: TensorInputs) -> None:
        if self._kernel is not None:
            part = self._candidates.get((inputs.name, inputs.start))
            if part is not None:  # (a dense part keeps its scores whole)
                self._find_candidates(part, range(self.n))
            return
        for sel, b in zip(self._score_select, self.scores(inputs), strict=True):
            sel.observe_low(b)

    def _finish_scores(self) -> None:
        if self._kernel is not None:
            self._select_from_candidates()
            return
        rows = []
        for row, sel, top in zip(self.rows, self._score_select, self._score_max, strict=True):
            sel.finish_low()
            rows.append(RowStats(row.clip_low, row.clip_high, row.abs_min, row.abs_max,
                                 sel.values[0], top))
        self.rows = rows

    # Candidate scores. Merging in memory (`keep_parts`), a part's scores are not all
    # needed: only the entries at or above each task's drop threshold weigh in the merge
    # (a `density` share of them), and the threshold is an order statistic of the scores.
    # So the first score pass only samples exact scores (one in `SAMPLE_STRIDE`, `_sampled`),
    # which gives each task a floor safely below its threshold; the second computes exact
    # scores (torch's `tanh`, its bits) only where an upper bound of the score reaches the
    # floor, and counts the rest; the threshold is then selected among those, its rank
    # lowered by the count. A floor that turns out above the threshold (a sample far from
    # the whole) is dropped and every score computed: the same statistics either way.
    def _sample(self, inputs: TensorInputs) -> None:
        kernel = self._kernel
        assert kernel is not None and inputs.base is not None
        base = inputs.base.float()
        where = (inputs.name, inputs.start)
        stores = self._part_stores()
        tau = [_kept_part(store, "tau", where, lambda m=m: (m.float() - base).reshape(-1))
               for m, store in zip(inputs.models, stores, strict=True)]
        part: _Candidates | None = None
        if not fusable(tau):  # a small part: its scores whole, as without candidates
            sampled = [b.reshape(-1)[::SAMPLE_STRIDE] for b in self.scores(
                inputs, tau=[t.reshape(base.shape) for t in tau])]
        else:
            flat = [t.numpy() for t in tau]
            total = _task_sum(kernel, flat)
            intra = [_kept_part(store, "intra", where,
                                lambda t=t, s=s: _intra(kernel, t, s, self.n))
                     for t, s, store in zip(flat, self.rows, stores, strict=True)]
            some = _sampled(total.numpy())
            # (in place on the new products: the intra terms may be the memo's)
            sampled = [torch.from_numpy(_sampled(t) * some).tanh_().mul_(
                torch.from_numpy(_sampled(i.numpy()))) for t, i in zip(flat, intra, strict=True)]
            part = _Candidates(flat, total.numpy(), [i.numpy() for i in intra])
        with self._lock:
            if part is not None:
                self._candidates[where] = part
            for row, values in zip(self._samples, sampled, strict=True):
                row.append(values)

    def _set_floors(self) -> None:
        """Each task's floor: its sample's order statistic far enough below the threshold's
        share (five standard deviations of a sampled share) to be below the threshold."""
        for i, k in enumerate(self._drop_ranks):
            sample = torch.cat(self._samples[i]) if self._samples[i] else torch.empty(0)
            size = sample.numel()
            share = k / self.total
            rank = math.floor(share * size - 5 * math.sqrt(size * share * (1 - share)) - 2)
            self._floors[i] = kth_smallest(sample, rank) if rank >= 0 else float("-inf")
        self._samples = [[] for _ in range(self.n)]

    def _find_candidates(self, part: _Candidates, rows: Sequence[int]) -> None:
        """The tasks' entries in `part` whose scores may reach their floors, and their
        scores."""
        kernel = self._kernel
        assert kernel is not None
        _candidates(kernel, part, rows, [self._floors[i] for i in rows], self.rows)
        with self._lock:
            for i in rows:
                self._below[i] += part.total.size - part.scores[i].numel()

    def _select_from_candidates(self) -> None:
        rows = []
        for i, (row, k) in enumerate(zip(self.rows, self._drop_ranks, strict=True)):
            found = self._select(i, k)
            if found is None:  # the floor was above the threshold: every score, exactly
                self._below[i] = 0
                self._floors[i] = float("-inf")
                for part in self._candidates.values():
                    self._find_candidates(part, [i])
                found = self._select(i, k)
                assert found is not None
            rows.append(RowStats(row.clip_low, row.clip_high, row.abs_min, row.abs_max,
                                 *found))
        self.rows = rows

    def _select(self, i: int, k: int) -> tuple[float, float] | None:
        """Task i's threshold (the k-th smallest score) and top score from its candidates
        and its dense parts' scores; None when the floor was above the threshold."""
        values = [p.scores[i] for p in self._candidates.values()]
        values += [b[i].reshape(-1) for b in self._kept.values()]
        every = torch.cat([v for v in values if v is not None])
        rank = k - self._below[i]
        if not 0 <= rank < every.numel():
            return None
        threshold = kth_smallest(every, rank)
        if threshold < self._floors[i]:
            return None
        return threshold, float(every.max())

    def merge_candidates(self, inputs: TensorInputs, base: torch.Tensor,
                         weights: Sequence[float], lambda_: float) -> torch.Tensor | None:
        """The part's merge from its candidate scores (dropped here), if it has them."""
        if self._kernel is None:
            return None
        with self._lock:
            part = self._candidates.pop((inputs.name, inputs.start), None)
        if part is None:
            return None
        return _sparse_combine(self._kernel, base, part, self.rows, weights, lambda_)


def _candidates(kernel: ModuleType, part: _Candidates, rows: Sequence[int],
                floors: Sequence[float], stats: Sequence[RowStats]) -> None:
    """For each task i in `rows`, the entries of `part` whose scores may reach its floor
    (`fused_kernel.pcb_candidates`), into `part`: their indices, their exact scores
    (tanh(τⱼ·Σⱼτⱼ) and its product with Iⱼ, the float32 operations of `pcb_scores`) and
    their clipped task vector."""
    size = part.total.size
    for i, floor in zip(rows, floors, strict=True):
        index = np.empty(size, dtype=np.int32)
        product = np.empty(size, dtype=np.float32)
        weight = np.empty(size, dtype=np.float32)
        clipped = np.empty(size, dtype=np.float32)
        s = stats[i]
        kept = kernel.pcb_candidates(part.tau[i], part.total, part.intra[i],
                                     np.float32(floor), np.float32(s.clip_low),
                                     np.float32(s.clip_high), index, product, weight, clipped)
        part.index[i], part.clipped[i] = index[:kept], clipped[:kept]
        part.scores[i] = torch.from_numpy(weight[:kept]).mul_(
            torch.from_numpy(product[:kept]).tanh_())


def _sampled(values: np.ndarray) -> np.ndarray:
    """One run of `SAMPLE_RUN` entries in every `SAMPLE_RUN`·`SAMPLE_STRIDE`: a sample read
    in whole cache lines (every `SAMPLE_STRIDE`-th entry alone would read most of them).
    The run's place moves from one period to the next, so that a matrix whose rows are a
    period long is not sampled in the same columns only."""
    return values[_sample_index(values.size)]


@functools.lru_cache(maxsize=64)
def _sample_index(size: int) -> np.ndarray:
    period = SAMPLE_RUN * SAMPLE_STRIDE
    periods = np.arange(size // period)
    starts = periods * period + (periods * 13 % SAMPLE_STRIDE) * SAMPLE_RUN
    return (starts[:, None] + np.arange(SAMPLE_RUN)).reshape(-1)


def _kept_part(store: PartStore | None, kind: str, part: Part,
               compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A model's per-part tensor from its store, or computed (and kept there)."""
    found = None if store is None else store.get(kind, *part)
    if found is None:
        found = compute()
        if store is not None:
            store.put(kind, *part, found)
    return found


@dataclass
class _Candidates:
    """A part's flat task vectors, Σⱼτⱼ, intra-balancing terms, and per task the entries
    whose scores may reach its floor, with those scores and clipped task vectors
    (`PcbGlobalStats._sample`)."""

    tau: list[np.ndarray]
    total: np.ndarray
    intra: list[np.ndarray]
    index: list[np.ndarray | None] = field(default_factory=list)
    scores: list[torch.Tensor | None] = field(default_factory=list)
    clipped: list[np.ndarray | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        for row in (self.index, self.scores, self.clipped):
            row.extend([None] * (len(self.tau) - len(row)))


def _sparse_combine(kernel: ModuleType, base: torch.Tensor, part: _Candidates,
                    stats: Sequence[RowStats], weights: Sequence[float],
                    lambda_: float) -> torch.Tensor:
    """`pcb_combine` from candidate scores: the same bits (`fused_kernel.pcb_sparse_combine`)."""
    rows, kept = [], []
    for i, (s, w) in enumerate(zip(stats, weights, strict=True)):
        span = s.score_max - s.drop_threshold  # as `minmax`: in double, then float32
        if span > 0:
            rows.append((s.drop_threshold, span, s.clip_low, s.clip_high, w))
            kept.append(i)
    if not kept:  # no task weighs: θ₀ + λ·0/10⁻¹², as torch
        return _combine(base, [], [], [], [], lambda_)
    out = np.empty(base.numel(), dtype=np.float32)
    kernel.pcb_sparse_combine(flat_array(base), tuple(part.clipped[i] for i in kept),
                              tuple(part.index[i] for i in kept),
                              tuple(flat_array(part.scores[i]) for i in kept),
                              np.array(rows, dtype=np.float32).reshape(-1, 5),
                              np.float32(lambda_), out)
    return torch.from_numpy(out).reshape(base.shape)


class Pcb(MergeMethod):
    name = "pcb"
    summary = "PCB: parameter competition balancing (clip, intra/inter balance, drop, soft mean)"
    params = (
        WEIGHT,
        replace(DENSITY, default=0.1, meaning="fraction of entries kept per task "
                "(paper: 0.05–0.1)"),
        LAMBDA,
        # Below 0.5 the lower clip rank stays at or below the upper one.
        ParamSpec("clip", 0.01, "outlier clip: |τ| clamped between ranks ⌊D·p⌋ and "
                  "⌊D·(1−p)⌋−1 (0 disables)", bounds=Range(0.0, 0.5, high_open=True)),
        ParamSpec("inter", "consensus", "inter-balancing", kind=str, choices=INTER),
        ParamSpec("scope", "global", "statistics over the whole model or each tensor",
                  kind=str, choices=SCOPE),
    )

    def global_stats(self, num_models: int, total_numel: int, params: Mapping[str, Any],
                     model_params: Sequence[Mapping[str, Any]]) -> GlobalStats | None:
        if params["scope"] != "global":
            return None
        return PcbGlobalStats(num_models, total_numel, params["clip"], params["inter"],
                              [p["density"] for p in model_params])

    @classmethod
    def check_params(cls, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                     tensor: str) -> None:
        if len(model_params) > MAX_MODELS:
            raise RecipeError(f"models: pcb merges at most {MAX_MODELS} models (its scores "
                              f"grow like n·exp(n) and overflow float32), got {len(model_params)}")

    def elementwise(self, params: Mapping[str, Any]) -> bool:
        return params["scope"] == "global"

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        weights = [p["weight"] for p in inputs.model_params]
        params = inputs.params
        if params["scope"] == "tensor" and sliceable(inputs) is not None:
            # On one torch thread, whatever the caller's count: Σⱼτⱼ's bits depend on how
            # torch splits its columns among threads, by the size of the tensor summed, so
            # only on one thread are the slices' bits the whole tensor's. A large tensor's
            # result is then the same at every thread count (that of one thread, which the
            # engine gives every tensor below `SOLO_PART_ELEMENTS` anyway).
            with torch_threads(1):
                bounds = sliceable(inputs)
                assert bounds is not None
                return pcb_tensor_in_slices(inputs.base, inputs.models, weights,
                                            [p["density"] for p in inputs.model_params],
                                            bounds, clip=params["clip"],
                                            inter=params["inter"], lambda_=params["lambda"])
        base = inputs.base.float()
        models = [m.float() for m in inputs.models]
        if params["scope"] == "tensor":
            return pcb_tensor(base, models, weights,
                              [p["density"] for p in inputs.model_params],
                              clip=params["clip"], inter=params["inter"],
                              lambda_=params["lambda"])
        stats = inputs.stats
        assert isinstance(stats, PcbGlobalStats)
        merged = stats.merge_candidates(inputs, base, weights, params["lambda"])
        if merged is not None:
            return merged
        tau = [m - base for m in models]
        scores = stats.scores(replace(inputs, base=base, models=models), last_use=True,
                              tau=tau)
        return pcb_combine(base, tau, scores, stats.rows, weights, params["lambda"])

