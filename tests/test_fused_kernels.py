"""The fused kernels (`methods/fused_kernel.py`) give the bits of the torch code they stand in
for, and the staged loader uses them only once they are checked."""

from __future__ import annotations

import random

import pytest
import torch

from mergekit_pcb.methods import ops
from mergekit_pcb.methods.compiled import StagedKernel
from mergekit_pcb.threads import torch_threads


@pytest.fixture(scope="module")
def kernel():
    loaded = ops.FUSED.wait(timeout=300)
    assert loaded is not None, "the fused kernels did not load or did not match torch"
    return loaded


def _torch_path(fn, *args, **kwargs):
    """`fn` with the fused kernels unloaded: the torch code."""
    kept = ops.FUSED._kernel
    ops.FUSED._kernel = None
    try:
        return fn(*args, **kwargs)
    finally:
        ops.FUSED._kernel = kept


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_combine_by_hand(kernel):
    """Three tasks, four entries: sign election, disjoint mean, λ, as methods.md."""
    base = torch.tensor([1.0, 0.0, -1.0, 2.0])
    deltas = [torch.tensor([0.5, -1.0, 0.0, 0.25]),
              torch.tensor([-0.25, -2.0, 0.0, -0.5]),
              torch.tensor([1.0, 3.0, 0.0, 0.0])]
    out = ops._run_combine(kernel, base, deltas, [1.0, 1.0, 1.0], 2.0, True, True)
    # entry 0: Σ = 1.25 > 0 → mean of 0.5 and 1.0 = 0.75; entry 1: Σ = 0 elects +, only 3.0
    # agrees; entry 2: nothing agrees (divisor 1) → 0; entry 3: Σ = −0.25 → −0.5 alone
    assert out.tolist() == [1.0 + 2 * 0.75, 0.0 + 2 * 3.0, -1.0, 2.0 - 2 * 0.5]
    plain = ops._run_combine(kernel, base, deltas, [0.5, 1.0, 0.5], 1.0, False, False)
    assert plain.tolist() == [1.0 + 0.25 - 0.25 + 0.5, -0.5 - 2.0 + 1.5, -1.0, 2.125 - 0.5]


def test_combine_matches_torch_on_every_shape_and_flag(kernel):
    """Fused against torch on one thread: 1–15 tasks, tensors split in torch's 64K chunks
    and not, every tail length class, zero and negative weights, all flags."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    shapes = [(4096,), (4099,), (70_001,), (300, 517), (1 << 17,), ((1 << 17) + 33,)]
    with torch_threads(1):
        for case in range(48):
            m = case % 15 + 1
            shape = shapes[case % len(shapes)]
            base = torch.randn(shape, generator=g)
            deltas = [torch.randn(shape, generator=g)
                      * torch.exp(3 * torch.randn(shape, generator=g)) for _ in range(m)]
            for d in deltas:
                d[d.abs() < 0.5] = 0
            weights = [rng.choice([1.0, 0.5, -0.7, 2.0, 0.0]) for _ in range(m)]
            flags = dict(lambda_=rng.choice([1.0, 0.9]), normalize=rng.random() < 0.5,
                         sign_consensus=rng.random() < 0.6)
            fused = ops._fused_combine(base, deltas, weights, flags["lambda_"],
                                       flags["normalize"], flags["sign_consensus"])
            assert fused is not None
            expected = _torch_path(ops.combine_task_vectors, base, deltas, weights, **flags)
            assert _same_bits(fused, expected), (m, shape, weights, flags)


def test_the_tail_columns_take_torchs_other_order(kernel):
    """torch sums the columns past the last whole group of vectors in another order; on
    rows (1, 2⁻²⁴, 2⁻²⁴, 0, −1) the two orders give 0 and 2⁻²³, so a kernel that summed
    every column in row order would differ from torch in the tail."""
    n = 4096 + 37
    rows = [torch.full((n,), v) for v in (1.0, 2.0**-24, 2.0**-24, 0.0, -1.0)]
    base = torch.zeros(n)
    with torch_threads(1):
        expected = _torch_path(ops.combine_task_vectors, base, rows, [1.0] * 5)
        fused = ops._fused_combine(base, rows, [1.0] * 5, 1.0, False, False)
    tail = n % ops._TAIL[0]
    assert tail > 0 and int(torch.count_nonzero(expected)) == tail
    assert fused is not None and _same_bits(fused, expected)


def test_torch_keeps_what_the_kernel_does_not_reproduce(kernel):
    """More than one torch thread, 16 or more tasks, small tensors, other dtypes: torch."""
    base = torch.zeros(8192)
    deltas = [torch.ones(8192)] * 3
    with torch_threads(2):
        assert ops._fused_combine(base, deltas, [1.0] * 3, 1.0, True, True) is None
    with torch_threads(1):
        assert ops._fused_combine(base, deltas, [1.0] * 3, 1.0, True, True) is not None
        assert ops._fused_combine(base, [torch.ones(8192)] * 16, [1.0] * 16, 1.0, True,
                                  True) is None
        assert ops._fused_combine(base[:100], [d[:100] for d in deltas], [1.0] * 3, 1.0, True,
                                  True) is None
        assert ops._fused_combine(base.double(), [d.double() for d in deltas], [1.0] * 3,
                                  1.0, True, True) is None


def test_trim_matches_torch(kernel):
    """The TIES trim by histogram kernels against torch's, including −0 for dropped
    negative entries; with equal magnitudes at the cut the kernel declines and the
    tie-break decides, as before."""
    g = torch.Generator().manual_seed(2)
    for shape, density, coarse in (((4096,), 0.5, False), ((70_001,), 0.1, False),
                                   ((300, 517), 0.9, False), ((1 << 20,), 0.01, False),
                                   ((300, 517), 0.5, True), ((70_001,), 0.2, True)):
        d = torch.randn(shape, generator=g)
        if coarse:  # magnitudes in steps of 1/8: ties at every cut
            d = (d * 8).round() / 8
        n = d.numel()
        k = max(1, int(density * n))
        fused = ops._fused_trim(d, k, kernel)
        expected = _torch_path(ops.magnitude_trim, d, density)
        assert (fused is None) == coarse
        if fused is not None:
            assert _same_bits(fused, expected)
            assert int(torch.count_nonzero(fused)) == k
        assert _same_bits(ops.magnitude_trim(d, density), expected)


def test_staged_kernel_loads_after_enough_work_and_only_when_checked():
    loads: list[str] = []

    def load() -> str:
        loads.append("load")
        return "kernel"

    staged = StagedKernel("probe", 100, load, lambda k: k == "kernel")
    staged.count(60)
    assert staged.ready() is None and loads == []  # below the threshold: not loading
    staged.count(60)
    assert staged.wait(timeout=30) == "kernel" and loads == ["load"]
    staged.count(1000)
    assert loads == ["load"]  # loaded once
    refused = StagedKernel("refused", 0, load, lambda k: False)
    assert refused.wait(timeout=30) is None
    broken = StagedKernel("broken", 0, lambda: 1 / 0, lambda k: True)
    assert broken.wait(timeout=30) is None


def test_a_merge_gives_the_same_bits_before_and_after_the_kernels_load(kernel):
    """The kernels load on a background thread while merges run: which merges use them
    must not show in the results."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50_000, generator=g)
    models = [base + 0.01 * torch.randn(50_000, generator=g) for _ in range(4)]
    from mergekit_pcb.methods.ties import ties_merge

    with torch_threads(1):
        fused = ties_merge(base, models, [1.0, 0.5, 1.0, 2.0], [0.3] * 4)
        plain = _torch_path(ties_merge, base, models, [1.0, 0.5, 1.0, 2.0], [0.3] * 4)
    assert _same_bits(fused, plain)
