"""`sort_order.descending_top` keeps exactly what `torch.argsort(descending=True)[:k]`
keeps, without the sort: checked against torch itself on inputs full of ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_pcb.methods import sort_order
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


@pytest.mark.parametrize("seed", [0, 1])
def test_descending_top_is_torchs_choice(seed: int) -> None:
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
def test_half_precision_bits_rank_as_their_float32_values(dtype: torch.dtype) -> None:
    # mergekit ranks bf16/fp16 magnitudes upcast to float32; the emulation ranks their bits.
    g = torch.Generator().manual_seed(5)
    for n, scale in ((1000, 1.0), (70_001, 0.002), (300_000, 0.01)):
        values = (scale * torch.randn(n, generator=g)).to(dtype).abs()
        bits = values.view(torch.int16)
        for k in (1, n // 3, n - 1):
            got = descending_top_bits(bits, dtype, k)
            assert np.array_equal(np.sort(got.numpy()), torch_top(values.float(), k)), (n, k)
