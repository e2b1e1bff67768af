"""Exact order statistics of a stream of float32 values in constant memory.

A global quantile over a whole model (the PCB and TIES papers flatten every model into one
vector and sort it) is found here in two streaming passes: a 65,536-bin histogram over the
top 16 bits of each value's order-preserving bit pattern, then a 65,536-bin histogram over
the low 16 bits of the values inside the one bin that holds the k-th value. The result is
the exact k-th smallest value, as a full sort would give, with memory independent of the
number of values.
"""

from __future__ import annotations

import threading
from types import ModuleType

import numpy as np
import torch

from mergekit_pcb.methods.compiled import FUSE_MIN, flat_array, fusable, fused_kernels

BINS = 1 << 16
_HALF = 1 << 15
_LOW = BINS - 1
_FLIP = 0x7FFFFFFF


def float_keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of float32 values (negative floats get their low 31 bits
    flipped); -0.0 counts as +0.0. All int32 arithmetic: no 64-bit temporaries."""
    v = values.detach().reshape(-1).to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0
    bits = v.view(torch.int32)
    return bits ^ ((bits >> 31) & _FLIP)


def key_to_float(key: int) -> float:
    k = torch.tensor([key], dtype=torch.int32)
    return (k ^ ((k >> 31) & _FLIP)).view(torch.float32).item()


def _high(keys: torch.Tensor) -> torch.Tensor:
    return (keys >> 16) + _HALF  # 0 … 65535


def _key(high_bin: int, low: int) -> int:
    return ((high_bin - _HALF) << 16) | low


class StreamingSelect:
    """The exact k-th smallest (0-based) values of a stream, for several k at once.

    Call `observe_high` on every chunk, `finish_high`, `observe_low` on every chunk (same
    values, any order), then `finish_low`; `values[j]` is the ks[j]-th smallest value and
    `counts_below[j]` / `counts_equal[j]` how many stream values are below / equal to it.
    Chunks may be observed from several threads at once: each one's histogram is counted
    outside the lock and only added under it (integer counts: any order, same result).
    """

    def __init__(self, ks: list[int], nonnegative: bool = False) -> None:
        self.ks = ks
        # Magnitudes (no negative values, no -0.0): their float32 bits are already the keys.
        self.nonnegative = nonnegative
        self.total = 0
        self._hist_high = torch.zeros(BINS, dtype=torch.int64)
        self._bins: list[int] = []
        self._ranks: list[int] = []
        self._below_bin: list[int] = []
        self._hist_low: dict[int, torch.Tensor] = {}
        self.values: list[float] = []
        self.counts_below: list[int] = []
        self.counts_equal: list[int] = []
        self._lock = threading.Lock()

    def _keys(self, values: torch.Tensor) -> torch.Tensor:
        if self.nonnegative:
            return values.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32)
        return float_keys(values)

    def observe_high(self, values: torch.Tensor) -> None:
        kernel, flat = _fused(values)
        if kernel is not None:
            histogram = np.zeros(BINS, dtype=np.int64)
            kernel.high_histogram(flat, self.nonnegative, histogram)
            counts = torch.from_numpy(histogram)
        else:
            keys = self._keys(values)
            counts = torch.bincount(_high(keys), minlength=BINS).cpu()
        with self._lock:
            self.total += values.numel()
            self._hist_high += counts

    def finish_high(self) -> None:
        for k in self.ks:
            if not 0 <= k < self.total:
                raise ValueError(f"order statistic {k} out of range for {self.total} values")
        cum = self._hist_high.cumsum(0)
        for k in self.ks:
            b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
            below = int(cum[b - 1]) if b > 0 else 0
            self._bins.append(b)
            self._below_bin.append(below)
            self._ranks.append(k - below)
            self._hist_low.setdefault(b, torch.zeros(BINS, dtype=torch.int64))

    def observe_low(self, values: torch.Tensor) -> None:
        kernel, flat = _fused(values)
        if kernel is not None:
            bins = np.array(list(self._hist_low), dtype=np.int64)
            histograms = np.zeros((bins.size, BINS), dtype=np.int64)
            kernel.low_histograms(flat, self.nonnegative, bins, histograms)
            with self._lock:
                for b, counts in zip(bins.tolist(), histograms, strict=True):
                    self._hist_low[b] += torch.from_numpy(counts)
            return
        keys = self._keys(values)
        high = _high(keys)
        for b, hist in self._hist_low.items():
            inside = keys[high == b] & _LOW
            if inside.numel():
                counts = torch.bincount(inside, minlength=BINS).cpu()
                with self._lock:
                    hist += counts

    def finish_low(self) -> None:
        for b, rank, below in zip(self._bins, self._ranks, self._below_bin, strict=True):
            hist = self._hist_low[b]
            cum = hist.cumsum(0)
            low = int(torch.searchsorted(cum, torch.tensor(rank), right=True))
            self.values.append(key_to_float(_key(b, low)))
            self.counts_below.append(below + (int(cum[low - 1]) if low > 0 else 0))
            self.counts_equal.append(int(hist[low]))
        self._hist_low.clear()


# The fused histograms (`fused_kernel`, numba): one pass over a chunk instead of a key
# transform, a shift and a bincount; the same counts. Loaded as `ops.FUSED` is.
def _fused(values: torch.Tensor) -> tuple[ModuleType | None, np.ndarray | None]:
    """The histogram kernels and `values` as a flat float32 array, where they apply."""
    if not fusable([values]) or values.numel() >= 2**31:
        return None, None
    kernel = HISTOGRAMS.ready()
    if kernel is None:
        HISTOGRAMS.count(values.numel())
        return None, None
    return kernel, flat_array(values)


def _histograms_match_torch(kernel: ModuleType) -> bool:
    """Both rounds by kernel and by torch on probes: signed values with −0.0 and ties, and
    magnitudes."""
    g = torch.Generator().manual_seed(0)
    n = 3 * FUSE_MIN + 5
    signed = torch.randn(n, generator=g) * torch.exp(8 * torch.randn(n, generator=g))
    signed[::7] = -0.0
    signed[1::11] = 0.0
    signed[2::13] = 1.5
    for values, nonnegative in ((signed, False), (signed.abs(), True)):
        keys = values.contiguous().view(torch.int32) if nonnegative else float_keys(values)
        high = _high(keys)
        histogram = np.zeros(BINS, dtype=np.int64)
        kernel.high_histogram(values.numpy(), nonnegative, histogram)
        if not torch.equal(torch.from_numpy(histogram), torch.bincount(high, minlength=BINS)):
            return False
        bins = np.array(sorted(set(high[:50].tolist())), dtype=np.int64)
        low = np.zeros((bins.size, BINS), dtype=np.int64)
        kernel.low_histograms(values.numpy(), nonnegative, bins, low)
        for b, counts in zip(bins.tolist(), low, strict=True):
            expected = torch.bincount(keys[high == b] & _LOW, minlength=BINS)
            if not torch.equal(torch.from_numpy(counts), expected):
                return False
    return True


HISTOGRAMS = fused_kernels("histogram-kernels", _histograms_match_torch)


# Up to this many values `kth_smallest` sorts.
SORT_MAX = 1 << 12


def kth_smallest(values: torch.Tensor, k: int, *, nonnegative: bool = False) -> float:
    """The exact k-th smallest (0-based) of float32 values, by the same two histogram rounds
    in memory: several times faster than `torch.kthvalue` on large tensors (up to
    `SORT_MAX` values, a sort).

    With `nonnegative` (magnitudes: no negative values and no -0.0), the float bits are
    already order-preserving and the key transform is skipped.
    """
    flat = values.detach().reshape(-1).to(torch.float32)
    if not 0 <= k < flat.numel():
        raise ValueError(f"order statistic {k} out of range for {flat.numel()} values")
    if flat.numel() <= SORT_MAX and not bool(flat.isnan().any()):
        # A bias or a norm: sorting it costs less than the fixed work of two 2¹⁶-bin rounds
        # (about 1 ms). A zero comes back as +0.0, as the rounds give it (NaNs, which the
        # rounds order by their sign and torch's sort does not, take the rounds).
        return flat.sort().values[k].item() + 0.0
    return _histogram_kth(flat, k, nonnegative)


def _histogram_kth(flat: torch.Tensor, k: int, nonnegative: bool) -> float:
    if _fused(flat)[0] is not None:  # the rounds by the kernels, once loaded
        select = StreamingSelect([k], nonnegative=nonnegative)
        select.observe_high(flat)
        select.finish_high()
        select.observe_low(flat)
        select.finish_low()
        return select.values[0]
    if nonnegative:
        keys = flat.contiguous().view(torch.int32)
        high = keys >> 16
        offset = 0
    else:
        keys = float_keys(flat)
        high = _high(keys)
        offset = _HALF
    cum = torch.bincount(high, minlength=BINS).cumsum(0).cpu()
    b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
    below = int(cum[b - 1]) if b > 0 else 0
    inside = keys[high == b] & _LOW
    cum_low = torch.bincount(inside, minlength=BINS).cumsum(0).cpu()
    low = int(torch.searchsorted(cum_low, torch.tensor(k - below), right=True))
    return key_to_float(((b - offset) << 16) | low) if not nonnegative else \
        torch.tensor([(b << 16) | low], dtype=torch.int32).view(torch.float32).item()
