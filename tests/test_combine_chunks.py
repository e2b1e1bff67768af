"""`combine_task_vectors` combines large CPU tensors in cache-sized chunks: the result must
be the whole-tensor computation's, bit for bit (signed zeros included)."""

from __future__ import annotations

import pytest
import torch

from mergekit_pcb.methods import ops
from mergekit_pcb.methods.ops import combine_task_vectors, magnitude_trim
from mergekit_pcb.threads import torch_threads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("consensus", "normalize", "lambda_"),
                         [(True, True, 1.0), (True, False, 0.7), (False, True, 1.3),
                          (False, False, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_give_the_whole_tensor_bits(threads: int, consensus: bool, normalize: bool,
                                           lambda_: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    shape = (700, 403)  # 282,100 entries: several chunks and a ragged last one
    base = torch.randn(shape, generator=g).to(dtype)
    base.view(-1)[::97] = -0.0  # signed zeros where the trim leaves nothing
    deltas = [magnitude_trim((0.01 * torch.randn(shape, generator=g)).to(dtype), 0.3)
              for _ in range(3)]
    weights = [0.7, -0.4, 1.2]
    with torch_threads(threads):
        assert base.numel() > ops.COMBINE_CHUNK * threads
        chunked = combine_task_vectors(base, deltas, weights, lambda_=lambda_,
                                       normalize=normalize, sign_consensus=consensus)
    whole = ops._combine(base, deltas, weights, lambda_, normalize, consensus)
    assert chunked.shape == whole.shape and chunked.dtype == whole.dtype
    assert torch.equal(chunked.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       whole.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    # and the values are TIES's: a hand-checked entry where two of three models agree
    if consensus and normalize and lambda_ == 1.0 and dtype == torch.float32:
        b = torch.zeros(ops.COMBINE_CHUNK * 2 + 1)
        d = [torch.zeros_like(b) for _ in range(3)]
        d[0][-1], d[1][-1], d[2][-1] = 0.5, -0.25, 0.25
        out = combine_task_vectors(b, d, [1.0, 1.0, 1.0], normalize=True,
                                   sign_consensus=True)
        assert out[-1] == pytest.approx((0.5 + 0.25) / 2)  # + wins; the − entry is left out


@pytest.mark.parametrize("models", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", [(0.7, 1.3, 0.9, 0.2, 1.1), (0.7, -0.4, 0.0, 1.2, -1.0)])
def test_the_search_fast_path_gives_the_consensus_bits(models: int, dtype: torch.dtype,
                                                       weights: tuple[float, ...]) -> None:
    """The coefficient search's fused TIES combine (int8 signs, a divisor table) equals
    `combine_task_vectors` bit for bit: negative and zero weights, signed zeros, chunk
    tails, half precision."""
    from mergekit_pcb.evolve.coefsearch.fastpath import consensus_combine

    g = torch.Generator().manual_seed(models)
    size = 2 * ops.COMBINE_CHUNK * torch.get_num_threads() + 4099
    base = torch.randn(size, generator=g).to(dtype)
    base[::50] = -0.0
    deltas = [magnitude_trim((0.01 * torch.randn(size, generator=g)).to(dtype), 0.4)
              for _ in range(models)]
    signs = [d.sign().to(torch.int8) for d in deltas]
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    for lambda_, normalize in ((1.0, True), (0.8, False), (1.3, True)):
        want = combine_task_vectors(base, deltas, list(weights[:models]), lambda_=lambda_,
                                    normalize=normalize, sign_consensus=True)
        got = consensus_combine(base, deltas, signs, weights[:models], lambda_, normalize)
        assert torch.equal(got.view(bits), want.view(bits))
