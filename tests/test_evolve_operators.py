"""Evolution operators, schedules and the population merge against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.evolve.operators import (
    Scratch,
    apply_mask,
    binomial_crossover,
    crossover_mask,
    crossover_weights,
    current_to_rand,
    current_to_rand_binomial,
    interpolate,
    rand_1,
)
from mergekit_pcb.evolve.schedule import Constant, make_schedule


def test_current_to_rand_hand_case() -> None:
    target = torch.tensor([1.0, 2.0, 3.0])
    donor = torch.tensor([3.0, 2.0, -1.0])
    # 1 + .5(3-1) = 2; 2 + .5(0) = 2; 3 + .5(-4) = 1
    assert torch.equal(current_to_rand(target, donor, 0.5), torch.tensor([2.0, 2.0, 1.0]))
    assert torch.equal(current_to_rand(target, donor, 0.0), target)
    assert torch.equal(current_to_rand(target, donor, 1.0), donor)


def test_rand_1_hand_case() -> None:
    a, b, c = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0]), torch.tensor([1.0, 2.0])
    # a + 0.5 (b - c) = [1 + 1, 1 - 1]
    assert torch.equal(rand_1(a, b, c, 0.5), torch.tensor([2.0, 0.0]))


def test_half_precision_keeps_dtype() -> None:
    target = torch.tensor([2048.0, 1.0], dtype=torch.float16)
    donor = torch.tensor([2052.0, 3.0], dtype=torch.float16)
    out = current_to_rand(target, donor, 0.5)
    assert out.dtype == torch.float16
    assert out.tolist() == [2050.0, 2.0]


def test_apply_mask_hand_case() -> None:
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mutant = torch.tensor([10.0, 20.0, 30.0, 40.0])
    mask = torch.tensor([True, False, False, True])
    assert torch.equal(apply_mask(target, mutant, mask), torch.tensor([10.0, 2.0, 3.0, 40.0]))


def _int16_draws(n: int, seed: int) -> torch.Tensor:
    """The crossover's draw written out independently: four little-endian 16-bit lanes of
    each full-range 64-bit word of the generator, as signed integers."""
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(
        -(1 << 63), None, generator=torch.Generator().manual_seed(seed))
    lanes = [((words >> (16 * k)) & 0xFFFF) for k in range(4)]
    u16 = torch.stack(lanes, dim=1).reshape(-1)[:n]
    return torch.where(u16 >= 1 << 15, u16 - (1 << 16), u16)


def test_binomial_crossover_is_a_bernoulli_cr_mask() -> None:
    target, mutant = torch.zeros(4, 5), torch.ones(4, 5)
    assert torch.equal(binomial_crossover(target, mutant, 0.0, torch.Generator()), target)
    assert torch.equal(binomial_crossover(target, mutant, 1.0, torch.Generator()), mutant)
    # The mask is each entry's 16-bit draw at or above 32768 − round(CR·65536).
    d = _int16_draws(20, seed=7).view(4, 5)
    threshold = 32768 - round(0.3 * 65536)  # 13107
    expected = (d >= threshold).float()
    out = binomial_crossover(target, mutant, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(out, expected)
    assert torch.equal(crossover_mask((4, 5), 0.3, torch.Generator().manual_seed(7)),
                       expected.bool())
    # half precision goes through the bool mask and a select: same entries
    half = binomial_crossover(target.half(), mutant.half(), 0.3,
                              torch.Generator().manual_seed(7))
    assert torch.equal(half, expected.half())
    # Same generator state, same mask; the share of mutant entries is about CR.
    big = crossover_mask((200_000,), 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(big, crossover_mask((200_000,), 0.3, torch.Generator().manual_seed(1)))
    assert abs(float(big.float().mean()) - 0.3) < 0.005


@pytest.mark.parametrize("CR", [0.5, 0.1, 0.9, 1 / 65536])
def test_crossover_weights_follow_the_mask(CR: float) -> None:
    n = 10_001  # not a multiple of four: the last word is partly used
    d = _int16_draws(n, seed=3)
    mask = d >= 32768 - round(CR * 65536)
    for value in (0.37, 1.0, 1e-5, 0.9999, -0.5):
        w = crossover_weights((n,), CR, value, torch.Generator().manual_seed(3))
        assert w.dtype == torch.float32
        assert torch.equal(w, torch.where(mask, torch.tensor(value), torch.tensor(0.0)))
    scratch = Scratch()
    again = crossover_weights((n,), CR, -0.5, torch.Generator().manual_seed(3), scratch)
    assert torch.equal(again, w)  # the last value of the loop
    assert torch.equal(crossover_mask((n,), CR, torch.Generator().manual_seed(3), scratch),
                       mask)
    # float32 crossover (weights 0/1 in a lerp) picks exactly the entries a select would
    g = torch.Generator().manual_seed(0)
    target, mutant = torch.randn(n, generator=g), torch.randn(n, generator=g)
    u = binomial_crossover(target, mutant, CR, torch.Generator().manual_seed(3))
    assert torch.equal(u, torch.where(mask, mutant, target))


def test_interpolate_hand_case() -> None:
    a, b = torch.tensor([4.0, 0.0]), torch.tensor([0.0, 8.0])
    assert torch.equal(interpolate(a, b, 0.25), torch.tensor([1.0, 6.0]))


def test_schedules() -> None:
    s = make_schedule(0.7, "parameters.F")
    assert isinstance(s, Constant) and s.value(0, 100) == 0.7 and s.value(99, 100) == 0.7
    s = make_schedule({"schedule": "constant", "value": 0.2}, "parameters.CR", high=1.0)
    assert s.value(3, 10) == 0.2
    with pytest.raises(RecipeError, match=r"parameters.F.schedule: unknown schedule 'nope'"):
        make_schedule({"schedule": "nope"}, "parameters.F")
    with pytest.raises(RecipeError, match=r"parameters.F.max: required by schedule 'cosine'"):
        make_schedule({"schedule": "cosine"}, "parameters.F")
    with pytest.raises(RecipeError, match=r"parameters.CR: must be between 0.0 and 1.0"):
        make_schedule(1.5, "parameters.CR", high=1.0)
    with pytest.raises(RecipeError, match=r"parameters.F.value: required"):
        make_schedule({"schedule": "constant"}, "parameters.F")


@pytest.mark.parametrize(("F", "CR"), [(0.5, 0.5), (0.3, 0.9), (0.8, 0.1), (1e-5, 1e-5),
                                       (0.5, 1.0), (0.5, 0.0)])
def test_fused_step_equals_mutation_then_crossover(F: float, CR: float) -> None:
    g = torch.Generator().manual_seed(0)
    target, donor = torch.randn(3, 1000, generator=g), 3 * torch.randn(3, 1000, generator=g)
    expected = binomial_crossover(target, current_to_rand(target, donor, F), CR,
                                  torch.Generator().manual_seed(5))
    out, scratch = torch.empty(3, 1000), Scratch()
    got = current_to_rand_binomial(target, donor, F, CR, torch.Generator().manual_seed(5),
                                   out=out, scratch=scratch)
    assert torch.equal(got, expected)
    plain = current_to_rand_binomial(target, donor, F, CR, torch.Generator().manual_seed(5))
    assert torch.equal(plain, expected)
    # buffers reused across calls give the same bits as fresh allocations
    again = rand_1(target, donor, target, F, out=torch.empty(3, 1000))
    assert torch.equal(again, rand_1(target, donor, target, F))
