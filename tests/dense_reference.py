"""An independent, deliberately naive reference for the baseline merge methods.

Written from the "Baselines" table of design/methods.md and mergekit's documented
semantics, in plain Python loops over flattened float64 lists. It never calls
`mergekit_pcb`; tests compare the package against it.

Conventions (mergekit's generalized task arithmetic):
- τᵢ = θᵢ − θ₀, computed in the inputs' dtype (as the package does), then widened to float64.
- trim (TIES): keep the ⌊density·numel⌋ entries of largest |τ| per tensor; among equal
  magnitudes straddling the cut, mergekit's choice (torch's descending argsort); density ≥ 1
  keeps everything, density ≤ 0 nothing. Global scope keeps every tie at the threshold.
  Where ⌊density·numel⌋ = 0 < density, one entry is kept (mergekit refuses such a trim
  outright; the package documents keeping one, which agrees with mergekit wherever mergekit
  runs). With `scope: global` the same selection runs over each task's concatenated tensors.
- weights multiply the (trimmed / dropped) task vectors before the sign election;
  γ = sign(Σ wᵢτᵢ) with a zero sum electing +1; an entry agrees when wᵢτᵢ ≠ 0 and its sign
  is γ; the merge sums agreeing wᵢτᵢ and, with `normalize`, divides by the sum of the
  agreeing weights (0 → 1).
- without sign election, `normalize` divides by Σwᵢ (|Σwᵢ| < 1e-8 → 1).
- the merged delta is scaled by λ and added to θ₀.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _flat(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.detach().to(torch.float64).reshape(-1).tolist()]


def _out(values: list[float], shape: torch.Size) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def _task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[list[float]]:
    # τ in the inputs' dtype, exactly what a merge in that compute dtype starts from.
    return [_flat(m - base) for m in models]


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def ref_trim(tau: list[float], density: float, rank_dtype: torch.dtype = torch.float32,
             keep_ties: bool = False) -> list[float]:
    """TIES trim of one flattened task vector by a full sort (no selection tricks).

    The kept set is every |τ| above the k-th largest plus, when equal magnitudes straddle
    it, mergekit's choice among them: the first of `torch.argsort(descending=True)` over
    magnitudes in `rank_dtype` (float32, as mergekit ranks, or float64 for float64 inputs).
    With `keep_ties` (the package's global scope) every tie at the threshold is kept.
    """
    n = len(tau)
    if density >= 1.0:
        return list(tau)
    k = 0 if density <= 0 else max(1, math.floor(density * n))
    if k == 0:
        return [0.0] * n
    mags = [abs(x) for x in tau]
    threshold = sorted(mags, reverse=True)[k - 1]
    keep = {i for i in range(n) if mags[i] >= threshold}
    if len(keep) != k and not keep_ties:
        order = torch.argsort(torch.tensor(mags, dtype=rank_dtype), descending=True)
        keep = set(order[:k].tolist())
    return [tau[i] if i in keep else 0.0 for i in range(n)]


def rank_dtype_of(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _combine(base: list[float], taus: list[list[float]], weights: Sequence[float],
             lambda_: float, normalize: bool, consensus: bool) -> list[float]:
    out = []
    for j in range(len(base)):
        weighted = [float(w) * tau[j] for w, tau in zip(weights, taus, strict=True)]
        if consensus:
            gamma = 1 if sum(weighted) >= 0 else -1
            mixed = 0.0
            divisor = 0.0
            for w, v in zip(weights, weighted, strict=True):
                if v != 0 and _sign(v) == gamma:
                    mixed += v
                    divisor += float(w)
            if divisor == 0:
                divisor = 1.0
        else:
            mixed = sum(weighted)
            divisor = float(sum(weights))
            if abs(divisor) < 1e-8:
                divisor = 1.0
        if normalize:
            mixed /= divisor
        out.append(base[j] + lambda_ * mixed)
    return out


def ref_linear(models: Sequence[torch.Tensor], weights: Sequence[float],
               normalize: bool = True) -> torch.Tensor:
    flats = [_flat(m) for m in models]
    out = []
    for j in range(len(flats[0])):
        s = sum(float(w) * f[j] for w, f in zip(weights, flats, strict=True))
        out.append(s / float(sum(weights)) if normalize else s)
    return _out(out, models[0].shape)


def ref_task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor],
                        weights: Sequence[float], lambda_: float = 1.0,
                        normalize: bool = False) -> torch.Tensor:
    taus = _task_vectors(base, models)
    return _out(_combine(_flat(base), taus, weights, lambda_, normalize, consensus=False),
                base.shape)


def ref_ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
             densities: Sequence[float], lambda_: float = 1.0,
             normalize: bool = True) -> torch.Tensor:
    taus = [ref_trim(t, d, rank_dtype_of(base))
            for t, d in zip(_task_vectors(base, models), densities, strict=True)]
    return _out(_combine(_flat(base), taus, weights, lambda_, normalize, consensus=True),
                base.shape)


def ref_dare(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
             densities: Sequence[float], masks: Sequence[torch.Tensor], *,
             sign_consensus: bool, lambda_: float = 1.0, normalize: bool = False,
             rescale: bool = True) -> torch.Tensor:
    """DARE for GIVEN keep-masks (booleans shaped like the tensor)."""
    taus = []
    for tau, d, mask in zip(_task_vectors(base, models), densities, masks, strict=True):
        keep = [bool(x) for x in mask.reshape(-1).tolist()]
        if d >= 1.0:
            taus.append(list(tau))
            continue
        scale = 1.0 / d if rescale and d > 0 else 1.0
        taus.append([v * scale if k else 0.0 for v, k in zip(tau, keep, strict=True)])
    return _out(_combine(_flat(base), taus, weights, lambda_, normalize, sign_consensus),
                base.shape)


def ref_ties_global(bases: dict[str, torch.Tensor], models: Sequence[dict[str, torch.Tensor]],
                    weights: Sequence[float], densities: Sequence[float], lambda_: float = 1.0,
                    normalize: bool = True) -> dict[str, torch.Tensor]:
    """TIES with `scope: global`: each task's trim over all its tensors at once."""
    names = list(bases)
    sizes = [bases[n].numel() for n in names]
    trimmed_tasks = []
    for model, d in zip(models, densities, strict=True):
        concat: list[float] = []
        for n in names:
            concat += _flat(model[n] - bases[n])
        trimmed = ref_trim(concat, d, keep_ties=True)
        parts, start = {}, 0
        for n, size in zip(names, sizes, strict=True):
            parts[n] = trimmed[start:start + size]
            start += size
        trimmed_tasks.append(parts)
    return {
        n: _out(_combine(_flat(bases[n]), [t[n] for t in trimmed_tasks], weights, lambda_,
                         normalize, consensus=True), bases[n].shape)
        for n in names
    }
