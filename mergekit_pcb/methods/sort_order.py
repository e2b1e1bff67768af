"""Which entries torch's CPU sort puts first, found without sorting.

mergekit trims a task vector with `torch.argsort(|τ|, descending=True)[:k]`. When equal
magnitudes straddle the k-th place (common: 2 of 3 models' 4M-entry embeddings in the 30M
bench, almost every bf16 tensor), which of the equal entries survive is whatever torch's
sort does with them, and to stay bit-identical we must keep the same ones.

On the CPU, torch sorts a float tensor with `std::sort` over (value, index) pairs, comparing
values only: libstdc++'s introsort. Its median-of-three quicksort partitions a range, goes
on into both halves, and ends with an insertion sort that never moves an entry past an
equal one. Only the partitions of the ranges that contain the k-th place decide which
entries end up before it, and a partition is vectorised exactly: Hoare's scans pair the
i-th entry ≤ pivot from the left with the i-th entry ≥ pivot from the right while they have
not crossed. So the kept set costs a few passes over n + n/2 + n/4 ... entries (numpy's
`flatnonzero` and fancy indexing) instead of a sort of n entries: 4–5× faster on 11.5M.
A compiled kernel (`introsort_kernel`, numba) runs the same partitions in place, with
branch-free block scans, several times faster again; a process loads it once its
tie-breaks are large enough to pay for loading it.

That this is the sort torch runs is checked once per process on a probe full of ties, and
with another library sort (another platform's standard library, a future torch) every call
falls back to `torch.argsort` itself; so does a range that exhausts introsort's depth
limit (its heapsort is not emulated).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch

from mergekit_pcb.methods.compiled import StagedKernel

# libstdc++'s _S_threshold: ranges of at most this many entries are left to the final
# insertion sort.
INSERTION_SORT_MAX = 16


def descending_top(values: torch.Tensor, k: int,
                   again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """The positions `torch.argsort(values, descending=True)[:k]` holds, in some order
    (int32 below 2³¹ entries).

    `values` is a 1-D CPU tensor without NaN (magnitudes of finite task vectors). With
    `again` (which makes `values` anew), `values` itself is partitioned, not a copy of it
    (one tensor's worth less), and the sort that runs where the emulation does not apply
    sorts `again()`.
    """
    emulated = values.dtype in (torch.float32, torch.float64)
    return _top(values if emulated else None, k, again or (lambda: values), again is not None)


def descending_top_bits(bits: torch.Tensor, dtype: torch.dtype, k: int,
                        again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """`descending_top` of the float16/bfloat16 magnitudes whose bits are `bits` (int16, no
    sign bit set), ranked as mergekit ranks them, upcast to float32. The bits order them as
    their values do, and the sort compares nothing else: the emulation runs on the bits.
    `again`, as for `descending_top`, makes `bits` anew."""
    source = again or (lambda: bits)
    return _top(bits, k, lambda: source().view(dtype).float(), again is not None)


def _top(keys: torch.Tensor | None, k: int, ranked: Callable[[], torch.Tensor],
         in_place: bool = False) -> torch.Tensor:
    """The emulated top k of `keys` (ordered as `ranked()`), or torch's own sort of
    `ranked()` where the emulation does not apply: no keys, not on the CPU, k outside
    (0, n), another sort than libstdc++'s, or introsort's depth limit reached. `in_place`:
    `keys` may be partitioned (`ranked()` does not read them)."""
    if (keys is not None and keys.device.type == "cpu" and keys.dim() == 1
            and 0 < k < keys.numel() and _emulation_matches_torch()):
        top = introsort_top(keys.numpy(), k, in_place=in_place)
        if top is not None:
            return torch.from_numpy(top)
    return torch.argsort(ranked(), descending=True)[:k]


def introsort_top(values: np.ndarray, k: int, depth_limit: int | None = None,
                  in_place: bool = False) -> np.ndarray | None:
    """The indices libstdc++'s `std::sort` (descending by value) places in [0, k), or None
    when a range containing the k-th place would exhaust `depth_limit` (2⌊log₂ n⌋ as
    `std::sort` sets it) and fall to heapsort.

    Two implementations give the same entries: numpy's vectorised passes, and a compiled
    kernel (`introsort_kernel`, numba) several times faster on millions of entries. Loading
    numba and the kernel costs about a second, more than a small merge's tie-breaks take:
    so the kernel is loaded in the background once this process has tie-broken
    `COMPILE_AFTER` entries (or an evolution asks for every kernel), checked against numpy
    on every key type, and used from then on (`compiled.StagedKernel`).

    The positions come as the index type (int32 below 2³¹ entries), copied out of the
    index. `in_place`: partition `values` itself (the caller is done with it), not a copy."""
    kernel = KERNEL.ready()
    if kernel is not None and values.size < 2**31:
        return introsort_top_compiled(values, k, depth_limit, kernel, in_place=in_place)
    KERNEL.count(values.size)
    return introsort_top_numpy(values, k, depth_limit, in_place=in_place)


# Entries tie-broken with numpy before the compiled kernel is loaded (a 1B-parameter merge
# passes this within its first tensors; a 30M one never does).
COMPILE_AFTER = 1 << 25
# The key types the tie-breaks use: bf16/fp16 bits, float32 and float64 magnitudes.
KEY_TYPES = (np.dtype(np.int16), np.dtype(np.float32), np.dtype(np.float64))


def _compiled_matches_numpy(kernel: ModuleType) -> bool:
    """The loaded kernel (compiled now for each key type) against the numpy emulation."""
    rng = np.random.default_rng(0)
    for dtype in KEY_TYPES:
        for n, distinct in ((17, 3), (4099, 7), (65_537, 1000)):
            values = rng.integers(0, distinct, n).astype(dtype)
            for k in (1, n // 3, n - 1):
                top = introsort_top_compiled(values, k, kernel=kernel)
                expected = introsort_top_numpy(values, k)
                if top is None or expected is None \
                        or not np.array_equal(np.sort(top), np.sort(expected)):
                    return False
    return True


INTROSORT_KERNEL = "mergekit_pcb.methods.introsort_kernel"
KERNEL = StagedKernel("introsort-kernel", COMPILE_AFTER, INTROSORT_KERNEL,
                      _compiled_matches_numpy)


def _start(values: np.ndarray, depth_limit: int | None, in_place: bool
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """What both implementations partition in place, as the sort does: the keys (a copy,
    unless `in_place`), their positions, and the depth limit (2⌊log₂ n⌋ as `std::sort`
    sets it)."""
    n = values.size
    index = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    depth = 2 * (n.bit_length() - 1) if depth_limit is None else depth_limit
    return values if in_place else values.copy(), index, depth


def introsort_top_compiled(values: np.ndarray, k: int, depth_limit: int | None = None,
                           kernel: ModuleType | None = None, in_place: bool = False
                           ) -> np.ndarray | None:
    """`introsort_top` by the compiled kernel (numba must import): `kernel`, or the module
    imported (once loaded, a cached import)."""
    top_in_place = (kernel or importlib.import_module(INTROSORT_KERNEL)).top_in_place
    keys, index, depth = _start(values, depth_limit, in_place)
    if not top_in_place(keys, index, k, depth, INSERTION_SORT_MAX):
        return None
    return index[:k].copy()  # not a view: the whole index is freed


def introsort_top_numpy(values: np.ndarray, k: int, depth_limit: int | None = None,
                        in_place: bool = False) -> np.ndarray | None:
    """`introsort_top` with numpy: each partition as a few vectorised passes."""
    keys, index, depth = _start(values, depth_limit, in_place)
    kept: list[np.ndarray] = []
    place = k  # the k-th place, relative to the current range
    while keys.size > INSERTION_SORT_MAX:
        if depth == 0:
            return None
        depth -= 1
        cut, to_right, to_left = _partition(keys, index)
        # Each side needs only its own half of the swaps: the other side is dropped, or
        # kept whole, and then only its indices matter.
        if place <= cut:  # the range right of the cut lies past the k-th place
            keys[to_right] = keys[to_left]
            index[to_right] = index[to_left]
            keys, index = keys[:cut], index[:cut]
            if place == cut:
                return np.concatenate([*kept, index])
        else:  # the range left of the cut lies before it: all kept
            moved = index[to_right]
            index[to_right] = index[to_left]
            keys[to_left] = keys[to_right]
            index[to_left] = moved
            kept.append(index[:cut])
            keys, index = keys[cut:], index[cut:]
            place -= cut
    # the final insertion sort: stable, and it keeps this range's entries inside it
    order = np.argsort(-keys, kind="stable")
    return np.concatenate([*kept, index[order[:place]]])


# Entries compared at once when listing a scan's stops.
STOPS_BLOCK = 1 << 20


def _stops(body: np.ndarray, stops: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The positions (from 1: `body` starts at the range's second entry) where
    `stops(body)` holds, ascending: int32 below 2³¹ entries, counted and then written a
    block at a time, so that no int64 array as long as the range is made (about half the
    range stops on each side)."""
    if body.size + 1 >= 2**31:
        found = np.flatnonzero(stops(body))
        found += 1
        return found
    starts = range(0, body.size, STOPS_BLOCK)
    counts = [int(np.count_nonzero(stops(body[a:a + STOPS_BLOCK]))) for a in starts]
    out = np.empty(sum(counts), dtype=np.int32)
    at = 0
    for a, count in zip(starts, counts, strict=True):
        out[at:at + count] = np.flatnonzero(stops(body[a:a + STOPS_BLOCK]))
        out[at:at + count] += a + 1
        at += count
    return out


def _partition(keys: np.ndarray, index: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """libstdc++'s `__unguarded_partition_pivot` with `greater` as the comparison, on views
    of the current range: moves the median of three to the front, and returns the cut (the
    start of the right-hand range) and the positions the scans swap, pair by pair (the
    caller applies the swaps it needs)."""
    size = keys.size
    mid = size // 2
    a, b, c = keys[1], keys[mid], keys[size - 1]
    # __move_median_to_first(first, first + 1, mid, last - 1)
    if a > b:
        pick = mid if b > c else (size - 1 if a > c else 1)
    elif a > c:
        pick = 1
    else:
        pick = size - 1 if b > c else mid
    keys[0], keys[pick] = keys[pick], keys[0]
    index[0], index[pick] = index[pick], index[0]
    pivot = keys[0]
    body = keys[1:]
    # The left scan stops at entries ≤ pivot, the right scan at entries ≥ pivot. Until they
    # cross, the t-th stop of each is the t-th such entry of the untouched range.
    left = _stops(body, lambda block: block <= pivot)
    right = _stops(body, lambda block: block >= pivot)  # the scan takes them from the end
    n_left, n_right = left.size, right.size
    lo, hi = 0, min(n_left, n_right)
    while lo < hi:  # swaps: the first t whose left stop is not before its right stop
        t = (lo + hi) // 2
        if left[t] < right[n_right - 1 - t]:
            lo = t + 1
        else:
            hi = t
    swaps = lo
    if swaps == 0:
        return int(left[0]), left[:0], left[:0]
    # After the last swap the left scan stops at the next entry ≤ pivot, or at the last
    # right stop, which now holds one.
    cut = int(right[n_right - swaps])
    if swaps < n_left:
        cut = min(cut, int(left[swaps]))
    return cut, left[:swaps], right[n_right - swaps:][::-1]


@functools.cache
def _emulation_matches_torch() -> bool:
    """True when `introsort_top` picks what this torch's sort picks, on probes whose cuts
    fall among many equal values (so that any other sort would almost surely differ)."""
    g = torch.Generator().manual_seed(0)
    for n, distinct in ((4099, 7), (20_011, 40), (65_537, 1000)):
        values = torch.randint(0, distinct, (n,), generator=g).to(torch.float32)
        for k in (1, n // 3, n // 2, n - 1):
            expected = torch.argsort(values, descending=True)[:k]
            top = introsort_top(values.numpy(), k)
            if top is None or not np.array_equal(np.sort(top), np.sort(expected.numpy())):
                return False
    return True


__all__ = ["descending_top", "descending_top_bits", "introsort_top", "introsort_top_compiled",
           "introsort_top_numpy"]
