"""slerp, model_stock and arcee_fusion in float16 and bfloat16, bit for bit as mergekit 0.1.5.

The references below transcribe mergekit's kernels (merge_methods/slerp.py, model_stock.py,
arcee_fusion.py) with the same operations in the same order and dtypes, on inputs first
rounded to the recipe's `dtype` as mergekit's loader rounds them; they do not import
mergekit or our methods. Two things beyond the formulas decide the bits:

- torch sums a tensor past 32,768 entries in one partial sum per thread, and mergekit runs
  every tensor with its process's thread count: the references run with that count, and
  the merges run in a process holding the same count (`THREADS`);
- arcee_fusion's mask is float32, so mergekit's result (and what it writes, without an
  `out_dtype`) is float32 for float16 or bfloat16 inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_pcb.cli import app
from mergekit_pcb.threads import torch_threads

HALF = [torch.float16, torch.bfloat16]
THREADS = 2  # mergekit's process count here; any count above 1 splits the large sums
SHAPE = (512, 512)  # 262,144 entries: past torch's parallel grain of 32,768
CHUNK = 1 << 20  # mergekit's slerp _CHUNK_ELEMENTS


def ref_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp for one tensor (a batch of one): float32 work, chunked norms of
    norms and sums of chunk dot products, the result stored in the inputs' dtype."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=torch.float32).reshape(-1, 1)
    starts = range(0, a.shape[1], CHUNK)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, s:s + CHUNK].float(), dim=1, keepdim=True)
         for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, s:s + CHUNK].float(), dim=1, keepdim=True)
         for s in starts]), dim=0)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dot = torch.stack([((a[:, s:s + CHUNK].float() / norm_a)
                        * (b[:, s:s + CHUNK].float() / norm_b)).sum(dim=1, keepdim=True)
                       for s in starts]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / torch.sin(theta))
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / torch.sin(theta))
    out = torch.empty_like(a)
    for s in starts:
        out[:, s:s + CHUNK] = coef_a * a[:, s:s + CHUNK].float() \
            + coef_b * b[:, s:s + CHUNK].float()
    return out.reshape(v0.shape)


def ref_model_stock(w0: torch.Tensor, ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """mergekit's model_stock (per tensor), in the inputs' dtype throughout."""
    flat0, flats = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - flat0 for w in flats]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(flats)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(denominator),
                                            denominator))
    return (t * (sum(flats) / k) + (1 - t) * flat0).reshape(w0.shape)


def ref_arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion for a tensor under 10⁶ entries (no sampling): the quartiles
    are sorted entries at float32 q·(n − 1), truncated; the float32 mask widens the result."""
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    scores = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered, _ = torch.sort(scores.reshape(-1))
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[idx]
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


def ref_ramplus_tl(base: torch.Tensor, models: Sequence[torch.Tensor], r: float, alpha: float,
                   epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's ramplus_tl: the overlap ratio divides integer counts, so it is float32,
    and so is the result for float16 or bfloat16 inputs."""
    tv = torch.stack([m - base for m in models], dim=0).view(len(models), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    tv_z = tv * nonzero
    merged = ((tv_z * unique * boost.unsqueeze(-1))
              + (tv_z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ref_karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10,
                tol: float = 1e-5) -> torch.Tensor:
    """mergekit's karcher (equal weights): float32 norms, torch.dot in the inputs' dtype."""
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t.float()) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype)
             for t, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    weights = [alphas[i] / sum(alphas[i] for i in valid) for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for alpha, unit in zip(weights, points, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.float())
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, points, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.float())
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean
                + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.float())
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * n for alpha, n in zip(alphas, norms, strict=True)) * mean


def _save_models(root: Path, seed: int) -> tuple[Path, list[Path]]:
    """A float32 base and three fine-tunes of one 512×512 tensor (mergekit-docs' recipes
    round them to the recipe's dtype)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g) * 0.05
    dirs = []
    for i, w in enumerate([base] + [base + 0.01 * torch.randn(SHAPE, generator=g)
                                    for _ in range(3)]):
        d = root / f"m{i}"
        d.mkdir()
        save_file({"w": w}, str(d / "model.safetensors"))
        dirs.append(d)
    return dirs[0], dirs[1:]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    # a seed where one thread gives other bits than two for slerp and model_stock
    return _save_models(tmp_path_factory.mktemp("half"), 6)


def _inputs(paths: Sequence[Path], dtype: torch.dtype) -> list[torch.Tensor]:
    return [load_file(str(p / "model.safetensors"))["w"].to(dtype) for p in paths]


def _merge(root: Path, body: dict, tag: str) -> torch.Tensor:
    recipe = write_recipe(root / f"{tag}.yaml", body)
    with torch_threads(THREADS):
        res = CliRunner().invoke(app, ["run", str(recipe), "-o", str(root / tag), "--quiet"])
    assert res.exit_code == 0, res.output
    return load_file(str(root / tag / "model.safetensors"))["w"]


def _reference(fn: object, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """`fn(*args)` with mergekit's thread count, and on one thread (to show it matters)."""
    assert callable(fn)
    with torch_threads(THREADS):
        many = fn(*args)
    with torch_threads(1):
        one = fn(*args)
    return many, one


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    differ = int((got != want).sum())
    assert differ == 0, f"{differ} entries differ from mergekit's bits"


@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=str)  # float32 splits too
def test_slerp_docs_recipe_bit_identical(models: tuple[Path, list[Path]],
                                         dtype: torch.dtype, tmp_path: Path) -> None:
    base, tuned = models
    name = str(dtype).removeprefix("torch.")
    body = {"merge_method": "slerp", "base_model": str(base), "dtype": name,
            "models": [{"model": str(base)}, {"model": str(tuned[0])}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"value": 0.3}]}}
    got = _merge(tmp_path, body, "slerp")
    v0, v1 = _inputs([base, tuned[0]], dtype)
    want, one_thread = _reference(ref_slerp, 0.3, v0, v1)
    assert not torch.equal(want, one_thread)  # the thread count decides bits here
    assert want.dtype == dtype
    _same(got, want)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_model_stock_bit_identical(models: tuple[Path, list[Path]], dtype: torch.dtype,
                                   tmp_path: Path) -> None:
    base, tuned = models
    body = {"merge_method": "model_stock", "base_model": str(base),
            "dtype": str(dtype).removeprefix("torch."),
            "models": [{"model": str(p)} for p in [base, *tuned]]}
    got = _merge(tmp_path, body, "stock")
    w0, *ws = _inputs([base, *tuned], dtype)
    want, one_thread = _reference(ref_model_stock, w0, ws)
    assert not torch.equal(want, one_thread)
    _same(got, want)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_arcee_fusion_example_bit_identical(models: tuple[Path, list[Path]],
                                            dtype: torch.dtype, tmp_path: Path) -> None:
    """examples/arcee_fusion.yml: the base also under `models:`; float32 out, as mergekit
    writes it, unless `out_dtype` says otherwise."""
    base, tuned = models
    name = str(dtype).removeprefix("torch.")
    body = {"merge_method": "arcee_fusion", "base_model": str(base), "dtype": name,
            "models": [{"model": str(base)}, {"model": str(tuned[1])}]}
    v0, v1 = _inputs([base, tuned[1]], dtype)
    want = ref_arcee_fusion(v0, v1)
    assert want.dtype == torch.float32
    mixed = (want != v0.float()) & (want != v1.float())
    assert mixed.any()  # the kept entries are not the inputs' values: float32 matters
    _same(_merge(tmp_path, body, "fusion"), want)
    _same(_merge(tmp_path, {**body, "out_dtype": name}, "fusion-out"), want.to(dtype))
    # no `dtype`: mergekit computes in the inputs' dtype, and still writes float32
    half = tmp_path / "half-inputs"
    for key, tensor in (("base", v0), ("ft", v1)):
        (half / key).mkdir(parents=True)
        save_file({"w": tensor}, str(half / key / "model.safetensors"))
    plain = {"merge_method": "arcee_fusion", "base_model": str(half / "base"),
             "models": [{"model": str(half / "base")}, {"model": str(half / "ft")}]}
    _same(_merge(tmp_path, plain, "fusion-plain"), want)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ramplus_tl_writes_its_float32_result(models: tuple[Path, list[Path]],
                                              dtype: torch.dtype, tmp_path: Path) -> None:
    base, tuned = models
    body = {"merge_method": "ramplus_tl", "base_model": str(base),
            "dtype": str(dtype).removeprefix("torch."),
            "models": [{"model": str(p)} for p in tuned[:2]],
            "parameters": {"r": 0.5, "alpha": 0.4, "epsilon": 0.01}}
    b, *ms = _inputs([base, *tuned[:2]], dtype)
    want = ref_ramplus_tl(b, ms, 0.5, 0.4, 0.01)
    assert want.dtype == torch.float32 and not torch.equal(want, want.to(dtype).float())
    _same(_merge(tmp_path, body, "ramplus"), want)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_karcher_bit_identical(dtype: torch.dtype, tmp_path: Path) -> None:
    # seed 0: torch.dot in float16 gives other bits on one thread (most seeds do not)
    _, tuned = _save_models(tmp_path, 0)
    body = {"merge_method": "karcher", "dtype": str(dtype).removeprefix("torch."),
            "models": [{"model": str(p)} for p in tuned]}
    got = _merge(tmp_path, body, "karcher")
    want, one_thread = _reference(ref_karcher, _inputs(tuned, dtype))
    want = want.to(dtype)  # mergekit's scale is float32: the write rounds it
    if dtype == torch.float16:
        assert not torch.equal(want, one_thread.to(dtype))
    _same(got, want)
