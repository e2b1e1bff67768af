"""`sort_order`'s emulation of libstdc++'s introsort, compiled with numba: the same
partitions as the numpy version, done in place one entry at a time, as `std::sort` does them
(a pass over n + n/2 + n/4 ... entries with no temporaries; several times faster on
millions of entries). Imported only when a tie-break needs it, so that importing the package
does not import numba."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _swap(keys: np.ndarray, index: np.ndarray, i: int, j: int) -> None:
    keys[i], keys[j] = keys[j], keys[i]
    index[i], index[j] = index[j], index[i]


# Entries per block of the branch-free scans below.
_BLOCK = 128


@numba.njit(cache=True, nogil=True)
def _partition_pivot(keys: np.ndarray, index: np.ndarray, first: int, last: int) -> int:
    """`__unguarded_partition_pivot` with `greater` as the comparison, on [first, last).

    Hoare's scans swap the t-th entry ≤ pivot from the left with the t-th entry ≥ pivot
    from the right until they cross. While the two ends are far apart, each end's stops are
    found a block at a time without branches (BlockQuicksort's idea) and swapped pair by
    pair in that same order; the last stretch runs the scalar scans from where the blocks
    left off. The swaps, and so the result, are the scalar loop's."""
    mid = first + (last - first) // 2
    a, b, c = first + 1, mid, last - 1
    # __move_median_to_first(first, a, b, c)
    if keys[a] > keys[b]:
        if keys[b] > keys[c]:
            pick = b
        elif keys[a] > keys[c]:
            pick = c
        else:
            pick = a
    elif keys[a] > keys[c]:
        pick = a
    elif keys[b] > keys[c]:
        pick = c
    else:
        pick = b
    _swap(keys, index, first, pick)
    pivot = keys[first]
    lo, hi = first + 1, last  # [lo, hi): not yet scanned, or stops not yet swapped
    left = np.empty(_BLOCK, dtype=np.int32)
    right = np.empty(_BLOCK, dtype=np.int32)
    n_left = n_right = at_left = at_right = 0
    while hi - lo > 2 * _BLOCK:
        if n_left == 0:
            at_left = 0
            for i in range(_BLOCK):
                left[n_left] = i
                n_left += keys[lo + i] <= pivot
        if n_right == 0:
            at_right = 0
            for i in range(_BLOCK):
                right[n_right] = i
                n_right += keys[hi - 1 - i] >= pivot
        pairs = min(n_left, n_right)
        for j in range(pairs):
            _swap(keys, index, lo + left[at_left + j], hi - 1 - right[at_right + j])
        n_left -= pairs
        n_right -= pairs
        at_left += pairs
        at_right += pairs
        if n_left == 0:
            lo += _BLOCK
        if n_right == 0:
            hi -= _BLOCK
    if n_left > 0:  # the next left stop not yet swapped
        lo += left[at_left]
    if n_right > 0:  # the next right stop, as the scalar loop's exclusive end
        hi -= right[at_right]
    while True:  # __unguarded_partition
        while keys[lo] > pivot:
            lo += 1
        hi -= 1
        while pivot > keys[hi]:
            hi -= 1
        if not lo < hi:
            return lo
        _swap(keys, index, lo, hi)
        lo += 1


@numba.njit(cache=True, nogil=True)
def top_in_place(keys: np.ndarray, index: np.ndarray, k: int, depth: int,
                 insertion_sort_max: int) -> bool:
    """Partition `keys` (and `index` with them) as `std::sort` would, following the range
    that holds the k-th place, until `index[:k]` holds what the sort puts first. False
    when that range would exhaust `depth` (the sort would fall to heapsort there). Ranges
    of at most `insertion_sort_max` entries are left to the final insertion sort
    (`sort_order.INSERTION_SORT_MAX`)."""
    first, last = 0, keys.size
    while last - first > insertion_sort_max:
        if depth == 0:
            return False
        depth -= 1
        cut = _partition_pivot(keys, index, first, last)
        if k <= cut:
            last = cut
            if k == cut:
                return True
        else:
            first = cut
    # the final insertion sort: stable, and it keeps this range's entries inside it
    for i in range(first + 1, last):
        key, at = keys[i], index[i]
        j = i
        while j > first and keys[j - 1] < key:
            keys[j] = keys[j - 1]
            index[j] = index[j - 1]
            j -= 1
        keys[j] = key
        index[j] = at
    return True
