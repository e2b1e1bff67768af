"""Fused float32 kernels (numba) for the steps an evolution repeats on every candidate.

Each kernel gives the bits of the torch code it stands in for (`ops._combine`, the TIES trim
in `ops.magnitude_trim_all`, `StreamingSelect`'s histogram rounds, PCB's scores and
combine): the same float32 operations on each entry in the same order, compiled without
fast-math, so nothing is reassociated or contracted. Where torch takes a dozen passes over
the stacked task vectors, a kernel reads each entry once, a block of entries at a time.
Imported only through `compiled.StagedKernel`, which loads it when a process has work
enough to pay for loading numba, and checks it against torch first.
"""

from __future__ import annotations

import numba
import numpy as np

# Entries per block: the block's sums stay in L1 while every task vector streams by.
_BLOCK = 512


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def weighted_combine(deltas: tuple[np.ndarray, ...], weights: np.ndarray, base: np.ndarray,
                     consensus: bool, normalize: bool, divisor: np.float32, scale: bool,
                     lambda_: np.float32, tail_from: int, out: np.ndarray) -> None:
    """out = base + λ·mix(wᵢτᵢ), as `ops._combine` computes it on one torch thread.

    Sums over the tasks (fewer than 16) run in torch's order: in order from +0, except in
    the entries from `tail_from` on (the columns past the last full group of vectors, which
    torch's sum adds with four partial sums, see `_tail_sum`). With `consensus`, an entry
    keeps the weighted deltas whose sign is the sign of their sum (a zero sum elects +) and
    divides by the sum of their weights (1 where none agree); without, `divisor` is the sum
    of all weights, given."""
    n = base.size
    zero = np.float32(0.0)
    total = np.empty(_BLOCK, np.float32)
    mixed = np.empty(_BLOCK, np.float32)
    agreeing = np.empty(_BLOCK, np.float32)
    for start in range(0, tail_from, _BLOCK):
        size = min(tail_from, start + _BLOCK) - start
        for j in range(size):
            total[j] = zero
            mixed[j] = zero
            agreeing[j] = zero
        if consensus:
            for i in range(len(deltas)):
                w = weights[i]
                row = deltas[i][start:start + size]
                for j in range(size):
                    total[j] += row[j] * w
        for i in range(len(deltas)):
            w = weights[i]
            row = deltas[i][start:start + size]
            if consensus:
                for j in range(size):
                    x = row[j] * w
                    positive = total[j] >= zero
                    agree = np.float32(((x > zero) & positive) | ((x < zero) & ~positive))
                    mixed[j] += x * agree  # ±0 where it disagrees: no change to the sum
                    agreeing[j] += w * agree
            else:
                for j in range(size):
                    mixed[j] += row[j] * w
        dest = out[start:start + size]
        below = base[start:start + size]
        if consensus:
            for j in range(size):
                dest[j] = _finish(mixed[j], agreeing[j], normalize, scale, lambda_, below[j])
        else:
            for j in range(size):
                dest[j] = _finish(mixed[j], divisor, normalize, scale, lambda_, below[j])
    m = len(deltas)
    column = np.empty(m, np.float32)
    agree = np.empty(m, np.float32)
    kept = divisor
    for j in range(tail_from, n):
        for i in range(m):
            column[i] = deltas[i][j] * weights[i]
        if consensus:
            positive = _tail_sum(column) >= zero
            for i in range(m):
                x = column[i]
                agree[i] = np.float32(((x > zero) & positive) | ((x < zero) & ~positive))
            kept = _tail_sum(weights * agree)
            column *= agree
        out[j] = _finish(_tail_sum(column), kept, normalize, scale, lambda_, base[j])


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _finish(mixed: np.float32, divisor: np.float32, normalize: bool, scale: bool,
            lambda_: np.float32, base: np.float32) -> np.float32:
    if normalize:
        mixed = mixed / (np.float32(1.0) if divisor == np.float32(0.0) else divisor)
    if scale:
        mixed = mixed * lambda_
    return mixed + base


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _tail_sum(x: np.ndarray) -> np.float32:
    """torch's `row_sum` of fewer than 64 values: four partial sums over x[k::4] (of the
    first ⌊m/4⌋·4), the rest added to the first, then the other three added in turn."""
    m = x.size
    whole = m // 4 * 4
    partial = np.zeros(4, np.float32)
    for i in range(whole):
        partial[i % 4] += x[i]
    for i in range(whole, m):
        partial[0] += x[i]
    return partial[0] + partial[1] + partial[2] + partial[3]


_HIGH_BINS = 1 << 15  # a magnitude's bits: no sign bit, so 15 high bits
_MAGNITUDE = 0x7FFFFFFF


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def magnitude_rank_bits(delta: np.ndarray, rank: int) -> np.int32:
    """The float32 bits of the `rank`-th smallest (0-based) |δ|: a histogram of the high 16
    bits, then one of the low 16 bits inside the bin that holds the rank (the two rounds of
    `selection.kth_smallest`, without the temporaries)."""
    bits = delta.view(np.int32)
    high = np.zeros(_HIGH_BINS, np.int64)
    for j in range(bits.size):
        high[(bits[j] & _MAGNITUDE) >> 16] += 1
    below = 0
    b = 0
    while below + high[b] <= rank:
        below += high[b]
        b += 1
    low = np.zeros(1 << 16, np.int64)
    for j in range(bits.size):
        m = bits[j] & _MAGNITUDE
        if (m >> 16) == b:
            low[m & 0xFFFF] += 1
    rank -= below
    t = 0
    while low[t] <= rank:
        rank -= low[t]
        t += 1
    return np.int32((b << 16) | t)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def keep_from(delta: np.ndarray, threshold: np.float32, out: np.ndarray) -> int:
    """out = δ·[|δ| ≥ threshold] (−0 where a negative entry is dropped, as δ·0 gives);
    returns how many entries are kept."""
    kept = 0
    for j in range(delta.size):
        keep = np.abs(delta[j]) >= threshold
        kept += keep
        out[j] = delta[j] * np.float32(keep)
    return kept


_SIGN_FLIP = 0x7FFFFFFF
_NEGATIVE_ZERO = -(1 << 31)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", inline="always")
def _order_key(bits: np.int32, nonnegative: bool) -> np.int32:
    """`selection.float_keys` of one value's bits: −0 counts as +0, negative values get
    their low 31 bits flipped (magnitudes, `nonnegative`, are their own keys)."""
    if nonnegative:
        return bits
    if bits == _NEGATIVE_ZERO:
        return np.int32(0)
    return bits ^ ((bits >> 31) & _SIGN_FLIP)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def high_histogram(values: np.ndarray, nonnegative: bool, counts: np.ndarray) -> None:
    """counts[(key >> 16) + 2¹⁵] += 1 for each value's order key (`StreamingSelect`'s first
    round, in one pass instead of a key transform, a shift and a bincount)."""
    bits = values.view(np.int32)
    for j in range(bits.size):
        counts[(_order_key(bits[j], nonnegative) >> 16) + 32768] += 1


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def low_histograms(values: np.ndarray, nonnegative: bool, bins: np.ndarray,
                   counts: np.ndarray) -> None:
    """counts[t, key & 0xFFFF] += 1 for each value whose high bin is bins[t] (the second
    round, for every selected bin in one pass)."""
    slot = np.full(1 << 16, -1, np.int32)
    for t in range(bins.size):
        slot[bins[t]] = t
    bits = values.view(np.int32)
    for j in range(bits.size):
        key = _order_key(bits[j], nonnegative)
        t = slot[(key >> 16) + 32768]
        if t >= 0:
            counts[t, key & 0xFFFF] += 1


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", inline="always")
def _clipped(x: np.float32, low: np.float32, high: np.float32) -> np.float32:
    """PCB's clipped task vector entry τ̃ = sign(τ)·min(max(|τ|, low), high)."""
    zero = np.float32(0.0)
    sign = np.float32(x > zero) - np.float32(x < zero)
    return sign * min(max(np.abs(x), low), high)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", inline="always")
def _pcb_row(rows: np.ndarray, i: int) -> tuple[np.float32, np.float32, np.float32,
                                                np.float32, np.float32]:
    """Task i's (threshold, span, clip low, clip high, weight) from the combine's rows."""
    return rows[i, 0], rows[i, 1], rows[i, 2], rows[i, 3], rows[i, 4]


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def pcb_combine(base: np.ndarray, tau: tuple[np.ndarray, ...], scores: tuple[np.ndarray, ...],
                rows: np.ndarray, lambda_: np.float32, out: np.ndarray) -> None:
    """`pcb.pcb_combine`: θ₀ + λ·Σᵢ wᵢSᵢτ̃ᵢ / max(ΣᵢSᵢ, 10⁻¹²), the sums in task order, with
    Sᵢ = (max(Bᵢ, tᵢ) − tᵢ)/spanᵢ and τ̃ᵢ = sign(τᵢ)·min(max(|τᵢ|, lowᵢ), highᵢ).

    rows[i] = (tᵢ, spanᵢ, lowᵢ, highᵢ, wᵢ) in float32. Tasks whose span is empty (Sᵢ = 0,
    which adds ±0 and 0 to the sums and so changes neither) are left out by the caller."""
    zero = np.float32(0.0)
    tiny = np.float32(1e-12)
    numerator = np.empty(_BLOCK, np.float32)
    denominator = np.empty(_BLOCK, np.float32)
    n = base.size
    for start in range(0, n, _BLOCK):
        size = min(n, start + _BLOCK) - start
        for j in range(size):
            numerator[j] = zero
            denominator[j] = zero
        for i in range(len(tau)):
            threshold, span, low, high, w = _pcb_row(rows, i)
            t = tau[i][start:start + size]
            b = scores[i][start:start + size]
            for j in range(size):
                soft = (max(b[j], threshold) - threshold) / span
                numerator[j] += w * soft * _clipped(t[j], low, high)
                denominator[j] += soft
        dest = out[start:start + size]
        below = base[start:start + size]
        for j in range(size):
            dest[j] = below[j] + lambda_ * numerator[j] / max(denominator[j], tiny)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def task_sum(tau: tuple[np.ndarray, ...], tail_from: int, out: np.ndarray) -> None:
    """out = Σᵢ τᵢ as torch sums a stack of them over dim 0 (fewer than 16): in task order
    from +0, and in the four-partial order from `tail_from` on."""
    zero = np.float32(0.0)
    for start in range(0, tail_from, _BLOCK):
        size = min(tail_from, start + _BLOCK) - start
        dest = out[start:start + size]
        for j in range(size):
            dest[j] = zero
        for i in range(len(tau)):
            row = tau[i][start:start + size]
            for j in range(size):
                dest[j] += row[j]
    column = np.empty(len(tau), np.float32)
    for j in range(tail_from, out.size):
        for i in range(len(tau)):
            column[i] = tau[i][j]
        out[j] = _tail_sum(column)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def intra_exponent(tau: np.ndarray, low: np.float32, high: np.float32, span: np.float32,
                   n: np.float32, out: np.ndarray) -> None:
    """out = n·m², m = (min(max(|τ|, low), high) − low)/span: the exponent of PCB's
    intra-balancing, as `pcb_scores` computes it before its `exp`."""
    for j in range(tau.size):
        m = (min(max(np.abs(tau[j]), low), high) - low) / span
        out[j] = n * (m * m)


# Relative slack on a score's upper bound: covers the bound's own float32 rounding (a few
# operations on positive terms), torch's tanh (within an ulp or two) and the product's
# rounding, a hundred times over.
_BOUND_SLACK = np.float32(1.0 + 2.0**-16)


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def pcb_candidates(tau: np.ndarray, total: np.ndarray, intra: np.ndarray,
                   floor: np.float32, low: np.float32, high: np.float32, index: np.ndarray,
                   product: np.ndarray, weight: np.ndarray, clipped: np.ndarray) -> int:
    """The entries whose PCB score Bⱼ = intraⱼ·tanh(τⱼ·totalⱼ) may reach `floor`: their
    indices, products τⱼ·totalⱼ (the bits of torch's `mul`), intraⱼ and clipped task vector
    sign(τⱼ)·min(max(|τⱼ|, low), high) (as `pcb_combine` computes it), from the start of
    `index`, `product`, `weight` and `clipped`; returns how many. Every other entry's score
    is below `floor`.

    The bound, for x > 0: tanh(x) ≤ x/(1 + y/(3 + y/(5 + y/(7 + y/9)))), y = x² (Lambert's
    continued fraction cut after an even number of levels overestimates), which is
    x·(945 + 105y + y²)/(945 + 420y + 15y²): one division; and tanh ≤ 1 (the bound passes 1
    by x = 4, so x is capped there). For x ≤ 0, Bⱼ ≤ 0. Bounds a block at a time (a loop
    the compiler vectorizes), then the entries that pass, while the block is in cache."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    cap = np.float32(4.0)
    upper = np.empty(_BLOCK, np.float32)
    products = np.empty(_BLOCK, np.float32)
    kept = 0
    n = tau.size
    for start in range(0, n, _BLOCK):
        size = min(n, start + _BLOCK) - start
        t = tau[start:start + size]
        s = total[start:start + size]
        w = intra[start:start + size]
        for j in range(size):
            p = t[j] * s[j]
            products[j] = p
            c = min(max(p, zero), cap)
            y = c * c
            bound = c * (np.float32(945.0) + y * (np.float32(105.0) + y)) / (
                np.float32(945.0) + y * (np.float32(420.0) + np.float32(15.0) * y))
            upper[j] = w[j] * min(bound, one) * _BOUND_SLACK if p > zero else zero
        first = kept
        for j in range(size):  # (no branch to mispredict; a NaN bound keeps the entry)
            index[kept] = start + j
            kept += 0 if upper[j] < floor else 1
        for m in range(first, kept):
            j = index[m] - start
            product[m] = products[j]
            weight[m] = w[j]
            clipped[m] = _clipped(t[j], low, high)
    return kept


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def pcb_sparse_combine(base: np.ndarray, clipped: tuple[np.ndarray, ...],
                       index: tuple[np.ndarray, ...], scores: tuple[np.ndarray, ...],
                       rows: np.ndarray, lambda_: np.float32, out: np.ndarray) -> None:
    """`pcb_combine` where each task's scores and clipped task vector are known only at
    `index[i]` (`scores[i]`, `clipped[i]`: `pcb_candidates`), every other entry's score being
    below its threshold: Sᵢ = 0 there, whose terms (±0) change neither sum (both start at
    +0, and x + ±0 = x), so they are skipped; the rest is the same float32 arithmetic in the
    same task order."""
    tiny = np.float32(1e-12)
    n = base.size
    numerator = np.zeros(n, np.float32)
    denominator = np.zeros(n, np.float32)
    for i in range(len(clipped)):
        threshold, span, _, _, w = _pcb_row(rows, i)
        c = clipped[i]
        where = index[i]
        b = scores[i]
        for m in range(where.size):
            j = where[m]
            soft = (max(b[m], threshold) - threshold) / span
            numerator[j] += w * soft * c[m]
            denominator[j] += soft
    for j in range(n):
        out[j] = base[j] + lambda_ * numerator[j] / max(denominator[j], tiny)
