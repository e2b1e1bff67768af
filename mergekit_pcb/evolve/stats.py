"""The paired bootstrap of a difference between two models scored on the same examples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PairedInterval:
    """mean(a) − mean(b) over the examples and its percentile bootstrap interval."""

    delta: float
    low: float
    high: float
    examples: int
    level: float
    resamples: int


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, *, seed: int = 0,
                     resamples: int = 2000, level: float = 0.95) -> PairedInterval:
    """Resample the examples (the same rows for both models: the pairing) `resamples`
    times from `seed`; the interval holds the central `level` of the resampled means of
    a − b."""
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired scores of different or empty shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    diff = a.double() - b.double()
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, 2_000_000 // len(diff))  # resamples drawn at a time: bounded memory
    means = torch.cat([diff[torch.randint(len(diff), (min(chunk, resamples - k), len(diff)),
                                          generator=g)].mean(dim=1)
                       for k in range(0, resamples, chunk)])
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return PairedInterval(float(diff.mean()), float(low), float(high), len(diff), level,
                          resamples)


def one_sided_gain(trial: torch.Tensor, parent: torch.Tensor, *, maximize: bool,
                   level: float, seed: int = 0, resamples: int = 2000) -> PairedInterval:
    """The mean gain per example of `trial` over `parent` (trial − parent, or parent −
    trial for a loss) with its central 2·level − 1 bootstrap interval: the gain passes a
    one-sided test at `level` when the interval's lower end is above 0."""
    gain, base = (trial, parent) if maximize else (parent, trial)
    return paired_bootstrap(gain, base, seed=seed, resamples=resamples, level=2 * level - 1)


def guard_test(chosen: Sequence[float], start: Sequence[float], *, maximize: bool,
               level: float, seed: int) -> dict[str, Any]:
    """The guard's test of a search's result against its best start, as a run state keeps
    it: whether the chosen candidate's gain per guard example over the start passes the
    one-sided test at `level`, the gain, its interval and how many examples it rests on."""
    ci = one_sided_gain(torch.tensor(chosen), torch.tensor(start), maximize=maximize,
                        level=level, seed=seed)
    return {"passed": ci.low > 0, "gain": ci.delta, "low": ci.low, "high": ci.high,
            "examples": ci.examples, "interval_level": ci.level}


def paired_gain_holds(trial: torch.Tensor, parent: torch.Tensor, *, maximize: bool,
                      level: float, seed: int = 0, resamples: int = 2000) -> bool:
    """One-sided paired bootstrap test of a trial against its parent on the same examples:
    True when the mean gain per example (trial − parent, or parent − trial for a loss) is
    above 0 with confidence `level`, i.e. the (1 − level) quantile of the resampled mean
    gains is above 0 (the lower end of the central 2·level − 1 interval)."""
    return one_sided_gain(trial, parent, maximize=maximize, level=level, seed=seed,
                          resamples=resamples).low > 0


__all__ = ["PairedInterval", "guard_test", "one_sided_gain", "paired_bootstrap",
           "paired_gain_holds"]
