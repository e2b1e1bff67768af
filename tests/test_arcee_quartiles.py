"""arcee_fusion's quartiles: exact order statistics at mergekit's indices, at any size.

Against `torch.quantile(..., interpolation="lower")` (the same float32 ranks, up to the
2²⁴ entries it accepts) and a sort beyond, and the merge over 10⁶ entries against
mergekit's rule without its sample.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_pcb.methods.arcee_fusion import QUANTILES, arcee_fusion, importance, quartiles


def lower_quantiles(x: torch.Tensor) -> list[float]:
    return torch.quantile(x.reshape(-1).float(), torch.tensor(QUANTILES),
                          interpolation="lower").tolist()


@pytest.mark.parametrize("n", [1, 2, 7, 4097, 1_000_000, 1_000_001, 5_600_002])
def test_quartiles_equal_torch_quantile_lower(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).abs() * 1e-3
    x[: n // 3] = x[n // 2]  # ties across a quartile
    got = quartiles(x)
    assert [float(v) for v in got] == lower_quantiles(x)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in got)


def test_float32_rank_rounding_is_kept() -> None:
    """Past about 5.6·10⁶ entries q·(n − 1) rounds in float32 (here 4200000.75 → 4200001):
    mergekit's and torch.quantile's index, not the exact floor."""
    n = 5_600_002
    x = torch.arange(n, dtype=torch.float32).flip(0)  # sorted: the value is its index
    assert [float(v) for v in quartiles(x)] == [1400000.0, 2800000.0, 4200001.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quartiles_in_the_scores_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(30_001, generator=g) * 3).to(dtype)
    ordered = x.sort().values
    want = [ordered[i] for i in (7500, 15000, 22500)]
    got = quartiles(x)
    assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_quartiles_beyond_what_torch_quantile_takes() -> None:
    """2²⁴ + 784 entries: each of 1000 values 16,778 times, in cycles (unsorted)."""
    n = 1000 * 16_778
    x = (torch.arange(n, dtype=torch.int32) % 1000).to(torch.float32)
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)
    ranks = (torch.tensor(QUANTILES) * (n - 1)).long().tolist()
    assert [float(v) for v in quartiles(x)] == [float(r // 16_778) for r in ranks]


def test_quartiles_with_nan_sort_it_last() -> None:
    """As torch's sort: every NaN after the numbers, whatever its sign bit."""
    x = torch.tensor([float("nan"), 3.0, 1.0, -float("nan"), 2.0, 0.5, 4.0, 5.0, 6.0])
    got = [float(v) for v in quartiles(x)]  # ranks 2, 4, 6 of 0.5 1 2 3 4 5 6 nan nan
    assert got == [2.0, 4.0, 6.0]
    assert math.isnan(float(quartiles(x[:5])[2]))  # ranks 1, 2, 3 of 1 2 3 nan nan


def test_merge_over_a_million_entries_is_mergekit_rule_on_every_entry() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(1200, 1000, generator=g)
    model = base + 0.1 * torch.randn(1200, 1000, generator=g)
    scores = importance(model, base)
    s = scores.reshape(-1).sort().values
    idx = (torch.tensor(QUANTILES) * (s.numel() - 1)).long()
    q1, med, q3 = s[idx]
    want = base + (model - base) * (scores >= med + 1.5 * (q3 - q1)).float()
    got = arcee_fusion(base, model)
    assert torch.equal(got, want)
    assert 0 < int((got != base).sum()) < base.numel() // 4
