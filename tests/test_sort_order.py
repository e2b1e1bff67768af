"""`sort_order.descending_top` keeps exactly what `torch.argsort(descending=True)[:k]`
keeps, without the sort: checked against torch itself on inputs full of ties."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mergekit_pcb.methods import sort_order
from mergekit_pcb.methods.compiled import StagedKernel
from mergekit_pcb.methods.sort_order import descending_top, descending_top_bits, introsort_top


def torch_top(values: torch.Tensor, k: int) -> np.ndarray:
    return np.sort(torch.argsort(values, descending=True)[:k].numpy())


def arrays(seed: int) -> list[torch.Tensor]:
    """Sizes around the insertion-sort threshold and up to 300K; few or many distinct
    values; random, sorted, reversed, constant and organ-pipe arrangements."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (1, 2, 16, 17, 18, 33, 1000, 4099, 65_536, 300_000):
        for distinct in (1, 2, 5, 300, 10**9):
            v = torch.randint(0, min(distinct, 2**31 - 1), (n,), generator=g).float()
            out.append(v)
        out.append(torch.sort(out[-2]).values)
        out.append(torch.sort(out[-3], descending=True).values)
        half = torch.sort(out[-4][: n // 2]).values
        out.append(torch.cat([half, half.flip(0), out[-4][n // 2 * 2:]]))
    out.append((0.01 * torch.randn(200_000, generator=g)).bfloat16().abs().float())
    out.append((0.01 * torch.randn(50_000, generator=g)).double().round(decimals=3).abs())
    return out


IMPLEMENTATIONS = {"numpy": sort_order.introsort_top_numpy,
                   "compiled": sort_order.introsort_top_compiled}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each implementation of the emulation in place of the staged one."""
    monkeypatch.setattr(sort_order, "introsort_top", IMPLEMENTATIONS[request.param])
    return str(request.param)


@pytest.mark.parametrize("seed", [0, 1])
def test_descending_top_is_torchs_choice(seed: int, implementation: str) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    checked = 0
    for values in arrays(seed):
        n = values.numel()
        ks = {1, n // 2, n - 1, int(torch.randint(1, max(2, n), (1,), generator=g))}
        for k in sorted(x for x in ks if 0 < x < n):
            got = descending_top(values, k)
            assert np.array_equal(np.sort(got.numpy()), torch_top(values, k)), (n, k)
            checked += 1
    assert checked > 100


def test_the_emulation_is_what_runs_here() -> None:
    # torch's CPU sort on this platform is the one emulated: no call falls back to it.
    assert sort_order._emulation_matches_torch()
    values = (0.01 * torch.randn(100_000, generator=torch.Generator().manual_seed(3))
              ).bfloat16().abs().float()
    top = introsort_top(values.numpy(), 40_000)
    assert top is not None
    assert np.array_equal(np.sort(top), torch_top(values, 40_000))


def test_exhausted_depth_and_unknown_sorts_use_torchs_sort(monkeypatch) -> None:
    values = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(4)).float()
    # a range still holding the k-th place when the depth limit runs out: no answer
    assert introsort_top(values.numpy(), 2500, depth_limit=1) is None
    monkeypatch.setattr(sort_order, "introsort_top", lambda *a, **k: None)
    assert np.array_equal(np.sort(descending_top(values, 2500).numpy()),
                          torch_top(values, 2500))

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("emulated although the probe disagreed")

    monkeypatch.setattr(sort_order, "introsort_top", never)
    monkeypatch.setattr(sort_order, "_emulation_matches_torch", lambda: False)
    assert np.array_equal(np.sort(descending_top(values, 1234).numpy()),
                          torch_top(values, 1234))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bits_rank_as_their_float32_values(dtype: torch.dtype,
                                                          implementation: str) -> None:
    # mergekit ranks bf16/fp16 magnitudes upcast to float32; the emulation ranks their bits.
    g = torch.Generator().manual_seed(5)
    for n, scale in ((1000, 1.0), (70_001, 0.002), (300_000, 0.01)):
        values = (scale * torch.randn(n, generator=g)).to(dtype).abs()
        bits = values.view(torch.int16)
        for k in (1, n // 3, n - 1):
            got = descending_top_bits(bits, dtype, k)
            assert np.array_equal(np.sort(got.numpy()), torch_top(values.float(), k)), (n, k)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_exhausted_depth_gives_no_answer_in_both(name: str) -> None:
    values = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(4)).float()
    assert IMPLEMENTATIONS[name](values.numpy(), 2500, depth_limit=1) is None
    top = IMPLEMENTATIONS[name](values.numpy(), 2500, depth_limit=40)
    assert top is not None and np.array_equal(np.sort(top), torch_top(values, 2500))


def test_block_scans_cover_every_boundary() -> None:
    # sizes around the kernel's block (128) and twice it, where the block scans hand over to
    # the scalar ones, with a pivot value that is common, rare or absent
    g = torch.Generator().manual_seed(6)
    for n in (255, 256, 257, 258, 383, 384, 385, 511, 512, 513, 640, 1025, 4097):
        for distinct in (2, 3, 17, 10**6):
            values = torch.randint(0, distinct, (n,), generator=g).float()
            for k in (1, n // 4, n // 2, n - 1):
                top = sort_order.introsort_top_compiled(values.numpy(), k)
                assert top is not None
                assert np.array_equal(np.sort(top), torch_top(values, k)), (n, distinct, k)


def _fresh_kernel(after: int, load: str | object = sort_order.INTROSORT_KERNEL
                  ) -> StagedKernel:
    return StagedKernel("introsort-kernel", after, load,  # type: ignore[arg-type]
                        sort_order._compiled_matches_numpy, register=False)


def test_the_kernel_is_loaded_once_tie_breaks_pay_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # below the threshold only numpy runs; past it the kernel loads in the background and
    # is used from then on, with the same entries
    kernel = _fresh_kernel(10_000)
    monkeypatch.setattr(sort_order, "KERNEL", kernel)
    values = torch.randint(0, 9, (6000,), generator=torch.Generator().manual_seed(7)).float()
    expected = torch_top(values, 3000)
    assert np.array_equal(np.sort(sort_order.introsort_top(values.numpy(), 3000)), expected)
    assert kernel._loader is None
    assert np.array_equal(np.sort(sort_order.introsort_top(values.numpy(), 3000)), expected)
    assert kernel._loader is not None
    assert kernel.wait(timeout=300) is not None
    called = []
    monkeypatch.setattr(sort_order, "introsort_top_numpy",
                        lambda *a, **k: called.append(1))  # would fail the check below
    assert np.array_equal(np.sort(sort_order.introsort_top(values.numpy(), 3000)), expected)
    assert not called


def test_without_a_kernel_numpy_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # numba missing or unable to compile: the loader gives up quietly, numpy goes on
    def missing() -> None:
        raise ImportError("no numba here")

    kernel = _fresh_kernel(0, missing)
    monkeypatch.setattr(sort_order, "KERNEL", kernel)
    values = torch.randint(0, 9, (6000,), generator=torch.Generator().manual_seed(8)).double()
    for _ in range(2):
        top = sort_order.introsort_top(values.numpy(), 2000)
        assert np.array_equal(np.sort(top), torch_top(values, 2000))
    assert kernel.wait(timeout=60) is None


def test_exit_waits_for_a_loading_kernel() -> None:
    # a process that ends while the kernel compiles waits for it (a compiler stopped by
    # interpreter shutdown can crash the process): the check registered first runs last
    code = """
import atexit, sys
import numpy as np
atexit.register(lambda: print("ready" if so.KERNEL.ready() else "not ready", flush=True))
from mergekit_pcb.methods import sort_order as so
so.KERNEL.after = 0
so.introsort_top(np.random.default_rng(0).integers(0, 9, 5000).astype(np.float64), 100)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ready"


def test_the_load_check_runs_the_kernel_it_is_given() -> None:
    """`StagedKernel` checks the module it loaded, not whatever an import finds: a kernel
    that places the wrong entries first fails the check."""
    import importlib
    import types

    def reversed_top(keys: np.ndarray, index: np.ndarray, k: int, depth: int,
                     small: int) -> bool:
        index[:] = index[::-1].copy()  # the last entries first: not std::sort's top
        return True

    wrong = types.SimpleNamespace(top_in_place=reversed_top)
    assert not sort_order._compiled_matches_numpy(wrong)  # type: ignore[arg-type]
    assert sort_order._compiled_matches_numpy(
        importlib.import_module(sort_order.INTROSORT_KERNEL))


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_in_place_partitions_the_keys_themselves_and_keeps_the_same_entries(name: str) -> None:
    """`in_place` (a trim's own magnitude): the same entries as from a copy, the keys
    themselves partitioned, and the positions as int32 (half of int64's memory)."""
    g = torch.Generator().manual_seed(11)
    values = torch.randint(0, 40, (70_001,), generator=g).float()
    for k in (1, 20_000, 70_000):
        keys = values.numpy().copy()
        top = IMPLEMENTATIONS[name](keys, k, in_place=True)
        assert top is not None and top.dtype == np.int32
        assert np.array_equal(np.sort(top), torch_top(values, k))
        assert not np.array_equal(keys, values.numpy())  # partitioned where they lie


def test_with_again_the_fallback_sorts_the_values_made_anew(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the emulation gives up (introsort's depth limit), torch's sort runs on
    `again()`, not on the keys it has already partitioned."""
    g = torch.Generator().manual_seed(12)
    values = torch.randint(0, 30, (10_000,), generator=g).float()
    scrambled = values.flip(0).clone()  # what a partition leaves: the same values elsewhere
    monkeypatch.setattr(sort_order, "introsort_top", lambda *a, **kw: None)
    got = descending_top(scrambled, 3_000, again=lambda: values.clone())
    assert torch.equal(got, torch.argsort(values, descending=True)[:3_000])
    bits = values.bfloat16().view(torch.int16)
    got = descending_top_bits(bits.flip(0).clone(), torch.bfloat16, 3_000,
                              again=lambda: bits.clone())
    assert torch.equal(got, torch.argsort(values.bfloat16().float(), descending=True)[:3_000])
